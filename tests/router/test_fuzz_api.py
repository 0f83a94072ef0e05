"""Hypothesis fuzzing of both public APIs of a running `cluster serve` (one process for the
module: tiny model, disaggregated, 1 prefill + 1 decode): hostile JSON bodies, headers and raw
bytes on /v1/completions and /v1/chat/completions, extreme `GenerateRequest`s on gRPC
Generate/Complete (plus invalid UTF-8 spliced into the wire bytes, which protobuf will not
build) and odd Abort ids.

Invariants, per example:
- an answer comes, within TIMEOUT_S: HTTP 2xx/4xx; gRPC neither INTERNAL, UNKNOWN, DATA_LOSS,
  UNAVAILABLE nor DEADLINE_EXCEEDED (a message gRPC cannot parse included);
- a 200 event stream ends with [DONE] and carries no 5xx error event;
- no answer carries more than MAX_LOGPROBS alternatives per token (HTTP's cap; gRPC shares it);
- afterwards the baseline greedy request still returns the text it returned at start-up.
At the end of each test the baseline holds on both APIs and /health is 200.

A request that kills an engine makes every later request fail for the same reason, so
hypothesis must not see the failure (it would shrink to an innocent body): each failure is
recorded with its input and answer, a broken cluster is restarted, and the test fails at its
end listing every distinct failure. Values carry labels (`Hostile`), so a 1 MiB string prints
as its name. CI runs EXAMPLES examples per test, derandomized; `PD_CLUSTER_FUZZ=long` enables
the `slow` tests, LONG_EXAMPLES per API with fresh randomness.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("ray")
pytest.importorskip("nixl")

# ~25 s: a `cluster serve` process and EXAMPLES examples per test (the hostile inputs that
# matter most are asserted in test_hardening.py, which `make test-fast` keeps).
pytestmark = pytest.mark.slow

import grpc  # noqa: E402

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb  # noqa: E402
from cluster.engine.sampling_params import MAX_LOGPROBS  # noqa: E402

TIMEOUT_S = 60.0  # no answer within this is a hang
EXAMPLES = 120  # per fuzz test in CI
LONG_EXAMPLES = 3000
LONG = os.environ.get("PD_CLUSTER_FUZZ") == "long"
PROMPT = "The capital of France is"
BASELINE = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
MIB = 1 << 20
EXPECT_CONTINUE_BYTES = MIB  # larger bodies wait for 100 Continue, as curl's do
BAD_GRPC_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def fuzz_settings(long: bool) -> settings:
    return settings(
        max_examples=LONG_EXAMPLES if long else EXAMPLES,
        derandomize=not long,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # failures are recorded, never shrunk
        suppress_health_check=list(HealthCheck),
        print_blob=long,
    )


# -- labelled values ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Hostile:
    """A value that prints as its label and is built only when first sent. For HTTP bodies the
    value is raw JSON text (so it can hold what json.dumps cannot write: 10**5000, 1e400);
    for headers and raw bodies, bytes; for gRPC, the field's Python value."""

    label: str
    build: Callable[[], Any]

    def __repr__(self) -> str:
        return self.label

    @cached_property
    def value(self) -> Any:
        return self.build()


def fixed(label: str, value: Any) -> Hostile:
    return Hostile(label, lambda: value)


def drawn(value: Any, as_json: bool) -> Hostile:
    text = _json(value) if as_json else value
    label = repr(value)
    return fixed(label if len(label) <= 80 else label[:77] + "...", text)


def _json(value: Any) -> str:
    """JSON text, ASCII only: a lone surrogate travels as its \\ud800 escape."""
    return json.dumps(value, ensure_ascii=True)


def _ids(n: int) -> str:
    return "[" + ",".join(str(i % 512) for i in range(n)) + "]"


def _deep(n: int, opening: str, leaf: str, closing: str) -> str:
    return opening * n + leaf + closing * n


# JSON texts for any field: each one broke (or could break) a parser, a check or a worker.
JSON_VALUES = [
    fixed("lone high surrogate", r'"\ud800"'),
    fixed("lone low surrogate in text", r'"ab\udfffcd"'),
    fixed("reversed surrogate pair", r'"\udc00\ud800"'),
    fixed("NUL and control chars", _json("a\x00b\x01\x1b[2J\x1f\x7f\x85\u2028")),
    fixed("RTL and combining marks", _json("\u202eabc\u0301\u0336\u200d\ufeff\U0001f600")),
    fixed("empty string", '""'),
    Hostile("1 MiB string", lambda: '"' + "a" * MIB + '"'),
    Hostile("10k lone surrogates", lambda: '"' + r"\ud800" * 10_000 + '"'),
    fixed("10**5000", "1" + "0" * 5000),
    fixed("-10**5000", "-1" + "0" * 5000),
    fixed("10**5000 as float", "1" + "0" * 5000 + ".0"),
    *(fixed(label, str(n)) for label, n in [("2**63", 2**63), ("2**64", 2**64), ("2**31", 2**31),
      ("2**32-1", 2**32 - 1), ("-2**31-1", -(2**31) - 1), ("-2**63", -(2**63))]),
    *(fixed(text, text) for text in ["-1", "0", "1", "1e400", "-1e400", "NaN", "Infinity",
      "-Infinity", "-0.0", "1e-320", "0.5", "1.5", "null", "true", "false", "[]", "{}"]),
    fixed("mixed list", r'[1, "a", null, {}, [], true, 1.5, "\ud800"]'),
    fixed("object", r'{"type": "text", "text": "\ud800", "": null}'),
    fixed("10000-deep list", _deep(10_000, "[", "", "]")),
    fixed("10000-deep object", _deep(10_000, '{"a":', "1", "}")),
    fixed("500-deep list", _deep(500, "[", "1", "]")),
    Hostile("100k stop strings", lambda: _json([f"s{i}" for i in range(100_000)])),
    Hostile("1M token ids", lambda: _ids(1_000_000)),
    Hostile("100k out-of-vocab ids", lambda: _json(list(range(512, 100_512)))),
    fixed("surrogate in a list", r'["\ud800"]'),
    fixed("NUL in a list", r'["\u0000"]'),
]  # fmt: skip

# Near-valid values per field, so that fuzzing reaches past the first type check.
FIELD_VALUES = {
    "prompt": ["[1, 2, 3]", "[[1, 2]]", '["a", "b"]', '["a"]', "[512]", "[-1]", "[true]",
               "[1.5]", "[[]]", '[""]', r'["\ud800"]', r'"\u0000"'],
    "messages": [r'[{"role": "user", "content": "\ud800"}]', '[{"role": "user"}]',
                 '[{"content": "hi"}]', '[{"role": "user", "content": null}]',
                 '[{"role": "tool", "content": "x", "tool_call_id": "1"}]',
                 '[{"role": "user", "content": "x", "tool_calls": [{}]}]',
                 r'[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]',
                 '[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]'],
    "role": ['"system"', '"assistant"', '"tool"', '"developer"', '"user "', '"USER"', '"\\n"'],
    "content": [r'[{"type": "text", "text": "\ud800"}]', '[{"type": "text"}]', "[{}]",
                '[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]'],
    "name": ['"fuzz"', r'"\ud800"', '"{{ 7 * 7 }}"', '"{% raw %}"'],
    "max_tokens": ["1", "2", "2047", "2048", "2049"],
    "max_completion_tokens": ["1", "2047", "2048"],
    "logprobs": ["0", "5", "20", "21", "true"],
    "top_logprobs": ["0", "20", "21"],
    "stop": [r'["\ud800"]', r'"\u0000"', '["\\n", ""]', '["a", 1]', '"e"'],
    "stop_token_ids": ["[1, 2]", "[-1]", "[512]", "[4294967296]", "[1.0]", '["1"]'],
    "stream_options": ['{"include_usage": true}', '{"include_usage": "yes"}', r'{"\ud800": 1}',
                       '{"include_usage": true, "continuous_usage_stats": true}'],
    "response_format": ['{"type": "json_object"}', '{"type": "text"}', r'{"type": "\ud800"}',
                        '{"type": "json_schema", "json_schema": {}}'],
    "tool_choice": ['"none"', '"auto"', '"required"', '{"type": "function"}'],
    "tools": ['[{"type": "function", "function": {"name": "f"}}]'],
    "logit_bias": ['{"1": 100}', '{"x": 1e400}', r'{"\ud800": 1}'],
    "model": ['"gpt-4"', '"tiny-llama-v1 "', '"../../etc/passwd"'],
    "seed": ["0", str(2**63 - 1)],
    "temperature": ["0", "1e-6", "1e-5", "2", "1e308"],
    "top_p": ["1e-320", "1", "1.0000001"],
    "top_k": ["-1", "1", "512", "513"],
    "priority": [str(2**31), str(-(2**31)), str(10**30)],
    "cache_salt": ['"tenant-a"', r'"\u0000"', r'"\ud800"'],
}  # fmt: skip

# Odd values the API should accept: they reach the workers, where a lone surrogate in a cache
# salt once killed every engine. Strings are valid Unicode; sizes are within the limits.
ODD_TEXTS = [
    _json("a\x00b\x01\x1b[2J\x1f\x7f\x85\u2028"),
    _json("\u202eabc\u0301\u0336\u200d\ufeff\U0001f600"),
    _json("\U0010ffff\ufffe\ufdd0 \t\r\n"),
    _json("{{ messages }}{% for m in messages %}x{% endfor %}"),
    _json("<|im_start|></s><s>[INST]"),
    '"x"',
]
ACCEPTED = {
    "prompt": [*ODD_TEXTS, "[0]", "[511]", "[1, 2, 3]", '["one prompt in a list"]', "[[5, 6]]"],
    "content": [*ODD_TEXTS, '[{"type": "text", "text": "a"}, {"type": "text", "text": "\\u0000"}]'],
    "name": ODD_TEXTS,
    "role": ['"system"', '"assistant"', '"user"'],
    "cache_salt": [*ODD_TEXTS, '""', _json("s" * 256)],
    "user": ODD_TEXTS,
    "stop": ['["\\n"]', '"e"', '["\\u0000"]', r'["\u202e"]', _json(["x" * 512] * 16)],
    "stop_token_ids": ["[0]", "[511]", _json(list(range(64)))],
    "max_tokens": ["1", "2", "16"],
    "max_completion_tokens": ["1", "16"],
    "temperature": ["0", "1e-6", "1e-5", "0.5", "2", "1e308"],
    "top_p": ["1e-320", "0.5", "1"],
    "top_k": ["-1", "0", "1", "511", "512", str(2**31 - 1)],
    "min_p": ["0", "0.999", "1"],
    "seed": ["0", "12345", str(2**63 - 1)],
    "priority": [str(-(2**31)), "0", str(2**31 - 1)],
    "ignore_eos": ["true"],
    "include_stop_str_in_output": ["true"],
    "n": ["1"],
    "best_of": ["1"],
    "presence_penalty": ["0"],
    "frequency_penalty": ["0.0"],
    "logit_bias": ["{}"],
    "response_format": ['{"type": "text"}'],
    "tool_choice": ['"none"', '"auto"'],
    "tools": ["[]"],
    "echo": ["false"],
    "suffix": ['""'],
    "add_generation_prompt": ["true", "false"],
}

SHARED_FIELDS = [
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "logprobs", "n", "best_of", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos", "include_stop_str_in_output",
    "priority", "cache_salt", "stream", "stream_options", "user", "response_format", "echo",
    "suffix", "guided_json", "prompt_logprobs", "__proto__", "",
]  # fmt: skip
COMPLETION_FIELDS = [*SHARED_FIELDS, "prompt"]
CHAT_FIELDS = [
    *SHARED_FIELDS, "messages", "messages.0", "messages.1", "messages.1.role",
    "messages.1.content", "messages.1.name", "messages.0.content", "messages.1.tool_calls",
    "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
    "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
]  # fmt: skip

# Whole bodies that are not one JSON object in UTF-8.
RAW_BODIES = [
    fixed("empty body", b""),
    fixed("not JSON", b"hello"),
    fixed("truncated JSON", b'{"prompt": "The capital'),
    fixed("invalid UTF-8 in a string", b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
    fixed("UTF-8-encoded surrogate", b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}'),
    fixed("overlong NUL", b'{"prompt": "a\xc0\x80", "max_tokens": 2}'),
    fixed("raw NUL byte", b'{"prompt": "a\x00b", "max_tokens": 2}'),
    fixed("UTF-16 JSON", '{"prompt": "hi", "max_tokens": 2}'.encode("utf-16")),
    fixed("BOM then JSON", b'\xef\xbb\xbf{"prompt": "hi", "max_tokens": 2}'),
    fixed("duplicate keys", b'{"prompt": "hi", "prompt": "\\ud800", "max_tokens": 2}'),
    fixed("trailing garbage", b'{"prompt": "hi", "max_tokens": 2} x'),
    fixed("a JSON list", b'[{"prompt": "hi"}]'),
    fixed("a JSON string", b'"hi"'),
    fixed("JSON null", b"null"),
    fixed("JSON NaN", b"NaN"),
    fixed("top-level 10**5000", b"1" + b"0" * 5000),
    fixed("top-level 10000-deep list", _deep(10_000, "[", "", "]").encode()),
    fixed("top-level 10000-deep object", _deep(10_000, '{"a":', "1", "}").encode()),
    Hostile("2 MiB of whitespace", lambda: b'{"prompt": "hi",' + b" " * 2 * MIB + b'"x": 1}'),
]

HEADERS = [
    (b"X-Request-Id", Hostile("1 MiB request id", lambda: b"r" * MIB)),
    (b"X-Request-Id", fixed("64 KiB request id", b"r" * 65536)),
    (b"X-Request-Id", fixed("empty request id", b"")),
    (b"X-Request-Id", fixed("latin-1 bytes", b"\xff\xfe\xe9")),
    (b"X-Request-Id", fixed("UTF-8 RTL mark", "\u202eid".encode())),
    (b"X-Request-Id", fixed("tab and spaces", b"a\tb  c")),
    (b"X-Request-Id", fixed("hash like an attempt id", b"x#1")),
    (b"Content-Type", fixed("text/plain", b"text/plain")),
    (b"Content-Type", fixed("json as UTF-16", b"application/json; charset=utf-16")),
    (b"Content-Type", fixed("multipart", b"multipart/form-data; boundary=x")),
    (b"Authorization", fixed("non-ASCII bearer", b"Bearer \xff")),
]

_surrogate = st.characters(categories=["Cs"])
hostile_text = st.text(st.one_of(st.characters(exclude_categories=()), _surrogate), max_size=12)
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json.dumps writes NaN/Infinity
    | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=8,
)


@functools.cache
def field_value(name: str) -> st.SearchStrategy[Hostile]:
    leaf = name.rsplit(".", 1)[-1]
    near = [fixed(_label(text), text) for text in FIELD_VALUES.get(leaf, [])]
    choices = [st.sampled_from(JSON_VALUES), json_like.map(lambda v: drawn(v, as_json=True))]
    if near:
        choices.insert(0, st.sampled_from(near))
    return st.one_of(choices)


# -- HTTP cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    text: str


@dataclass(frozen=True)
class HttpCase:
    path: str  # /v1/completions or /v1/chat/completions
    stream: bool
    changes: tuple[tuple[str, Hostile], ...] = ()  # dotted field path -> value
    headers: tuple[tuple[bytes, Hostile], ...] = ()
    raw_body: Hostile | None = None  # replaces the whole body

    def __repr__(self) -> str:
        parts = [f"POST {self.path}", f"stream={self.stream}"]
        parts += [f"{name or repr(name)}={value!r}" for name, value in self.changes]
        parts += [f"{name.decode()}: {value!r}" for name, value in self.headers]
        if self.raw_body is not None:
            parts.append(f"body={self.raw_body!r}")
        return f"<{', '.join(parts)}>"

    def body(self, model: str) -> bytes:
        if self.raw_body is not None:
            return self.raw_body.value
        body = base_body(self.path, model, self.stream)
        for name, value in self.changes:
            _set(body, name, Raw(value.value))
        return _encode(body).encode()


def base_body(path: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 4, "stream": stream}
    if path.endswith("chat/completions"):
        body["messages"] = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": PROMPT, "name": "fuzz"},
        ]
        body["max_completion_tokens"] = 4  # takes precedence: both must go for a long answer
    else:
        body["prompt"] = PROMPT
    return body


def _set(body: dict, dotted: str, value: Raw) -> None:
    """body[a][b][c] = value for "a.b.c" (list indices as digits); a path whose parent was
    replaced by an earlier change is skipped."""
    *parents, last = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node: Any = body
    for key in parents:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int)):
        if isinstance(node, list) and last >= len(node):
            return
        node[last] = value


def _encode(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(str(k))}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return _json(value)


def _label(text: str) -> str:
    return text if len(text) <= 80 else f"{text[:40]}... ({len(text)} chars)"


@st.composite
def http_cases(draw, path: str, fields: list[str]) -> HttpCase:
    """A valid body with up to three fields set to odd values it should accept, then up to
    two fields (known or not) set to hostile values; now and then a hostile header, or a raw
    body instead. Without hostile changes the request must reach the workers."""
    leaf = {f: f.rsplit(".", 1)[-1] for f in fields}
    odd = st.sampled_from([f for f in fields if leaf[f] in ACCEPTED])
    changes = [
        (name, draw(st.sampled_from([fixed(_label(t), t) for t in ACCEPTED[leaf[name]]])))
        for name in draw(st.lists(odd, max_size=3, unique=True))
    ]
    unknown = hostile_text.filter(lambda name: name not in fields)
    name = st.sampled_from([*fields, None]).flatmap(lambda n: unknown if n is None else st.just(n))
    changes += [(n, draw(field_value(n))) for n in draw(st.lists(name, max_size=2, unique=True))]
    headers = tuple(draw(st.lists(st.sampled_from(HEADERS), max_size=1)))
    raw_body = draw(st.sampled_from(RAW_BODIES)) if draw(st.integers(0, 5)) == 5 else None
    stream = draw(st.booleans())
    if stream and draw(st.booleans()):
        changes.append(
            ("stream_options", fixed("{include_usage: true}", '{"include_usage": true}'))
        )
    return HttpCase(path, stream, tuple(changes), headers, raw_body)


def _case(path: str, stream: bool = False, **changes: str) -> HttpCase:
    """An explicit case: field name -> label of a JSON_VALUES entry."""
    by_label = {h.label: h for h in JSON_VALUES}
    pairs = tuple((k.replace("__", "."), by_label[v]) for k, v in changes.items())
    return HttpCase(path, stream, pairs)


# -- a tiny HTTP/1.1 client: raw bytes out, huge headers back, one deadline --------------------


@dataclass(slots=True)
class Answer:
    status: int  # 0: no answer
    headers: dict[str, str]
    body: bytes
    error: str = ""  # why there is no answer

    def brief(self) -> str:
        if not self.status:
            return f"no answer: {self.error}"
        return f"{self.status} {self.body[:300].decode(errors='replace')!r}"


def http_request(port: int, path: str, body: bytes, headers=(), method: str = "POST") -> Answer:
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    names = {name.lower() for name, _ in headers}
    if b"content-type" not in names:
        head.append(b"Content-Type: application/json")
    head += [b"Content-Length: %d" % len(body), *(name + b": " + value for name, value in headers)]
    expect = len(body) > EXPECT_CONTINUE_BYTES
    if expect:
        head.append(b"Expect: 100-continue")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
            answered, received = _await_continue(sock) if expect else (False, b"")
            if not answered:
                with contextlib.suppress(OSError):  # closed early: its answer is still to read
                    sock.sendall(body)
            raw = received + _read_until_closed(sock, deadline)
    except OSError as exc:  # includes timeouts
        return Answer(0, {}, b"", f"{type(exc).__name__}: {exc}")
    return _parse(raw)


def _await_continue(sock: socket.socket) -> tuple[bool, bytes]:
    """After headers with `Expect: 100-continue`: (True, what came) if the server answered
    already (a 413 before the body: sending it would only earn a reset that loses the answer),
    else (False, b"") once it said 100 Continue or kept quiet for a second (curl's rule)."""
    received = b""
    sock.settimeout(1.0)
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return True, received
            received += chunk
    except TimeoutError:
        return False, b""
    finally:
        sock.settimeout(TIMEOUT_S)
    if re.match(rb"HTTP/1\.[01] 100", received):
        return False, received.partition(b"\r\n\r\n")[2]
    return True, received


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError(f"still reading after {TIMEOUT_S:g} s")
    return b"".join(parts)


def _parse(raw: bytes) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not sep or not match:
        return Answer(0, {}, b"", f"not an HTTP response: {raw[:200]!r}")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Answer(int(match.group(1)), headers, body)


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = data.find(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0] or b"0", 16) if end >= 0 else 0
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


# -- invariants --------------------------------------------------------------------------------


def http_problem(answer: Answer) -> str | None:
    """What is wrong with one answer, or None."""
    if not answer.status:
        return answer.brief()
    if answer.status >= 500:
        return f"HTTP {answer.brief()}"
    if answer.status != 200:
        return None
    if "text/event-stream" in answer.headers.get("content-type", ""):
        return _stream_problem(answer.body)
    try:
        obj = json.loads(answer.body)
    except ValueError as exc:
        return f"200 with a body that is not JSON ({exc}): {answer.body[:200]!r}"
    return _logprobs_problem(obj)


def _stream_problem(body: bytes) -> str | None:
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return f"200 stream that does not end with [DONE]: ...{body[-300:]!r}"
    for event in events[:-1]:
        try:
            obj = json.loads(event)
        except ValueError:
            return f"200 stream with an event that is not JSON: {event[:200]!r}"
        code = (obj.get("error") or {}).get("code")
        if isinstance(code, int) and code >= 500:
            return f"200 stream with an error event: {event[:300].decode(errors='replace')!r}"
        if problem := _logprobs_problem(obj):
            return problem
    return None


def _logprobs_problem(obj: dict) -> str | None:
    for choice in obj.get("choices") or []:
        logprobs = choice.get("logprobs") or {}
        tops = [len(t or ()) - 1 for t in logprobs.get("top_logprobs") or []]  # + the sampled
        tops += [len(c.get("top_logprobs") or ()) for c in logprobs.get("content") or []]
        if tops and max(tops) > MAX_LOGPROBS:
            return f"200 with {max(tops)} logprob alternatives per token (cap {MAX_LOGPROBS})"
    return None


def grpc_problem(method: str, error: grpc.RpcError | None, responses: list) -> str | None:
    if error is not None:
        if error.code() in BAD_GRPC_CODES:
            return f"{error.code().name}: {(error.details() or '')[:300]!r}"
        return None
    if method == "Abort":
        found = responses[0].found
        return "Abort found a request although none is live" if found else None
    tops = [len(lp.top) for response in responses for lp in response.logprobs]
    if tops and max(tops) > MAX_LOGPROBS:
        return f"OK with {max(tops)} logprob alternatives per token (HTTP caps at {MAX_LOGPROBS})"
    return None


# -- the served cluster ------------------------------------------------------------------------


class Served:
    """`cluster serve` in a child process (cluster.bench.local_cluster's launch, but keeping
    the server's log: a failure report quotes it), restartable, with its baseline answers."""

    def __init__(self, model_dir, tmp_dir: Path) -> None:
        self.config = {
            "model": str(model_dir),
            "mode": "disaggregated",
            "prefill": {"num_instances": 1},
            "decode": {"num_instances": 1},
            "engine": {"num_blocks": 256},
            "router": {"instance_wait_s": 30},
            "grpc": {"host": "127.0.0.1", "port": 0},
            "http": {"host": "127.0.0.1", "port": 0},
        }
        self.tmp_dir = tmp_dir
        self.channel: grpc.Channel | None = None
        self.num_restarts = 0
        self.expected: dict[str, str] = {}

    def start(self) -> None:
        config = self.tmp_dir / "cluster.yaml"
        config.write_text(yaml.safe_dump(self.config))
        self.log = self.tmp_dir / f"serve-{self.num_restarts}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "cluster"), "serve", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "RAY_ADDRESS": ""},
            )
        line = self.proc.stdout.readline()  # the address line, once serving
        match = re.search(r"gRPC (127\.0\.0\.1:\d+), HTTP http://127\.0\.0\.1:(\d+)/v1", line)
        if not match:
            self.stop()
            raise RuntimeError(f"cluster serve did not start: {line!r}\n{self.log_tail()}")
        self.port = int(match.group(2))
        self.channel = grpc.insecure_channel(
            match.group(1),
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        models = json.loads(http_request(self.port, "/v1/models", b"", method="GET").body)
        self.model = models["data"][0]["id"]

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # drains, then stops Ray
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.num_restarts += 1
        self.start()

    def log_tail(self, num_lines: int = 12) -> str:
        """The end of the server's log (instances lost, tracebacks)."""
        lines = self.log.read_text(errors="replace").splitlines()
        keep = [line[:300] for line in lines if "Token authentication" not in line]
        return "\n".join(f"      | {line}" for line in keep[-num_lines:])

    def http_text(self) -> str:
        answer = http_request(self.port, "/v1/completions", _json(BASELINE).encode())
        if answer.status != 200:
            raise AssertionError(f"baseline over HTTP: {answer.brief()}")
        return json.loads(answer.body)["choices"][0]["text"]

    def grpc_text(self) -> str:
        params = pb.SamplingParams(max_tokens=8, temperature=0)
        request = pb.GenerateRequest(text=PROMPT, sampling_params=params)
        return self.call("Complete", request.SerializeToString()).text

    def call(self, method: str, request: bytes):
        """One PDCluster call with raw request bytes: a list of responses for Generate."""
        path = f"/pdcluster.v1.PDCluster/{method}"
        if method == "Generate":
            stub = self.channel.unary_stream(path, None, pb.GenerateResponse.FromString)
            return list(stub(request, timeout=TIMEOUT_S))
        reply = {"Complete": pb.CompleteResponse, "Abort": pb.AbortResponse}[method]
        return self.channel.unary_unary(path, None, reply.FromString)(request, timeout=TIMEOUT_S)

    def health(self) -> int:
        return http_request(self.port, "/health", b"", method="GET").status


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    cluster = Served(tiny_model_dir, tmp_path_factory.mktemp("fuzz-serve"))
    cluster.start()
    cluster.expected = {"http": cluster.http_text(), "grpc": cluster.grpc_text()}
    yield cluster
    cluster.stop()


@dataclass
class Failures:
    """Every distinct failure of one fuzz test, with its first input and answer."""

    served: Served
    seen: dict[str, list] = field(default_factory=dict)
    num_examples: int = 0

    def check(self, case: object, problem: str | None, api: str, answer: str) -> None:
        """Record `problem` (None: the answer was fine), then check that the baseline request
        over `api` (http or grpc) still gives its text; if not, blame `case` and restart."""
        self.num_examples += 1
        expected = self.served.expected[api]
        try:
            text = self.served.http_text() if api == "http" else self.served.grpc_text()
            broken = None if text == expected else f"returned {text!r}, not {expected!r}"
        except (AssertionError, grpc.RpcError) as exc:
            broken = f"failed: {str(exc)[:300]}"
        if broken is not None:
            problem = (
                f"{problem or f'answered {answer}'}; after it, the baseline request {broken}; the "
                f"server's log ends:\n{self.served.log_tail()}"
            )
            self.served.restart()  # or every later example fails for this one's reason
        if problem is None:
            return
        key = re.sub(r"[0-9a-f]{8,}|\d+", "N", problem)[:120]
        entry = self.seen.setdefault(key, [case, problem, 0])
        entry[2] += 1
        if len(repr(case)) < len(repr(entry[0])):  # the simplest input that shows it
            entry[:2] = case, problem

    def assert_none(self) -> None:
        lines = [
            f"{count}x {case!r}\n    -> {problem}" for case, problem, count in self.seen.values()
        ]
        assert not lines, (
            f"{len(lines)} distinct failures in {self.num_examples} examples "
            f"({self.served.num_restarts} cluster restarts so far):\n" + "\n".join(lines)
        )


def assert_still_serving(served: Served) -> None:
    assert served.health() == 200
    assert {"http": served.http_text(), "grpc": served.grpc_text()} == served.expected


# -- HTTP fuzz ---------------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def run_http_fuzz(served: Served, path: str, long: bool, explicit: list[HttpCase]) -> None:
    if served.health() != 200:
        served.restart()  # an earlier test left it broken: that test failed already
    failures = Failures(served)

    def run(case: HttpCase) -> None:
        headers = [(name, value.value) for name, value in case.headers]
        answer = http_request(served.port, case.path, case.body(served.model), headers)
        failures.check(case, http_problem(answer), "http", answer.brief()[:200])

    for case in reversed(explicit):
        example(case)(run)  # (hypothesis runs them last first)
    fields = CHAT_FIELDS if path == CHAT else COMPLETION_FIELDS
    fuzz_settings(long)(given(http_cases(path, fields))(run))()
    failures.assert_none()
    assert_still_serving(served)


COMPLETION_EXAMPLES = [
    _case(COMPLETIONS, cache_salt="lone high surrogate"),
    _case(COMPLETIONS, prompt="lone low surrogate in text"),
    _case(COMPLETIONS, max_tokens="10**5000"),
    _case(COMPLETIONS, prompt="10000-deep list"),
    _case(COMPLETIONS, True, stop="surrogate in a list"),
    _case(COMPLETIONS, temperature="1e400"),
    _case(COMPLETIONS, priority="10**5000"),
]
CHAT_EXAMPLES = [
    _case(CHAT, messages__1__content="lone high surrogate"),
    _case(CHAT, True, messages__1__name="reversed surrogate pair"),
    _case(CHAT, cache_salt="10k lone surrogates"),
    _case(CHAT, messages="10000-deep object"),
    _case(CHAT, top_logprobs="-2**31-1"),
]


def test_completions_fuzz(served):
    run_http_fuzz(served, COMPLETIONS, False, COMPLETION_EXAMPLES)


def test_chat_completions_fuzz(served):
    run_http_fuzz(served, CHAT, False, CHAT_EXAMPLES)


def test_oversized_body_is_refused_early(served):
    """A 64 MiB body (16x gRPC's 4 MiB message cap) is refused with 413 (http_request
    announces it with `Expect: 100-continue`, so a refusal can come before the body). The bulk
    is an unknown field, so that only a body limit can refuse it."""
    body = b'{"prompt": "hi", "max_tokens": 1, "padding": "' + b"a" * (64 * MIB) + b'"}'
    answer = http_request(served.port, COMPLETIONS, body)
    assert answer.status == 413, answer.brief()
    assert_still_serving(served)


# -- gRPC fuzz ---------------------------------------------------------------------------------

UINT32 = st.sampled_from([0, 1, 20, 21, 2047, 2048, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
INT32 = st.sampled_from([-(2**31), -2, -1, 0, 1, 2**31 - 1]) | st.integers(-(2**31), 2**31 - 1)
UINT64 = st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
FLOAT = st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, 1e-5, 0.99999, 1.0, 3.4e38, -1.0]
) | st.floats(width=32)
GRPC_TEXTS = [
    fixed("NUL and control chars", "a\x00b\x01\x1b[2J\x7f\n\r"),
    fixed("RTL and combining marks", "\u202eabc\u0301\u200d\ufeff\U0001f600"),
    fixed("empty", ""),
    Hostile("1 MiB text", lambda: "t" * MIB),
    Hostile("5 MiB text (over the 4 MiB message cap)", lambda: "t" * 5 * MIB),
    fixed("served model name with a NUL", "tiny-llama-v1\x00"),
]
grpc_text = st.sampled_from(GRPC_TEXTS) | st.text(max_size=16).map(lambda v: drawn(v, False))
GRPC_LISTS = {
    "sampling_params.stop": [
        fixed("[''] (empty stop)", [""]),
        Hostile("100k stop strings", lambda: [f"s{i}" for i in range(100_000)]),
    ],
    "sampling_params.stop_token_ids": [
        Hostile("1M stop ids", lambda: [i % 512 for i in range(1_000_000)]),
        fixed("[2**32-1]", [2**32 - 1]),
    ],
    "token_ids": [
        fixed("[] (empty prompt)", []),
        fixed("[512] (out of vocab)", [512]),
        fixed("[2**32-1]", [2**32 - 1]),
        Hostile("2048 ids (the whole context)", lambda: [i % 512 for i in range(2048)]),
        Hostile("1M ids", lambda: [i % 512 for i in range(1_000_000)]),
    ],
}
GRPC_FIELDS: dict[str, st.SearchStrategy] = {
    "request_id": grpc_text,
    "text": grpc_text,
    "token_ids": st.sampled_from(GRPC_LISTS["token_ids"])
    | st.lists(UINT32, max_size=8).map(lambda v: drawn(v, False)),
    "no prompt": st.just(fixed("unset", None)),
    "model": grpc_text,
    "priority": INT32.map(lambda v: drawn(v, False)),
    "cache_salt": grpc_text,
    "failure_policy": st.sampled_from([fixed(p, p) for p in ("fail", "recompute", "retry")])
    | grpc_text,
    "sampling_params.max_tokens": UINT32.map(lambda v: drawn(v, False)),
    "sampling_params.temperature": FLOAT.map(lambda v: drawn(v, False)),
    "sampling_params.top_k": INT32.map(lambda v: drawn(v, False)),
    "sampling_params.top_p": FLOAT.map(lambda v: drawn(v, False)),
    "sampling_params.min_p": FLOAT.map(lambda v: drawn(v, False)),
    "sampling_params.seed": UINT64.map(lambda v: drawn(v, False)),
    "sampling_params.stop": st.sampled_from(GRPC_LISTS["sampling_params.stop"])
    | st.lists(st.text(max_size=4), max_size=4).map(lambda v: drawn(v, False)),
    "sampling_params.stop_token_ids": st.sampled_from(GRPC_LISTS["sampling_params.stop_token_ids"])
    | st.lists(UINT32, max_size=4).map(lambda v: drawn(v, False)),
    "sampling_params.ignore_eos": st.booleans().map(lambda v: drawn(v, False)),
    "sampling_params.include_stop_str_in_output": st.booleans().map(lambda v: drawn(v, False)),
    "sampling_params.logprobs": UINT32.map(lambda v: drawn(v, False)),
}
# Strings protobuf refuses to serialize: (field number path, label); spliced in as bytes.
RAW_STRING_FIELDS = {"request_id": (1,), "text": (2,), "model": (5,), "cache_salt": (7,),
                     "failure_policy": (8,), "sampling_params.stop": (4, 7)}  # fmt: skip
INVALID_UTF8 = [
    fixed("UTF-8-encoded surrogate", b"\xed\xa0\x80"),
    fixed("0xff byte", b"a\xffb"),
    fixed("overlong NUL", b"a\xc0\x80"),
    fixed("truncated sequence", b"abc\xe2\x82"),
]


@dataclass(frozen=True)
class GrpcCase:
    method: str  # Generate | Complete | Abort
    fields: tuple[tuple[str, Hostile], ...] = ()
    raw: tuple[str, Hostile] | None = None  # invalid UTF-8 bytes for one string field

    def __repr__(self) -> str:
        parts = [self.method, *(f"{name}={value!r}" for name, value in self.fields)]
        if self.raw is not None:
            parts.append(f"{self.raw[0]}=bytes {self.raw[1]!r}")
        return f"<{', '.join(parts)}>"

    def request(self) -> bytes:
        if self.method == "Abort":
            message = pb.AbortRequest(**{name: value.value for name, value in self.fields})
        else:
            message = pb.GenerateRequest(
                text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=4)
            )
            for name, value in self.fields:
                _set_grpc(message, name, value.value)
        data = message.SerializeToString()
        if self.raw is not None:
            data += _string_field(RAW_STRING_FIELDS[self.raw[0]], self.raw[1].value)
        return data


def _set_grpc(message: pb.GenerateRequest, name: str, value: Any) -> None:
    if name == "no prompt":
        message.ClearField("prompt")
    elif name == "token_ids":
        message.token_ids.ids[:] = value
    elif name.startswith("sampling_params."):
        name = name.split(".", 1)[1]
        target = message.sampling_params
        if isinstance(value, list):
            getattr(target, name)[:] = value
        else:
            setattr(target, name, value)
    else:
        setattr(message, name, value)


def _string_field(numbers: tuple[int, ...], data: bytes) -> bytes:
    """Wire bytes for a length-delimited field at `numbers` (nested messages merge)."""
    for number in reversed(numbers):
        data = _varint(number << 3 | 2) + _varint(len(data)) + data
    return data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def grpc_cases(draw) -> GrpcCase:
    method = draw(st.sampled_from(["Generate", "Complete", "Complete", "Abort"]))
    names = ["request_id"] if method == "Abort" else list(GRPC_FIELDS)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    fields = tuple((name, draw(GRPC_FIELDS[name])) for name in chosen)
    raw_names = ["request_id"] if method == "Abort" else list(RAW_STRING_FIELDS)
    raw = draw(st.none() | st.none() | st.tuples(st.sampled_from(raw_names),
                                                 st.sampled_from(INVALID_UTF8)))  # fmt: skip
    return GrpcCase(method, fields, raw)


def _grpc_case(method: str, raw: tuple[str, Hostile] | None = None, **fields: Any) -> GrpcCase:
    pairs = tuple((k.replace("__", "."), v if isinstance(v, Hostile) else drawn(v, False))
                  for k, v in fields.items())  # fmt: skip
    return GrpcCase(method, pairs, raw)


GRPC_EXAMPLES = [
    _grpc_case("Complete", sampling_params__logprobs=2**32 - 1),
    _grpc_case("Generate", sampling_params__logprobs=21),
    _grpc_case("Complete", sampling_params__max_tokens=0),
    _grpc_case("Complete", sampling_params__max_tokens=2**32 - 1),
    _grpc_case("Complete", sampling_params__temperature=math.nan),
    _grpc_case("Complete", sampling_params__seed=2**64 - 1),
    _grpc_case("Complete", sampling_params__top_k=-(2**31)),
    _grpc_case("Generate", token_ids=[512]),
    _grpc_case("Complete", priority=-(2**31), failure_policy="garbage"),
    _grpc_case("Complete", request_id=GRPC_TEXTS[3], cache_salt=GRPC_TEXTS[3]),
    _grpc_case("Complete", cache_salt=GRPC_TEXTS[4]),
    _grpc_case("Complete", raw=("cache_salt", INVALID_UTF8[0])),
    _grpc_case("Abort", request_id=GRPC_TEXTS[3]),
    _grpc_case("Abort", raw=("request_id", INVALID_UTF8[1])),
]


def run_grpc_fuzz(served: Served, long: bool) -> None:
    if served.health() != 200:
        served.restart()
    failures = Failures(served)

    def run(case: GrpcCase) -> None:
        error, responses = None, []
        try:
            responses = served.call(case.method, case.request())
            responses = responses if isinstance(responses, list) else [responses]
        except grpc.RpcError as exc:
            error = exc
        answer = error.code().name if error else f"OK ({len(responses)} responses)"
        failures.check(case, grpc_problem(case.method, error, responses), "grpc", answer)

    for case in reversed(GRPC_EXAMPLES):
        example(case)(run)  # (hypothesis runs them last first)
    fuzz_settings(long)(given(grpc_cases())(run))()
    failures.assert_none()
    assert_still_serving(served)


def test_grpc_fuzz(served):
    run_grpc_fuzz(served, False)


# -- the long profile: PD_CLUSTER_FUZZ=long ----------------------------------------------------

long_only = pytest.mark.skipif(not LONG, reason="the long fuzz profile: set PD_CLUSTER_FUZZ=long")


@pytest.mark.slow
@long_only
@pytest.mark.timeout(6 * 3600)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_http_fuzz_long(served, path):
    run_http_fuzz(served, path, True, [])


@pytest.mark.slow
@long_only
@pytest.mark.timeout(6 * 3600)
def test_grpc_fuzz_long(served):
    run_grpc_fuzz(served, True)
