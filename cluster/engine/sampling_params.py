"""Per-request sampling and stopping parameters (vLLM's names and meanings).

Validated once when a request enters the engine; everything downstream trusts the values
(what needs the model, such as token ids against its vocabulary or a grammar compiled against
its tokenizer, is checked by the engine's add_request).
"""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI, vLLM)
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100] (OpenAI)
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias keys


@dataclass(slots=True)
class StructuredOutputs:
    """The output must follow exactly one of: a JSON schema (as JSON text), any JSON object, a
    regular expression, one of a list of strings, or an EBNF grammar (xgrammar's dialect,
    GBNF-like, root rule `root`). vLLM's StructuredOutputsParams (formerly
    GuidedDecodingParams). `disable_any_whitespace` (vLLM's option, JSON only): no
    whitespace between JSON tokens beyond the fixed separators, so a model that keeps picking
    whitespace cannot run an object past max_tokens."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict | bool):  # a schema given as an object: its JSON text
            self.json = _json.dumps(self.json)
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self._check()

    def _check(self) -> None:
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {_brief(value)}")
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"structured_outputs.{name} must be true or false, got "
                    f"{_brief(getattr(self, name))}"
                )
        if self.choice is not None:
            if not isinstance(self.choice, list) or not all(
                isinstance(c, str) for c in self.choice
            ):
                raise ValueError(
                    f"structured_outputs.choice must be a list of strings, got "
                    f"{_brief(self.choice)}"
                )
            if not self.choice:
                raise ValueError("structured_outputs.choice must name at least one string")
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None]  # fmt: skip
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, "
                f"grammar; got {given or 'none'}"
            )
        if self.json is not None:
            try:
                _json.loads(self.json)
            except ValueError as e:
                raise ValueError(
                    f"structured_outputs.json must be a JSON schema as JSON text: {e}"
                ) from None
        for name in ("regex", "grammar"):
            if getattr(self, name) == "":
                raise ValueError(f"structured_outputs.{name} must not be empty")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(
            n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None
        )

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (the grammar cache's key)."""
        value = self.choice if self.kind == "choice" else getattr(self, self.kind)
        value = tuple(value) if isinstance(value, list) else value
        return (self.kind, value, self.disable_any_whitespace)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1.0 and min_p 0.0 disable
    theirs. ``seed`` makes a request's random draws reproducible whatever else is batched with it.
    ``logprobs`` asks for the log-probability of each sampled token (0) plus that many top
    alternatives (N > 0), taken from the model's raw distribution; ``prompt_logprobs`` the same
    for every prompt token after the first.

    Penalties (vLLM's and OpenAI's meanings): ``presence_penalty`` and ``frequency_penalty``
    subtract ``presence * (count > 0) + frequency * count`` from the logit of each token by its
    count in the output so far; ``repetition_penalty`` divides the positive logits (multiplies
    the negative ones) of every token seen in the prompt or the output. ``logit_bias`` adds
    its value to a token's logit. Until ``min_tokens`` output tokens exist, EOS and
    ``stop_token_ids`` cannot be sampled and stop strings do not match. ``structured_outputs``
    constrains the output to a grammar (StructuredOutputs).
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_types()
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = {k: float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _check_types(self) -> None:
        """Wrong types must fail here, not later inside a batched step."""
        for name in ("max_tokens", "top_k", "min_tokens"):
            _require_int(name, getattr(self, name))
        for name in ("seed", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):  # fmt: skip
            _require_number(name, getattr(self, name))
        self._check_logit_bias_types()
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputs
        ):
            raise ValueError(
                "structured_outputs must be StructuredOutputs, got "
                f"{type(self.structured_outputs).__name__}"
            )
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

    def _check_logit_bias_types(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must map token ids to numbers, got {_brief(bias)}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(
                f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed"
            )
        for token_id, value in bias.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(
                    f"logit_bias keys must be token ids (integers >= 0), got {_brief(token_id)}"
                )
            _require_number(f"logit_bias[{token_id}]", value)

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
        self._validate_processing()

    def _validate_processing(self) -> None:
        """The fields that change logits before sampling, and prompt_logprobs."""
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(
                    f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got "
                    f"{getattr(self, name)}"
                )
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"
            )
        for token_id, value in (self.logit_bias or {}).items():
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {value} for token {token_id}"
                )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}] (or None), got "
                f"{self.prompt_logprobs}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_top_logprobs(self) -> int:
        return self.logprobs or 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def needs_logits_processing(self) -> bool:
        """Whether this request's logits change before sampling (apart from a grammar)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0


def _brief(value: object) -> str:
    """repr() cut short for an error message (a bad 1 MB list is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_brief(value)}")


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {_brief(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {_brief(value)}")
