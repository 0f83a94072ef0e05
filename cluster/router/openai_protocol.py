"""OpenAI's /v1/completions and /v1/chat/completions, translated both ways: a JSON body becomes
one `GenerateInput`; the router's `StreamChunk`s become OpenAI's response objects and stream
chunks, in shapes the official `openai` client parses unchanged.

Part of the router's HTTP front end (docs/architecture.md: router/): http_server.py does the
I/O, this module only the shapes. Names, defaults and extensions (top_k, min_p, ignore_eos,
stop_token_ids, priority, guided_*, structured_outputs, prompt_logprobs...) follow vLLM's
OpenAI server. Whatever we cannot honour is a 400 naming the field rather than silently
ignored. Tool calls are parsed out of the output per model family (tool_parsers.py).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.engine.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputs
from cluster.router.chat_template import ChatTemplate, parse_messages, parse_tools
from cluster.router.tool_parsers import (
    ToolCall,
    ToolParser,
    ToolStream,
    detect_parser,
    forced_schema,
    get_parser,
    parse_forced,
)
from cluster.router.types import (
    GenerateInput,
    InvalidRequest,
    ModelInfo,
    RequestFailed,
    RouterError,
    StreamChunk,
    Timing,
    Usage,
)
from cluster.router.validation import brief, check_choices

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
_LOGPROB_FLOOR = -9999.0  # what OpenAI sends for -inf: JSON has no infinity
_SAMPLING_FIELDS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "min_tokens", "prompt_logprobs",
}  # fmt: skip
# vLLM's structured-output extensions: guided_<kind> fields, or one structured_outputs object
_GUIDED_KINDS = ("json", "regex", "choice", "grammar")
# fill-in-the-middle tokens (prefix, suffix, middle) of the families that have them
_FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
               ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))  # fmt: skip


class InvalidField(InvalidRequest):
    """A 400 about one request field; `param` names it in the error body."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True, frozen=True)
class ServedModel:
    """What the protocol needs to know about the model behind the router."""

    info: ModelInfo
    tokenizer: Any  # cluster.engine.tokenizer.Tokenizer
    chat_template: ChatTemplate | None
    created: int = field(default_factory=lambda: int(time.time()))

    tool_parser: str | None = None  # the family format of tool calls (tool_parsers.py)

    @classmethod
    def from_router(cls, router: Any) -> ServedModel:
        template = ChatTemplate.from_tokenizer(router.tokenizer)
        settings = getattr(router, "settings", None)
        parser = getattr(settings, "tool_call_parser", "auto")
        if parser == "auto":
            parser = detect_parser(template.source if template else None)
        parser = None if parser in (None, "none") else parser
        return cls(router.model_info, router.tokenizer, template, tool_parser=parser)

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(slots=True)
class OpenAIRequest:
    kind: Literal["completion", "chat"]
    input: GenerateInput
    stream: bool = False
    include_usage: bool = False  # stream only: a last chunk with usage and no choices
    num_logprobs: int | None = None  # top alternatives per token to report; None: no logprobs
    echo_prompt: str | list[int] | None = None  # completions with echo: the prompt as sent
    tools: ToolChoice | None = None  # chat with tools: how to read tool calls from the output

    @property
    def request_id(self) -> str:
        return self.input.request_id or ""


@dataclass(slots=True, frozen=True)
class ToolChoice:
    """How a chat request's output becomes tool calls: a family parser (tool_choice auto),
    or the forced shape of tool_choice required / a named function."""

    parser: ToolParser | None = None  # auto
    forced: bool = False  # required or named: the output is JSON under a schema
    named: str | None = None  # the function tool_choice names


# -- parsing ---------------------------------------------------------------------------------


class _Body:
    """Typed reads of one JSON body: null means "use the default", a wrong type is a 400."""

    def __init__(self, body: object) -> None:
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        self.raw = body

    def get(self, name: str, kind: type | tuple[type, ...], default: Any, what: str) -> Any:
        value = self.raw.get(name)
        if value is None:
            return default
        is_bool = isinstance(value, bool)
        if not isinstance(value, kind) or (is_bool and bool not in _as_tuple(kind)):
            raise InvalidField(name, f"{name} must be {what}, got {brief(value)}")
        return value

    def integer(self, name: str, default: int | None = None) -> int | None:
        return self.get(name, int, default, "an integer")

    def number(self, name: str, default: float | None = None) -> float | None:
        return self.get(name, (int, float), default, "a number")

    def flag(self, name: str, default: bool = False) -> bool:
        return self.get(name, bool, default, "true or false")

    def string(self, name: str, default: str | None = None) -> str | None:
        return self.get(name, str, default, "a string")

    def mapping(self, name: str) -> dict | None:
        return self.get(name, dict, None, "an object")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def new_request_id() -> str:
    return uuid.uuid4().hex


def parse_completion_request(
    body: object, served: ServedModel, request_id: str | None = None
) -> OpenAIRequest:
    """A /v1/completions body → OpenAIRequest (InvalidRequest on anything we cannot serve)."""
    b = _Body(body)
    model = _check_model(b, served)
    prompt = _completion_prompt(b.raw.get("prompt"), served.info.vocab_size)
    suffix = b.string("suffix")
    if suffix:
        prompt = _fill_in_the_middle(prompt, suffix, served)
    num_logprobs = _num_logprobs("logprobs", b.integer("logprobs"))
    max_tokens = b.integer("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    echo = b.flag("echo")
    if echo and suffix:
        raise InvalidField("echo", "echo cannot be combined with suffix")
    # echo with logprobs reports the prompt's tokens too: their logprobs come from the prefill
    prompt_logprobs = num_logprobs if echo and num_logprobs is not None else None
    params = _sampling_params(b, max_tokens, num_logprobs, _structured(b), prompt_logprobs)
    request = _request("completion", b, prompt, params, model, request_id, num_logprobs)
    request.echo_prompt = prompt if echo else None
    return request


def parse_chat_request(
    body: object, served: ServedModel, request_id: str | None = None
) -> OpenAIRequest:
    """A /v1/chat/completions body → OpenAIRequest; the prompt goes out as token ids."""
    b = _Body(body)
    model = _check_model(b, served)
    if b.flag("continue_final_message"):
        raise InvalidField("continue_final_message", "continue_final_message is not supported")
    if b.raw.get("functions") is not None:
        raise InvalidField("functions", "functions is deprecated: send tools")
    if served.chat_template is None:
        raise InvalidRequest(
            f"model {served.name!r} has no chat template, so it cannot serve "
            "/v1/chat/completions; send a plain prompt to /v1/completions instead"
        )
    messages = parse_messages(b.raw.get("messages"))
    tools, choice, structured = _tools(b, served)
    text = served.chat_template.render(messages, b.flag("add_generation_prompt", True), tools)
    # The template already placed every special token it wants (vLLM and HF do the same).
    prompt_ids = list(served.tokenizer.hf.encode(text, add_special_tokens=False))
    if not prompt_ids:
        raise InvalidRequest("the chat template rendered these messages as an empty prompt")
    num_logprobs = _chat_num_logprobs(b)
    max_tokens = b.integer("max_completion_tokens", b.integer("max_tokens"))
    if max_tokens is None:
        max_tokens = _remaining_context(served.info.max_model_len, len(prompt_ids))
    params = _sampling_params(b, max_tokens, num_logprobs, structured or _structured(b))
    request = _request("chat", b, prompt_ids, params, model, request_id, num_logprobs)
    request.tools = choice
    return request


def _tools(b: _Body, served: ServedModel):
    """(tools for the template, how to read calls, the schema a forced choice imposes)."""
    raw_choice = b.raw.get("tool_choice")
    if b.raw.get("tools") in (None, []):  # an empty list: no tools, as none
        if raw_choice not in (None, "none", "auto"):
            raise InvalidField("tool_choice", "tool_choice needs tools")
        return None, None, None
    tools = _as_field("tools", parse_tools, b.raw["tools"])
    if raw_choice in (None, "auto"):
        if served.tool_parser is None:
            raise InvalidField(
                "tools",
                f"model {served.name!r} has no known tool-call format: start the server with "
                "router.tool_call_parser (hermes, llama3_json or mistral), or send "
                "tool_choice 'required' or a named function",
            )
        return tools, ToolChoice(parser=get_parser(served.tool_parser)), None
    if raw_choice == "none":
        return tools, None, None  # the model sees the tools, its output is plain content
    if raw_choice == "required":
        named = None
    elif isinstance(raw_choice, dict) and isinstance(raw_choice.get("function"), dict):
        named = raw_choice["function"].get("name")
        if named not in {t["function"]["name"] for t in tools}:
            raise InvalidField("tool_choice", f"tool_choice names {brief(named)}, not a tool")
    else:
        raise InvalidField(
            "tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}"
        )  # fmt: skip
    if _has_structured(b):
        raise InvalidField(
            "tool_choice", "a forced tool_choice cannot be combined with response_format or "
            "guided_* (it constrains the output itself)",
        )  # fmt: skip
    schema = json.dumps(forced_schema(tools, named))
    # (read by a program, never shown: no whitespace for a model to ramble in)
    forced = _structured_outputs("tools", {"json": schema, "disable_any_whitespace": True})
    return tools, ToolChoice(forced=True, named=named), forced


def _as_field(name: str, parse, value):
    try:
        return parse(value)
    except InvalidRequest as e:
        raise InvalidField(name, str(e)) from None


def _structured_outputs(param: str, kind: dict[str, Any]) -> StructuredOutputs:
    try:
        return StructuredOutputs(**kind)
    except ValueError as e:
        raise InvalidField(param, f"{param}: {e}") from None


def _has_structured(b: _Body) -> bool:
    response_format = b.raw.get("response_format")
    has_format = isinstance(response_format, dict) and response_format.get("type") != "text"
    guided = any(b.raw.get(f"guided_{k}") is not None for k in _GUIDED_KINDS)
    return has_format or guided or b.raw.get("structured_outputs") is not None


def _structured(b: _Body):
    """response_format, vLLM's guided_* fields or its structured_outputs object: at most one
    constraint, as StructuredOutputs (None: free text)."""
    found = []
    response_format = b.mapping("response_format")
    if response_format is not None:
        kind = _Body(response_format).string("type", "text")
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = _Body(response_format).mapping("json_schema")
            schema = spec.get("schema") if spec else None
            if not isinstance(schema, dict):
                raise InvalidField("response_format", "json_schema needs {name, schema: {...}}")
            found.append(("response_format", {"json": json.dumps(schema)}))
        elif kind != "text":
            raise InvalidField("response_format", "response_format type must be text, "
                               f"json_object or json_schema, got {brief(kind)}")  # fmt: skip
    for kind in _GUIDED_KINDS:
        value = b.raw.get(f"guided_{kind}")
        if value is not None:
            found.append((f"guided_{kind}", {kind: _guided_value(f"guided_{kind}", kind, value)}))
    nested = b.mapping("structured_outputs")
    if nested is not None:
        nested = dict(nested)
        options = {"disable_any_whitespace": nested.pop("disable_any_whitespace", False)}
        given = {k: v for k, v in nested.items() if v is not None and v is not False}
        unknown = sorted(set(given) - {*_GUIDED_KINDS, "json_object"})
        if unknown or len(given) != 1:
            raise InvalidField("structured_outputs", "structured_outputs takes exactly one of "
                               "json, regex, choice, grammar, json_object")  # fmt: skip
        ((kind, value),) = given.items()
        value = True if kind == "json_object" else _guided_value("structured_outputs", kind, value)
        found.append(("structured_outputs", {kind: value, **options}))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidField(found[1][0], f"give one output constraint, not several ({names})")
    if not found:
        return None
    return _structured_outputs(*found[0])


def _guided_value(name: str, kind: str, value: object):
    if kind == "json":
        if isinstance(value, dict):
            return json.dumps(value)
        if isinstance(value, str):
            return value
        raise InvalidField(name, f"{name} must be a JSON schema (an object or its text)")
    if kind == "choice":
        ok = isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)
        if not ok:
            raise InvalidField(name, f"{name} must be a non-empty list of non-empty strings")
        return list(value)
    if not isinstance(value, str) or not value:
        raise InvalidField(name, f"{name} must be a non-empty string")
    return value


def _fill_in_the_middle(prompt: str | list[int], suffix: str, served: ServedModel) -> str:
    """prefix-suffix-middle with the model's FIM tokens; a 400 when it has none."""
    if not isinstance(prompt, str):
        raise InvalidField("suffix", "suffix needs a text prompt, not token ids")
    vocab = served.tokenizer.hf.get_vocab()
    for pre, suf, mid in _FIM_TOKENS:
        if pre in vocab and suf in vocab and mid in vocab:
            return f"{pre}{prompt}{suf}{suffix}{mid}"
    raise InvalidField(
        "suffix",
        f"suffix needs a fill-in-the-middle model; {served.name!r} has no FIM tokens "
        "(<|fim_prefix|>/<|fim_suffix|>/<|fim_middle|> or <fim_prefix>/...)",
    )


def _request(kind, b: _Body, prompt, params, model, request_id, num_logprobs) -> OpenAIRequest:
    stream = b.flag("stream")
    options = b.mapping("stream_options")
    if options is not None and not stream:
        raise InvalidField("stream_options", "stream_options is only allowed with stream=true")
    include_usage = _Body(options or {}).flag("include_usage")
    inp = GenerateInput(
        prompt,
        params,
        request_id=request_id or new_request_id(),
        model=model,
        priority=b.integer("priority", 0),
        cache_salt=b.string("cache_salt"),
    )
    _choices(b, inp, stream)
    if kind == "chat" and inp.best_of not in (None, 1):
        raise InvalidField("best_of", "best_of is a /v1/completions field")
    return OpenAIRequest(kind, inp, stream, include_usage, num_logprobs)


def _check_model(b: _Body, served: ServedModel) -> str:
    model = b.string("model")
    if model not in (None, "", served.name):
        raise InvalidField("model", f"model {brief(model)} is not served here; use {served.name!r}")
    return served.name


def _choices(b: _Body, inp: GenerateInput, stream: bool) -> None:
    """n and best_of (OpenAI: best_of only on completions and never streamed)."""
    inp.n = b.integer("n", 1)
    inp.best_of = b.integer("best_of")
    try:
        check_choices(inp.n, inp.best_of)  # (the router checks again: gRPC comes that way)
    except InvalidRequest as e:
        raise InvalidField(str(e).split(" ", 1)[0], str(e)) from None
    if stream and inp.best_of not in (None, 1):
        raise InvalidField("best_of", "best_of cannot be streamed: send stream=false")


def _completion_prompt(prompt: object, vocab_size: int) -> str | list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) > 1:
            raise InvalidField(
                "prompt", "batched prompts are not supported; send one request per prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidField("prompt", "prompt must not be empty")
        return prompt
    is_ids = isinstance(prompt, list) and all(_is_int(t) for t in prompt)
    if not is_ids:
        message = f"prompt must be a string or a list of token ids, got {brief(prompt)}"
        raise InvalidField("prompt", message)
    if not prompt:
        raise InvalidField("prompt", "prompt must not be empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        message = f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}"
        raise InvalidField("prompt", message)
    return list(prompt)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num_logprobs(name: str, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise InvalidField(name, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
    return value


def _chat_num_logprobs(b: _Body) -> int | None:
    top = _num_logprobs("top_logprobs", b.integer("top_logprobs"))
    if not b.flag("logprobs"):
        if top:
            raise InvalidField("top_logprobs", "top_logprobs needs logprobs=true")
        return None
    return top or 0


def _remaining_context(max_model_len: int, prompt_len: int) -> int:
    """vLLM's chat default for max_tokens: whatever room the context has left."""
    if prompt_len >= max_model_len:
        raise InvalidField(
            "messages",
            f"this model's maximum context length is {max_model_len} tokens, but the messages "
            f"take {prompt_len}; shorten the conversation",
        )
    return max_model_len - prompt_len


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _logit_bias(b: _Body, vocab_size: int | None = None) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias}, JSON keys being strings (SamplingParams
    bounds the entries and values)."""
    raw = b.mapping("logit_bias")
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit()) or len(key) > 12:
            raise InvalidField("logit_bias", f"logit_bias keys are token ids, got {brief(key)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidField("logit_bias", f"logit_bias values are numbers, got {brief(value)}")
        out[int(key)] = float(value)
    return out


def _sampling_params(
    b: _Body,
    max_tokens: int | None,
    num_logprobs: int | None,
    structured=None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    asked = b.integer("prompt_logprobs")
    if asked is not None:
        prompt_logprobs = _num_logprobs("prompt_logprobs", asked)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=b.number("temperature", 1.0),
            top_p=b.number("top_p", 1.0),
            top_k=b.integer("top_k", 0),
            min_p=b.number("min_p", 0.0),
            seed=b.integer("seed"),
            stop=_default(b.raw.get("stop"), []),
            stop_token_ids=_default(b.raw.get("stop_token_ids"), []),
            ignore_eos=b.flag("ignore_eos"),
            include_stop_str_in_output=b.flag("include_stop_str_in_output"),
            logprobs=num_logprobs,
            presence_penalty=b.number("presence_penalty", 0.0),
            frequency_penalty=b.number("frequency_penalty", 0.0),
            repetition_penalty=b.number("repetition_penalty", 1.0),
            logit_bias=_logit_bias(b),
            min_tokens=b.integer("min_tokens", 0),
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured,
        )
    except ValueError as exc:
        named = str(exc).split(" ", 1)[0]  # SamplingParams' messages start with the field
        raise InvalidField(named if named in _SAMPLING_FIELDS else None, str(exc)) from None


# -- responses -------------------------------------------------------------------------------


def error_body(
    message: str, error_type: str, status: int, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; `code` carries the HTTP status, as vLLM's does."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def router_error_body(exc: RouterError) -> dict[str, Any]:
    param = getattr(exc, "param", None)
    return error_body(str(exc), exc.error_type, exc.http_status, param)


def model_list(served: ServedModel) -> dict[str, Any]:
    card = {
        "id": served.name,
        "object": "model",
        "created": served.created,
        "owned_by": "pd-cluster",
        "root": served.name,
        "parent": None,
        "max_model_len": served.info.max_model_len,
        "vocab_size": served.info.vocab_size,  # extension: lets load generators build prompts
    }
    return {"object": "list", "data": [card]}


def timing_dict(timing: Timing) -> dict[str, Any]:
    keys = ("queue_s", "prefill_s", "transfer_s", "first_decode_s", "ttft_s", "e2e_s",
            "kv_bytes", "kv_reads", "kv_descriptors", "kv_read_s", "kv_hit_tokens",
            "local_prefill")  # fmt: skip
    return {key: getattr(timing, key) for key in keys}


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def merge_chunks(chunks: list[StreamChunk]) -> StreamChunk:
    """One request's whole stream as a single chunk (for non-streamed responses)."""
    if not chunks:
        raise RequestFailed("the router's stream ended without any output")
    last = chunks[-1]
    has_logprobs = all(c.logprobs is not None for c in chunks if c.token_ids)
    merged = StreamChunk(
        request_id=last.request_id,
        token_ids=[t for c in chunks for t in c.token_ids],
        text="".join(c.text for c in chunks),
        logprobs=[lp for c in chunks for lp in c.logprobs or []] if has_logprobs else None,
        top_logprobs=[tl for c in chunks for tl in c.top_logprobs or []] if has_logprobs else None,
        finished=last.finished,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        usage=last.usage,
        timing=last.timing,
    )
    merged.prompt_logprobs = chunks[0].prompt_logprobs
    merged.index = chunks[0].index
    return merged


class ResponseFormatter:
    """Turns one request's StreamChunks into OpenAI objects; one instance per request.

    Streaming: `opening_chunks()`, then `stream_chunk(c)` per router chunk (None: nothing to
    send), then `usage_chunk(u)` when include_usage. Otherwise `response(chunks)`.
    """

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, request: OpenAIRequest, served: ServedModel) -> None:
        self.request = request
        self.id = f"{self.id_prefix}-{request.request_id}"
        self.created = int(time.time())
        self._model = served.name
        self._tokenizer = served.tokenizer
        self._token_text: dict[int, str] = {}
        self._started: set[int] = set()  # choices whose first chunk went out
        self._usages: dict[int, Usage] = {}  # each finished choice's

    def _first(self, chunk: StreamChunk) -> bool:
        """Whether `chunk` is its choice's first (and mark it seen)."""
        first = chunk.index not in self._started
        self._started.add(chunk.index)
        return first

    @staticmethod
    def for_request(request: OpenAIRequest, served: ServedModel) -> ResponseFormatter:
        cls = ChatFormatter if request.kind == "chat" else CompletionFormatter
        return cls(request, served)

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def stream_chunk(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if chunk.usage is not None:
            self._usages[chunk.index] = chunk.usage
        wants_logprobs = self.request.num_logprobs is not None and chunk.token_ids
        if not (chunk.text or chunk.finished or wants_logprobs):
            return None
        return self._envelope(self.chunk_object_name, [self._choice(chunk, delta=True)])

    def usage_chunk(self, usage: Usage, timing: Timing | None = None) -> dict[str, Any]:
        envelope = self._envelope(self.chunk_object_name, [])
        envelope["usage"] = usage_dict(_total_usage(list(self._usages.values())) or usage)
        if timing is not None:  # extension: the server's TTFT breakdown (clients ignore it)
            envelope["timing"] = timing_dict(timing)
        return envelope

    def response(self, chunks: list[StreamChunk]) -> dict[str, Any]:
        by_index: dict[int, list[StreamChunk]] = {}
        for chunk in chunks:
            by_index.setdefault(chunk.index, []).append(chunk)
        merged = [merge_chunks(by_index[i]) for i in sorted(by_index)]
        choices = [self._choice(m, delta=False) for m in merged]
        envelope = self._envelope(self.object_name, choices)
        usages = [m.usage or Usage(0, len(m.token_ids)) for m in merged]
        envelope["usage"] = usage_dict(_total_usage(usages) or Usage(0, 0))
        return envelope

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        envelope = {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self._model,
            "choices": choices,
        }
        if self.request.stream and self.request.include_usage:
            envelope["usage"] = None  # OpenAI: null on every chunk but the usage one
        return envelope

    def _choice(self, chunk: StreamChunk, delta: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _token_str(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _prompt_logprobs(self, chunk: StreamChunk) -> list[dict[str, Any] | None] | None:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob,
        rank, decoded_token}} of the prompt's own token and the top alternatives."""
        if chunk.prompt_logprobs is None:
            return None
        ids = self._prompt_ids()
        out: list[dict[str, Any] | None] = []
        for token_id, entry in zip(ids, chunk.prompt_logprobs, strict=False):
            if entry is None:
                out.append(None)
                continue
            logprob, top = entry
            item = {str(token_id): self._logprob_entry(token_id, logprob, None)}
            for rank, (alt, alt_logprob) in enumerate(top, 1):
                item.setdefault(str(alt), self._logprob_entry(alt, alt_logprob, rank))
            out.append(item)
        return out

    def _logprob_entry(self, token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _finite(logprob), "rank": rank,
                "decoded_token": self._token_str(token_id)}  # fmt: skip

    def _prompt_ids(self) -> list[int]:
        prompt = self.request.input.prompt
        return self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


class CompletionFormatter(ResponseFormatter):
    object_name = "text_completion"
    chunk_object_name = "text_completion"  # OpenAI streams completions under the same name
    id_prefix = "cmpl"

    def __init__(self, request: OpenAIRequest, served: ServedModel) -> None:
        super().__init__(request, served)
        self._num_chars_sent: dict[int, int] = {}  # per choice: text_offset runs on

    def stream_chunk(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if chunk.index not in self._started and self.request.echo_prompt is not None:
            if chunk.usage is not None:
                self._usages[chunk.index] = chunk.usage
            return self._envelope(self.chunk_object_name, [self._choice(chunk, delta=True)])
        return super().stream_chunk(chunk)

    def _choice(self, chunk: StreamChunk, delta: bool) -> dict[str, Any]:
        first = self._first(chunk)
        echo = first and self.request.echo_prompt is not None
        text = (self._echo_text() if echo else "") + chunk.text
        choice = {
            "index": chunk.index,
            "text": text,
            "logprobs": self._logprobs(chunk, echo),
            "finish_reason": chunk.finish_reason if chunk.finished else None,
            "stop_reason": chunk.stop_reason if chunk.finished else None,
        }
        if first and chunk.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(chunk)
        self._num_chars_sent[chunk.index] = self._num_chars_sent.get(chunk.index, 0) + len(text)
        return choice

    def _echo_text(self) -> str:
        prompt = self.request.echo_prompt
        return prompt if isinstance(prompt, str) else self._tokenizer.decode(prompt)

    def _logprobs(self, chunk: StreamChunk, echo: bool = False) -> dict[str, Any] | None:
        """OpenAI's legacy shape; top_logprobs holds the sampled token plus the top N. With
        echo the prompt's tokens come first (the first one has no logprob: null)."""
        if self.request.num_logprobs is None or chunk.logprobs is None:
            return None
        tokens, offsets, tops, token_logprobs = [], [], [], []
        offset = self._num_chars_sent.get(chunk.index, 0)
        entries: list[tuple[int, float | None, list[tuple[int, float]]]] = []
        if echo:
            prompt_logprobs = chunk.prompt_logprobs or []
            for j, token_id in enumerate(self._prompt_ids()):
                entry = prompt_logprobs[j] if j < len(prompt_logprobs) else None
                entries.append((token_id, *(entry if entry else (None, []))))
        for i, token_id in enumerate(chunk.token_ids):
            alternatives = _alternatives(chunk, i, self.request.num_logprobs)
            entries.append((token_id, chunk.logprobs[i], alternatives))
        for token_id, logprob, alternatives in entries:
            token = self._token_str(token_id)
            top = None
            if logprob is not None:
                top = {token: _finite(logprob)}
                for alt_id, alt_logprob in alternatives[: self.request.num_logprobs]:
                    top.setdefault(self._token_str(alt_id), _finite(alt_logprob))
            tokens.append(token)
            offsets.append(offset)
            tops.append(top)
            token_logprobs.append(None if logprob is None else _finite(logprob))
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


class ChatFormatter(ResponseFormatter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening_chunks(self) -> list[dict[str, Any]]:
        """The assistant role, one chunk per choice (as OpenAI streams n > 1)."""
        return [
            self._envelope(self.chunk_object_name, [{
                "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}])
            for i in range(self.request.input.n)
        ]  # fmt: skip

    def __init__(self, request: OpenAIRequest, served: ServedModel) -> None:
        super().__init__(request, served)
        self._tool_streams: dict[int, ToolStream] = {}  # per choice (tool_choice auto)
        self._held: dict[int, str] = {}  # per choice: a forced tool choice's output, held

    def stream_chunk(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if self.request.tools is None:
            return super().stream_chunk(chunk)
        if chunk.usage is not None:
            self._usages[chunk.index] = chunk.usage
        choice = self._choice(chunk, delta=True)
        if not (choice["delta"] or chunk.finished or choice["logprobs"]):
            return None
        return self._envelope(self.chunk_object_name, [choice])

    def _choice(self, chunk: StreamChunk, delta: bool) -> dict[str, Any]:
        first = self._first(chunk)
        content, calls = self._content_and_calls(chunk, delta)
        finish_reason = chunk.finish_reason if chunk.finished else None
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        if delta:
            body_key, body = "delta", ({"content": content} if content else {})
            if calls:
                body["tool_calls"] = [c.to_openai(i) for i, c in enumerate(calls)]
        else:
            body_key, body = "message", {"role": "assistant", "content": content}
            if calls:
                body["tool_calls"] = [c.to_openai() for c in calls]
                body["content"] = content or None
        choice = {
            "index": chunk.index,
            body_key: body,
            "logprobs": self._logprobs(chunk),
            "finish_reason": finish_reason,
            "stop_reason": chunk.stop_reason if chunk.finished else None,
        }
        if first and chunk.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(chunk)
        return choice

    def _content_and_calls(self, chunk: StreamChunk, delta: bool) -> tuple[str, list[ToolCall]]:
        """The content to send for this chunk and, once the output is whole, its tool calls."""
        tools = self.request.tools
        if tools is None:
            return chunk.text, []
        if tools.forced:
            held = self._held[chunk.index] = self._held.get(chunk.index, "") + chunk.text
            if not chunk.finished:
                return "", []
            return "", parse_forced(held, tools.named)
        if not delta:  # the whole output at once
            content, calls = tools.parser.parse(chunk.text)
            return content or "", calls
        stream = self._tool_streams.get(chunk.index)
        if stream is None:
            stream = self._tool_streams[chunk.index] = ToolStream(tools.parser)
        content = stream.feed(chunk.text)
        if not chunk.finished:
            return content, []
        rest, calls = stream.finish()
        return content + rest, calls

    def _logprobs(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if self.request.num_logprobs is None or chunk.logprobs is None:
            return None
        content = []
        for i, token_id in enumerate(chunk.token_ids):
            entry = self._entry(token_id, chunk.logprobs[i])
            alternatives = _alternatives(chunk, i, self.request.num_logprobs)
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in alternatives]
            content.append(entry)
        return {"content": content}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token_str(token_id)
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}


def _total_usage(usages: list[Usage]) -> Usage | None:
    """n > 1: the prompt once, every choice's completion tokens."""
    if not usages:
        return None
    return Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages),
                 max(u.cached_tokens for u in usages))  # fmt: skip


def _alternatives(chunk: StreamChunk, i: int, num: int) -> list[tuple[int, float]]:
    if not num or chunk.top_logprobs is None or i >= len(chunk.top_logprobs):
        return []
    return list(chunk.top_logprobs[i][:num])


def _finite(logprob: float) -> float:
    return max(logprob, _LOGPROB_FLOOR) if not math.isnan(logprob) else _LOGPROB_FLOOR
