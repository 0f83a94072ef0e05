"""The one validation of a request at the edge: both front ends (gRPC and OpenAI HTTP) build a
`GenerateInput`, and `validate` checks it here before anything is admitted, so every bad input
becomes an `InvalidRequest` (400 / INVALID_ARGUMENT) that says what to change, and nothing a
worker would choke on (a lone surrogate, a giant list, a number out of range) gets past.

The limits are what a client can rely on (docs/serving.md, "Errors and limits"). The engine
checks the same again in `add_request` (defence in depth): no input may fail inside a step.
"""

from __future__ import annotations

import json

from cluster.engine.sampling_params import SamplingParams
from cluster.router.types import FAILURE_POLICIES, GenerateInput, InvalidRequest, ModelInfo

MAX_BODY_BYTES = 4 * 1024 * 1024  # an HTTP body (413 beyond); gRPC's receive limit is the same
MAX_JSON_DEPTH = 32  # nesting of a JSON body
MAX_PROMPT_CHARS_PER_TOKEN = 16  # a text prompt over max_model_len x this is refused untokenized
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 64
MAX_CACHE_SALT_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_MESSAGES = 4096  # chat messages in one request
MAX_CHOICES = 16  # n and best_of: each choice holds its own KV for the whole output
MAX_GRAMMAR_CHARS = 64 * 1024  # a structured-output spec (schema, regex, grammar, choices)
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def brief(value: object, max_chars: int = 80) -> str:
    """repr() for an error message, cut short: a 1 MB bad value is not echoed back."""
    text = repr(value)
    return text if len(text) <= max_chars else f"{text[: max_chars - 3]}..."


def check_text(name: str, value: str, max_chars: int | None = None) -> str:
    """A string a worker will encode: valid UTF-8 (no lone surrogates), within max_chars."""
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequest(f"{name} has {len(value)} characters; the limit is {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            f"{name} is not valid Unicode (a lone surrogate at position {e.start}): send UTF-8 text"
        ) from None
    return value


def check_request_id(request_id: str) -> str:
    """Client-chosen ids end up in logs and NIXL notifications: short, printable ASCII."""
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequest("a request id must be a non-empty string")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(
            f"the request id has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
        )
    if not all("!" <= c <= "~" for c in request_id):
        raise InvalidRequest("a request id may hold only printable ASCII characters without spaces")
    return request_id


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """The sizes SamplingParams itself does not bound."""
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"stop has {len(params.stop)} strings; the limit is {MAX_STOP_STRINGS}"
        )
    for stop in params.stop:
        check_text("a stop string", stop, MAX_STOP_STRING_CHARS)
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(
            f"stop_token_ids has {len(params.stop_token_ids)} ids; the limit is "
            f"{MAX_STOP_TOKEN_IDS}"
        )
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab_size}), got {bad[:5]}")


def check_prompt_chars(prompt: str, model: ModelInfo) -> None:
    """Before tokenizing: a text prompt that cannot possibly fit is refused unread."""
    limit = model.max_model_len * MAX_PROMPT_CHARS_PER_TOKEN
    if len(prompt) > limit:
        raise InvalidRequest(
            f"prompt has {len(prompt)} characters, more than {model.max_model_len} tokens "
            f"could hold (limit {limit}): shorten it"
        )
    check_text("prompt", prompt)


def validate(inp: GenerateInput, model: ModelInfo, default_policy: str) -> str:
    """Everything about `inp` but its prompt's token count (that needs the tokenizer);
    returns the failure policy that applies."""
    if inp.model and inp.model != model.name:
        raise InvalidRequest(f"model {brief(inp.model)} is not served here; use {model.name!r}")
    if not isinstance(inp.params, SamplingParams):
        raise InvalidRequest("params must be SamplingParams")
    policy = inp.failure_policy or default_policy
    if policy not in FAILURE_POLICIES:
        raise InvalidRequest(
            f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}, got {policy!r}"
        )
    if inp.request_id is not None:
        check_request_id(inp.request_id)
    if inp.cache_salt is not None:
        if not isinstance(inp.cache_salt, str):
            raise InvalidRequest("cache_salt must be a string")
        check_text("cache_salt", inp.cache_salt, MAX_CACHE_SALT_CHARS)
    check_choices(inp.n, inp.best_of)
    _check_structured(inp.params)
    if isinstance(inp.priority, bool) or not isinstance(inp.priority, int):
        raise InvalidRequest(f"priority must be an integer, got {inp.priority!r}")
    low, high = PRIORITY_RANGE
    if not low <= inp.priority <= high:
        raise InvalidRequest(f"priority must be in [{low}, {high}], got {inp.priority}")
    check_sampling(inp.params, model.vocab_size)
    if isinstance(inp.prompt, str):
        check_prompt_chars(inp.prompt, model)
    elif not isinstance(inp.prompt, list | tuple):
        raise InvalidRequest("prompt must be a string or a list of token ids")
    return policy


def check_prompt_ids(ids: list[int], params: SamplingParams, model: ModelInfo) -> None:
    if not ids:
        raise InvalidRequest("prompt is empty: give at least one token")
    vocab = model.vocab_size
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})")
    limit = model.max_model_len
    if len(ids) >= limit:
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens but max_model_len is {limit}: shorten it so "
            "that at least one output token fits"
        )
    if len(ids) + params.max_tokens > limit:
        raise InvalidRequest(
            f"this model's maximum context length is {limit} tokens, but {len(ids)} prompt "
            f"tokens + max_tokens={params.max_tokens} ask for {len(ids) + params.max_tokens}: "
            "lower max_tokens or shorten the prompt"
        )


# -- JSON bodies (HTTP) ------------------------------------------------------------------------


def parse_json_body(raw: bytes) -> dict:
    """A JSON object from an HTTP body, or InvalidRequest: malformed, not UTF-8, NaN or
    Infinity (not JSON), integers too long to read, nesting deeper than MAX_JSON_DEPTH, or
    any string that is not valid Unicode (a lone surrogate escape, e.g. "\\ud800")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the body is not UTF-8 (byte {e.start}): send UTF-8 JSON") from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"malformed JSON body: {e}") from None
    except ValueError as e:  # an integer over Python's digit limit, or our constant refusal
        raise InvalidRequest(f"unreadable JSON value: {e}") from None
    except RecursionError:
        raise InvalidRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_strings(body)
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _check_strings(body: object) -> None:
    """Every key and string value of a parsed body encodes as UTF-8; nesting is bounded."""
    stack = [("body", body, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            check_text(where, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                check_text(f"a key in {where}", key)
                stack.append((key if where == "body" else f"{where}.{key}", item, depth + 1))
        elif isinstance(value, list):
            stack.extend((where, item, depth + 1) for item in value)


def check_choices(n: object, best_of: object) -> None:
    """n in [1, MAX_CHOICES], best_of (None, or) in [n, MAX_CHOICES]; the message starts with
    the field's name (the HTTP edge reports it as the error's param)."""
    for name, value in (("n", n), ("best_of", best_of)):
        if value is None and name == "best_of":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{name} must be an integer, got {brief(value)}")
        if not 1 <= value <= MAX_CHOICES:
            raise InvalidRequest(f"{name} must be in [1, {MAX_CHOICES}], got {value}")
    if best_of is not None and best_of < n:
        raise InvalidRequest(f"best_of ({best_of}) must be >= n ({n})")


def _check_structured(params: SamplingParams) -> None:
    """A grammar compiles on a CPU before the request runs: its size is bounded."""
    spec = params.structured_outputs
    if spec is None:
        return
    size = sum(len(x) for x in (spec.json, spec.regex, spec.grammar) if x)
    size += sum(len(c) for c in spec.choice or ())
    if size > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(
            f"the structured-output spec has {size} characters; the limit is "
            f"{MAX_GRAMMAR_CHARS}: simplify the schema, regex or grammar"
        )
