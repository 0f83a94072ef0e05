"""Shared fixtures: the tiny default model and random-weight checkpoints of each supported
family, written by `transformers` itself so our loader reads real Hugging Face folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Keep the embedded default out of ~/.cache and never let transformers reach for a hub.
os.environ.setdefault("PD_CLUSTER_CACHE", tempfile.mkdtemp(prefix="pd-cluster-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-linear-rope-tied": (
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True},
    ),
    "mistral": ("MistralConfig", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {}),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cluster.engine.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def write_family_model(family: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """A small random-weight checkpoint of `family` saved with save_pretrained (safetensors),
    with the tiny model's tokenizer beside it."""
    import transformers

    from cluster.engine.tiny import save_random_checkpoint

    class_name, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.05,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **extra,
    )
    if family == "qwen2":
        config.attention_bias = True  # harmless for Qwen2 (q/k/v always biased)
    return save_random_checkpoint(
        config,
        out_dir,
        seed=sum(map(ord, family)),
        tokenizer_dir=tokenizer_dir,
        adjust=_randomize_biases_and_norms,
    )


def _randomize_biases_and_norms(model) -> None:
    """Zero-init biases and unit norms would hide a missing bias or a skipped norm."""
    for name, param in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            param.add_(torch.randn_like(param) * 0.1)


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, tiny_model_dir):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(family)
            cache[family] = write_family_model(family, out, tiny_model_dir)
        return cache[family]

    return make


class LoopThread:
    """An event loop in a daemon thread, for async servers driven from sync tests."""

    def __init__(self):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float = 120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        import asyncio

        async def cancel_the_rest() -> None:  # background tasks (e.g. health tracking)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest(), timeout_s=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
