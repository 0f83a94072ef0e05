"""OpenAI's /v1/completions and /v1/chat/completions, translated both ways: a JSON body becomes
one `GenerateInput`; the router's `StreamChunk`s become OpenAI's response objects and stream
chunks, in shapes the official `openai` client parses unchanged.

Part of the router's HTTP front end (docs/architecture.md: router/): http_server.py does the
I/O, this module only the shapes. Names, defaults and extensions (top_k, min_p, ignore_eos,
stop_token_ids, priority...) follow vLLM's OpenAI server. Whatever we cannot honour (n > 1,
penalties, tools...) is a 400 naming the field rather than silently ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from cluster.router.chat_template import ChatTemplate, parse_messages
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
from cluster.router.validation import brief

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
_LOGPROB_FLOOR = -9999.0  # what OpenAI sends for -inf: JSON has no infinity
_SAMPLING_FIELDS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "logprobs",
}  # fmt: skip


_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                  "structured_outputs")  # fmt: skip


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

    @classmethod
    def from_router(cls, router: Any) -> ServedModel:
        template = ChatTemplate.from_tokenizer(router.tokenizer)
        return cls(router.model_info, router.tokenizer, template)

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

    @property
    def request_id(self) -> str:
        return self.input.request_id or ""


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
    _refuse_unsupported(b)
    if b.flag("echo"):
        raise InvalidField("echo", "echo is not supported")
    if b.string("suffix"):
        raise InvalidField("suffix", "suffix is not supported")
    prompt = _completion_prompt(b.raw.get("prompt"), served.info.vocab_size)
    num_logprobs = _num_logprobs("logprobs", b.integer("logprobs"))
    max_tokens = b.integer("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    params = _sampling_params(b, max_tokens, num_logprobs)
    return _request("completion", b, prompt, params, model, request_id, num_logprobs)


def parse_chat_request(
    body: object, served: ServedModel, request_id: str | None = None
) -> OpenAIRequest:
    """A /v1/chat/completions body → OpenAIRequest; the prompt goes out as token ids."""
    b = _Body(body)
    model = _check_model(b, served)
    _refuse_unsupported(b)
    _refuse_unsupported_chat(b)
    if served.chat_template is None:
        raise InvalidRequest(
            f"model {served.name!r} has no chat template, so it cannot serve "
            "/v1/chat/completions; send a plain prompt to /v1/completions instead"
        )
    messages = parse_messages(b.raw.get("messages"))
    text = served.chat_template.render(messages, b.flag("add_generation_prompt", True))
    # The template already placed every special token it wants (vLLM and HF do the same).
    prompt_ids = list(served.tokenizer.hf.encode(text, add_special_tokens=False))
    if not prompt_ids:
        raise InvalidRequest("the chat template rendered these messages as an empty prompt")
    num_logprobs = _chat_num_logprobs(b)
    max_tokens = b.integer("max_completion_tokens", b.integer("max_tokens"))
    if max_tokens is None:
        max_tokens = _remaining_context(served.info.max_model_len, len(prompt_ids))
    params = _sampling_params(b, max_tokens, num_logprobs)
    return _request("chat", b, prompt_ids, params, model, request_id, num_logprobs)


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
    return OpenAIRequest(kind, inp, stream, include_usage, num_logprobs)


def _check_model(b: _Body, served: ServedModel) -> str:
    model = b.string("model")
    if model not in (None, "", served.name):
        raise InvalidField("model", f"model {brief(model)} is not served here; use {served.name!r}")
    return served.name


def _refuse_unsupported(b: _Body) -> None:
    """Fields both endpoints share that we cannot honour except at their neutral value."""
    if b.integer("n", 1) != 1:
        raise InvalidField("n", "n must be 1: one choice per request (send n requests instead)")
    if b.integer("best_of", 1) != 1:
        raise InvalidField("best_of", "best_of is not supported (must be 1)")
    for name in ("presence_penalty", "frequency_penalty"):
        if b.number(name, 0.0) != 0.0:
            raise InvalidField(name, f"{name} is not supported (must be 0)")
    if b.number("repetition_penalty", 1.0) != 1.0:
        raise InvalidField("repetition_penalty", "repetition_penalty is not supported (must be 1)")
    if b.mapping("logit_bias"):
        raise InvalidField("logit_bias", "logit_bias is not supported")
    if b.integer("min_tokens", 0) != 0:
        raise InvalidField("min_tokens", "min_tokens is not supported (must be 0)")
    response_format = _Body(b.mapping("response_format") or {}).string("type", "text")
    if response_format != "text":
        raise InvalidField("response_format", "only response_format type 'text' is supported")
    for name in _GUIDED_FIELDS:  # vLLM's structured-output extensions: refused, not ignored
        if b.raw.get(name) is not None:
            raise InvalidField(name, f"{name} is not supported (no structured outputs yet)")
    if b.raw.get("prompt_logprobs") is not None:
        raise InvalidField("prompt_logprobs", "prompt_logprobs is not supported")


def _refuse_unsupported_chat(b: _Body) -> None:
    for name in ("tools", "functions"):
        if b.get(name, list, None, "a list"):
            raise InvalidField(name, f"{name} are not supported (no tool calling)")
    if b.raw.get("tool_choice") not in (None, "none", "auto"):
        raise InvalidField("tool_choice", "tool_choice is not supported (no tool calling)")
    if b.flag("continue_final_message"):
        raise InvalidField("continue_final_message", "continue_final_message is not supported")


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


def _sampling_params(b: _Body, max_tokens: int | None, num_logprobs: int | None) -> SamplingParams:
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
    return StreamChunk(
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

    @staticmethod
    def for_request(request: OpenAIRequest, served: ServedModel) -> ResponseFormatter:
        cls = ChatFormatter if request.kind == "chat" else CompletionFormatter
        return cls(request, served)

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def stream_chunk(self, chunk: StreamChunk) -> dict[str, Any] | None:
        wants_logprobs = self.request.num_logprobs is not None and chunk.token_ids
        if not (chunk.text or chunk.finished or wants_logprobs):
            return None
        return self._envelope(self.chunk_object_name, [self._choice(chunk, delta=True)])

    def usage_chunk(self, usage: Usage, timing: Timing | None = None) -> dict[str, Any]:
        envelope = self._envelope(self.chunk_object_name, [])
        envelope["usage"] = usage_dict(usage)
        if timing is not None:  # extension: the server's TTFT breakdown (clients ignore it)
            envelope["timing"] = timing_dict(timing)
        return envelope

    def response(self, chunks: list[StreamChunk]) -> dict[str, Any]:
        merged = merge_chunks(chunks)
        envelope = self._envelope(self.object_name, [self._choice(merged, delta=False)])
        usage = merged.usage or Usage(0, len(merged.token_ids))
        envelope["usage"] = usage_dict(usage)
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


class CompletionFormatter(ResponseFormatter):
    object_name = "text_completion"
    chunk_object_name = "text_completion"  # OpenAI streams completions under the same name
    id_prefix = "cmpl"

    def __init__(self, request: OpenAIRequest, served: ServedModel) -> None:
        super().__init__(request, served)
        self._num_chars_sent = 0  # text_offset runs on across stream chunks

    def _choice(self, chunk: StreamChunk, delta: bool) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": chunk.text,
            "logprobs": self._logprobs(chunk),
            "finish_reason": chunk.finish_reason if chunk.finished else None,
            "stop_reason": chunk.stop_reason if chunk.finished else None,
        }
        self._num_chars_sent += len(chunk.text)
        return choice

    def _logprobs(self, chunk: StreamChunk) -> dict[str, Any] | None:
        """OpenAI's legacy shape; top_logprobs holds the sampled token plus the top N."""
        if self.request.num_logprobs is None or chunk.logprobs is None:
            return None
        tokens, offsets, tops = [], [], []
        offset = self._num_chars_sent
        for i, token_id in enumerate(chunk.token_ids):
            token = self._token_str(token_id)
            top = {token: _finite(chunk.logprobs[i])}
            for alt_id, alt_logprob in _alternatives(chunk, i, self.request.num_logprobs):
                top.setdefault(self._token_str(alt_id), _finite(alt_logprob))
            tokens.append(token)
            offsets.append(offset)
            tops.append(top)
            offset += len(token)
        token_logprobs = [_finite(lp) for lp in chunk.logprobs]
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
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self._envelope(self.chunk_object_name, [choice])]

    def _choice(self, chunk: StreamChunk, delta: bool) -> dict[str, Any]:
        if delta:
            body_key, body = "delta", ({"content": chunk.text} if chunk.text else {})
        else:
            body_key, body = "message", {"role": "assistant", "content": chunk.text}
        return {
            "index": 0,
            body_key: body,
            "logprobs": self._logprobs(chunk),
            "finish_reason": chunk.finish_reason if chunk.finished else None,
            "stop_reason": chunk.stop_reason if chunk.finished else None,
        }

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


def _alternatives(chunk: StreamChunk, i: int, num: int) -> list[tuple[int, float]]:
    if not num or chunk.top_logprobs is None or i >= len(chunk.top_logprobs):
        return []
    return list(chunk.top_logprobs[i][:num])


def _finite(logprob: float) -> float:
    return max(logprob, _LOGPROB_FLOOR) if not math.isnan(logprob) else _LOGPROB_FLOOR
