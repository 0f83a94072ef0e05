"""Tokenizer wrapper and incremental detokenizer, checked against the tiny model's tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cluster.engine import tiny
from cluster.engine.tokenizer import IncrementalDetokenizer, Tokenizer

MULTIBYTE_TEXT = "café 日本語 🙂 naïve"
_FFFD = "\ufffd"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


def _stream(tokenizer: Tokenizer, prompt_ids: list[int], ids: list[int], chunk_len: int = 1):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.append(ids[i : i + chunk_len]) for i in range(0, len(ids), chunk_len)]
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    return deltas


def _expected(tokenizer: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    return tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)) :]


@pytest.mark.parametrize(
    "text", ["Hello, world! 42 + 7 = 49.", "spaced . out , marks ?", MULTIBYTE_TEXT]
)
def test_encode_decode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_multibyte_chars_span_several_tokens(tokenizer: Tokenizer) -> None:
    # Guards the streaming tests below: they only bite if some token is a partial character.
    partial = [i for i in tokenizer.encode(MULTIBYTE_TEXT) if _FFFD in tokenizer.decode([i])]
    assert partial


def test_properties(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 512
    assert tiny.EOS_TOKEN_ID in tokenizer.eos_token_ids
    assert tokenizer.hf.eos_token == "<|eos|>"
    assert tokenizer.decode([tiny.BOS_TOKEN_ID, tiny.EOS_TOKEN_ID]) == ""
    assert tokenizer.decode([tiny.EOS_TOKEN_ID], skip_special_tokens=False) == "<|eos|>"


def test_eos_ids_include_generation_config_list(tmp_path: Path) -> None:
    model_dir = tiny.write_tiny_model(tmp_path)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9]}))
    assert Tokenizer.from_pretrained(model_dir).eos_token_ids == [1, 7, 9]


def test_from_pretrained_rejects_dir_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)


def test_apply_chat_template(tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>")


def test_apply_chat_template_without_template(tokenizer: Tokenizer) -> None:
    bare = Tokenizer(tokenizer.hf.__class__(tokenizer_object=tokenizer.hf.backend_tokenizer))
    with pytest.raises(ValueError, match="chat template"):
        bare.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_detokenizer_streams_multibyte_text_one_token_at_a_time(tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.encode("The keeper said:")
    ids = tokenizer.encode(" " + MULTIBYTE_TEXT)
    deltas = _stream(tokenizer, prompt_ids, ids)
    assert all(_FFFD not in delta for delta in deltas)
    assert "".join(deltas) == " " + MULTIBYTE_TEXT
    assert deltas[-1] == ""  # nothing was left to flush


def test_detokenizer_with_random_ids(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    prompt_ids = tokenizer.encode("Once upon a time")
    ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(200)]
    deltas = _stream(tokenizer, prompt_ids, ids)
    expected = _expected(tokenizer, prompt_ids, ids)
    assert "".join(deltas) == expected
    if _FFFD not in expected:
        assert all(_FFFD not in delta for delta in deltas)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk_len", [1, 3])
def test_detokenizer_with_random_unicode_text(
    tokenizer: Tokenizer, seed: int, chunk_len: int
) -> None:
    rng = random.Random(seed)
    alphabet = "ab cd,.!?7éïñ日本語東京Москва🙂🚀\n"
    text = "".join(rng.choice(alphabet) for _ in range(120))
    prompt_ids = tokenizer.encode("Prompt: 日")
    deltas = _stream(tokenizer, prompt_ids, tokenizer.encode(text), chunk_len)
    assert all(_FFFD not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_detokenizer_prompt_ending_mid_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("x🙂y")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(_FFFD))
    prompt_ids, generated = ids[:split], ids[split:]
    deltas = _stream(tokenizer, prompt_ids, generated)
    assert "".join(deltas) == _expected(tokenizer, prompt_ids, generated)
    assert all(_FFFD not in delta for delta in deltas)


def test_detokenizer_skips_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" hello") + [tiny.EOS_TOKEN_ID] + tokenizer.encode(" 日本")
    assert "".join(_stream(tokenizer, [], ids)) == " hello 日本"


def test_flush_emits_held_back_partial_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🙂")
    partial = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(_FFFD))
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.append(ids[:partial]) == ""
    assert detok.flush() == tokenizer.decode(ids[:partial])
    assert detok.flush() == ""
