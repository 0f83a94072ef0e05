"""Tool calls out of a model's text, per model family (the chat API's `tools`).

    hermes       Qwen2.5 / Qwen3, Hermes:  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    llama3_json  Llama 3.1+ JSON tools:    [<|python_tag|>]{"name": ..., "parameters": {...}}
                                           (several separated by ';')
    mistral      Mistral:                  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
                                           or (v11+ tokenizers) [TOOL_CALLS]name[ARGS]{...}

Each parser turns a whole output into (content, calls). Streaming uses the same parse: text
is passed through as content until it could be the start of a tool call, then held back;
when the request finishes the held text is parsed once and goes out as `tool_calls` deltas
(the official client accumulates deltas by index, so whole calls in one delta each are what
it expects), or, if it does not parse, as content after all. Text that might be a marker's
beginning is held until it is known not to be one, so no marker fragment ever leaks out.

`tool_choice` "required" or a named function does not need a family format at all: the
request is constrained by a JSON schema (structured outputs) and its output parsed here by
`parse_forced`.

Formats follow the families' published prompt formats (Hugging Face model cards and chat
templates; vLLM's tool parsers document the same shapes).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass(slots=True, frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: Any, arguments: Any) -> ToolCall | None:
    """A call from a parsed object, or None when it is not one."""
    if not isinstance(name, str) or not name:
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False), new_call_id())


def _all_calls(values: list[Any], args_key: str = "arguments") -> list[ToolCall]:
    """A call from every {"name", args_key} object, or none at all if any is not one."""
    calls = []
    for value in values:
        if not isinstance(value, dict):
            return []
        call = _call(value.get("name"), value.get(args_key, value.get("arguments")))
        if call is None:
            return []
        calls.append(call)
    return calls


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, one after another (separated by whitespace, ';' or ','),
    or None when anything else is in between."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # a tool call starts at one of these
    leading: tuple[str, ...] = ()  # ...or at the output's first non-space character

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; no calls: the text is all content."""
        start = self.tool_start(text)
        if start is None:
            return text, []
        calls = self._calls(text[start:])
        if not calls:
            return text, []
        content = text[:start].strip()
        return content or None, calls

    def tool_start(self, text: str) -> int | None:
        """Where the tool-call section begins in `text`, if it does."""
        found = [i for m in self.markers if (i := text.find(m)) >= 0]
        if found:
            return min(found)
        stripped = text.lstrip()
        if stripped and any(stripped.startswith(c) for c in self.leading):
            return len(text) - len(stripped)
        return None

    def safe_prefix(self, text: str) -> int:
        """How much of `text` (no tool start in it yet) can go out as content now: all but
        a tail that could still become a marker, or all of it held when the output so far is
        only whitespace (it may still open with a leading character)."""
        if self.leading and not text.strip():
            return 0
        for k in range(min(len(text), max((len(m) for m in self.markers), default=0)), 0, -1):
            tail = text[-k:]
            if any(m.startswith(tail) for m in self.markers):
                return len(text) - k
        return len(text)

    def _calls(self, section: str) -> list[ToolCall]:
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def _calls(self, section: str) -> list[ToolCall]:
        bodies = [_json_values(body.strip()) for body in self._BLOCK.findall(section)]
        if not all(values and len(values) == 1 for values in bodies):
            return []
        return _all_calls([values[0] for values in bodies])


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    leading = ("{",)

    def _calls(self, section: str) -> list[ToolCall]:
        values = _json_values(section.replace("<|python_tag|>", "").strip())
        return _all_calls(values, "parameters") if values else []


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    leading = ("[{",)
    _NAMED = re.compile(r"\s*([A-Za-z0-9_.:-]+)\[ARGS\]")

    def _calls(self, section: str) -> list[ToolCall]:
        body = section.removeprefix("[TOOL_CALLS]").strip()
        if body.startswith("["):  # a JSON list of calls
            values = _json_values(body)
            if not values or len(values) != 1 or not isinstance(values[0], list):
                return []
            return _all_calls(values[0])
        calls = []  # name[ARGS]{...}, repeated, each after its own [TOOL_CALLS]
        for part in filter(None, (p.strip() for p in body.split("[TOOL_CALLS]"))):
            named = self._NAMED.match(part)
            values = _json_values(part[named.end() :]) if named else None
            if not named or not values or len(values) != 1:
                return []
            call = _call(named.group(1), values[0])
            if call is None:
                return []
            calls.append(call)
        return calls


_BY_NAME = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def get_parser(name: str) -> ToolParser:
    if name not in _BY_NAME:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(PARSERS)}")
    return _BY_NAME[name]()


def detect_parser(chat_template: str | None) -> str | None:
    """The family format a chat template writes tool calls in, if it shows one."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template or "[AVAILABLE_TOOLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None


# -- tool_choice "required" / named: constrained by a schema ------------------------------------


def forced_schema(tools: list[dict[str, Any]], named: str | None) -> dict[str, Any]:
    """The JSON schema a forced tool choice constrains the output to: a named function's
    arguments object, or (required) a non-empty list of {name, parameters} calls."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if named is not None:
        return by_name[named].get("parameters") or {"type": "object"}
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name},
                           "parameters": fn.get("parameters") or {"type": "object"}},
            "required": ["name", "parameters"],
        }
        for name, fn in by_name.items()
    ]  # fmt: skip
    return {"type": "array", "minItems": 1, "items": {"anyOf": options}}


def parse_forced(text: str, named: str | None) -> list[ToolCall]:
    """The calls of a forced tool choice's output (the schema above guarantees the shape;
    an output cut short by max_tokens does not parse and yields no calls)."""
    values = _json_values(text.strip())
    if not values or len(values) != 1:
        return []
    value = values[0]
    if named is not None:
        call = _call(named, value)
        return [call] if call else []
    return _all_calls(value, "parameters") if isinstance(value, list) else []


# -- streaming ---------------------------------------------------------------------------------


class ToolStream:
    """One streamed output: `feed(delta)` returns the content that may go out now; once the
    request ends, `finish()` returns the rest of the content and the tool calls."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._text = ""
        self._sent = 0  # characters of _text already sent as content
        self._in_tools = False

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._in_tools:
            return ""
        start = self.parser.tool_start(self._text)
        if start is not None and start >= self._sent:
            self._in_tools = True
            out, self._sent = self._text[self._sent : start], start
            return out
        pending = self._text[self._sent :]
        n = self.parser.safe_prefix(pending)
        self._sent += n
        return pending[:n]

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = self._text[self._sent :]
        if not self._in_tools:
            return rest, []
        content, calls = self.parser.parse(rest)
        if not calls:
            return rest, []
        return content or "", calls
