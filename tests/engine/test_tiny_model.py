"""The tiny default model: deterministic, loadable offline by transformers, cached safely."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cluster.engine import tiny


def test_tokenizer_training_is_deterministic() -> None:
    first = tiny.build_tokenizer(512)
    assert first.to_str() == tiny.build_tokenizer(512).to_str()
    assert first.get_vocab_size() == 512
    assert [first.id_to_token(i) for i in range(3)] == ["<|bos|>", "<|eos|>", "<|pad|>"]


def test_write_is_byte_identical_per_seed(tmp_path: Path) -> None:
    a = tiny.write_tiny_model(tmp_path / "a", seed=0)
    b = tiny.write_tiny_model(tmp_path / "b", seed=0)
    c = tiny.write_tiny_model(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_weights_have_llama_names_shapes_and_init(tmp_path: Path) -> None:
    model_dir = tiny.write_tiny_model(tmp_path)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        weights = {name: f.get_tensor(name) for name in f.keys()}
    assert len(weights) == 3 + 9 * tiny.TINY_CONFIG["num_hidden_layers"]
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)
    assert weights["model.layers.3.mlp.down_proj.weight"].shape == (128, 352)
    assert weights["lm_head.weight"].shape == (512, 128)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["model.norm.weight"], torch.ones(128))
    std = weights["model.embed_tokens.weight"].std().item()
    assert abs(std - 0.02) < 0.002


def test_loads_offline_in_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny.write_tiny_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.num_key_value_heads == 2
    input_ids = hf_tokenizer("Hello, café 日本語!", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert hf_tokenizer.eos_token_id == tiny.EOS_TOKEN_ID


def test_default_model_dir_honours_env_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PD_CLUSTER_CACHE", str(tmp_path))
    model_dir = tiny.default_model_dir()
    assert model_dir == tmp_path / tiny.DEFAULT_MODEL_NAME
    assert json.loads((model_dir / "config.json").read_text()) == tiny.TINY_CONFIG
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert tiny.default_model_dir() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [tiny.DEFAULT_MODEL_NAME]


def test_default_model_dir_concurrent_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PD_CLUSTER_CACHE", str(tmp_path))
    barrier = threading.Barrier(4)
    results: list[Path] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            results.append(tiny.default_model_dir())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(results) == {tmp_path / tiny.DEFAULT_MODEL_NAME}
    assert [p.name for p in tmp_path.iterdir()] == [tiny.DEFAULT_MODEL_NAME]


def test_default_model_dir_survives_losing_the_rename_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PD_CLUSTER_CACHE", str(tmp_path))
    final_dir = tmp_path / tiny.DEFAULT_MODEL_NAME
    real_write = tiny.write_tiny_model

    def write_while_rival_finishes_first(path: Path, seed: int = 0) -> Path:
        real_write(final_dir, seed)
        return real_write(path, seed)

    monkeypatch.setattr(tiny, "write_tiny_model", write_while_rival_finishes_first)
    assert tiny.default_model_dir() == final_dir
    assert [p.name for p in tmp_path.iterdir()] == [tiny.DEFAULT_MODEL_NAME]


def test_default_model_dir_refuses_incomplete_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PD_CLUSTER_CACHE", str(tmp_path))
    broken = tmp_path / tiny.DEFAULT_MODEL_NAME
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="incomplete"):
        tiny.default_model_dir()
    assert [p.name for p in tmp_path.iterdir()] == [tiny.DEFAULT_MODEL_NAME]
