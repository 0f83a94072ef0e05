"""Tokenizer wrapper over a local Hugging Face tokenizer, plus streaming (incremental) decoding.

The engine only ever sees token ids; this module turns prompts into ids and generated ids back
into text deltas that are safe to stream, i.e. never split a multi-byte character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)
_REPLACEMENT_CHAR = "\ufffd"
# Decoding starts a few tokens before the first unread one so that decoders which strip a
# leading space at the start of a sequence (SentencePiece) still see the real context.
_PREFIX_WINDOW_LEN = 5


class Tokenizer:
    """Encodes and decodes text for one model; built from a local model directory."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self._hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self._eos_token_ids = sorted(ids)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer in ``model_dir``; never reaches the network."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(
                f"no tokenizer files in {model_dir} (looked for {', '.join(_TOKENIZER_FILES)})"
            )
        hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return cls(hf_tokenizer, _generation_eos_ids(model_dir))

    @property
    def hf(self) -> Any:
        """The underlying Hugging Face tokenizer."""
        return self._hf

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's eos plus the generation config's."""
        return list(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self._hf)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Space cleanup rewrites text across token boundaries, so streamed deltas would no
        # longer add up to the full decode; it is off everywhere for that reason.
        return self._hf.decode(
            list(token_ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat ``messages`` into a prompt string with the tokenizer's template."""
        if not getattr(self._hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        return self._hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, holding back incomplete multi-byte characters.

    Only a short window of recent ids is decoded per step: ``prefix_offset`` marks where the
    window starts and ``read_offset`` the first id whose text has not been emitted yet.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids)
        self.read_offset = len(self._token_ids)
        self.prefix_offset = max(self.read_offset - _PREFIX_WINDOW_LEN, 0)
        self.output_text = ""

    def append(self, token_ids: Sequence[int]) -> str:
        """Add newly generated ids; return the text they complete (possibly empty)."""
        self._token_ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of sequence: return whatever was held back, replacement chars included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self._token_ids))
        # A trailing U+FFFD is usually a character whose remaining bytes are still to come.
        # Ids that add no text (skipped specials) must not advance the window either, or the
        # next id would be decoded without the context that fixes its leading space.
        held = new_text.endswith(_REPLACEMENT_CHAR) or len(new_text) <= len(prefix_text)
        if held and not final:
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._token_ids)
        self.output_text += delta
        return delta

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(
            self._token_ids[start:stop], skip_special_tokens=self._skip_special_tokens
        )
