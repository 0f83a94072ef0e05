"""Per-request sampling and stopping parameters (vLLM's names and meanings).

Validated once when a request enters the engine; everything downstream trusts the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1.0 and min_p 0.0 disable
    theirs. ``seed`` makes a request's random draws reproducible whatever else is batched with it.
    ``logprobs`` asks for the log-probability of each sampled token (0) plus that many top
    alternatives (N > 0), taken from the model's raw distribution.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_types()
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._validate()

    def _check_types(self) -> None:
        """Wrong types must fail here, not later inside a batched step."""
        for name in ("max_tokens", "top_k"):
            _require_int(name, getattr(self, name))
        for name in ("seed", "logprobs"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {_brief(value)}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {_brief(value)}")
        stops_ok = isinstance(self.stop, list | tuple) and all(
            isinstance(x, str) for x in self.stop
        )
        if not stops_ok:
            raise ValueError(f"stop must be a string or a list of strings, got {_brief(self.stop)}")
        if not isinstance(self.stop_token_ids, list | tuple):
            raise ValueError(
                f"stop_token_ids must be a list of ints, got {_brief(self.stop_token_ids)}"
            )
        for token_id in self.stop_token_ids:
            _require_int("stop_token_ids", token_id)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    def _validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {_brief(self.max_tokens)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (both disable it) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"logprobs must be in [0, {MAX_LOGPROBS}] (or None), got {self.logprobs}"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_top_logprobs(self) -> int:
        return self.logprobs or 0


def _brief(value: object) -> str:
    """repr() cut short for an error message (a bad 1 MB list is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_brief(value)}")
