"""Chat messages → one prompt string, rendered with the model's own Jinja chat template.

Part of the router's OpenAI front end (docs/architecture.md: router/): /v1/chat/completions
turns its `messages` into text here, then into token ids. The template runs the way Hugging
Face runs it (sandboxed Jinja, trim_blocks + lstrip_blocks, `raise_exception`, a `tojson` that
keeps non-ASCII, the tokenizer's special tokens as variables), so a prompt rendered here equals
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.
Templates come from checkpoints, i.e. they are untrusted code: hence the immutable sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from cluster.router.types import InvalidRequest
from cluster.router.validation import MAX_MESSAGES, brief

MAX_TOOLS = 128


class ChatTemplate:
    """One compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self._special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate | None:
        """The template of a `cluster.engine.tokenizer.Tokenizer`; None when it has none."""
        source = template_source(tokenizer.hf)
        if source is None:
            return None
        return cls(source, getattr(tokenizer.hf, "special_tokens_map", {}))

    @property
    def takes_tools(self) -> bool:
        """Whether the template renders a `tools` list at all."""
        return "tools" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt for `messages` (already checked by `parse_messages`) and `tools` (by
        `parse_tools`)."""
        # tools/documents are passed as None, not left undefined, as Hugging Face does:
        # `tools is not none` is true of an undefined name.
        variables = {**self._special_tokens, "messages": messages, "tools": tools or None}
        variables.update(documents=None, add_generation_prompt=add_generation_prompt)
        try:
            return self._template.render(**variables)
        except Exception as exc:  # the template is data: whatever it raises is a bad request
            raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc


def template_source(hf_tokenizer: Any) -> str | None:
    """The tokenizer's chat template text: its `chat_template`, else tokenizer_config.json's,
    else chat_template.jinja beside it. Named templates (a dict) give their "default"."""
    source = getattr(hf_tokenizer, "chat_template", None)
    model_dir = Path(str(getattr(hf_tokenizer, "name_or_path", "") or "."))
    if not source and (model_dir / "tokenizer_config.json").is_file():
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        source = config.get("chat_template")
    if not source and (model_dir / "chat_template.jinja").is_file():
        source = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(source, list):  # tokenizer_config.json's [{"name", "template"}, ...]
        source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    if isinstance(source, dict):
        source = source.get("default")
    return source if isinstance(source, str) and source else None


def parse_tools(tools: object) -> list[dict[str, Any]]:
    """Check OpenAI `tools`: [{type: function, function: {name, description?, parameters?}}]."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty list of {type: function, function}")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools has {len(tools)} entries; the limit is {MAX_TOOLS}")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest(f"{where} must be {{'type': 'function', 'function': {{...}}}}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"{where}.function needs a name")
        if fn["name"] in names:
            raise InvalidRequest(f"{where}: two tools are named {fn['name']!r}")
        names.add(fn["name"])
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise InvalidRequest(f"{where}.function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise InvalidRequest(f"{where}.function.description must be a string")
    return [{"type": "function", "function": tool["function"]} for tool in tools]


def parse_messages(messages: object) -> list[dict[str, Any]]:
    """Check OpenAI chat `messages` and flatten each to {role, content[, name]} with string
    content (text parts joined with newlines, as vLLM does for string-content templates).
    An assistant's `tool_calls` are kept with their arguments as objects (templates expect
    them so; vLLM does the same), a tool result's `tool_call_id` too. Other keys
    (reasoning_content, refusal...) are dropped."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages has {len(messages)} entries; the limit is {MAX_MESSAGES}")
    return [_parse_message(i, m) for i, m in enumerate(messages)]


def _parse_message(index: int, message: object) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"{where}.role must be a non-empty string, got {brief(role)}")
    calls = message.get("tool_calls")
    content = message.get("content")
    if content is None and calls:  # an assistant turn that only called tools
        content = ""
    parsed: dict[str, Any] = {"role": role, "content": _content_text(where, content)}
    if isinstance(message.get("name"), str):
        parsed["name"] = message["name"]
    if calls:
        parsed["tool_calls"] = _tool_calls(where, calls)
    if message.get("tool_call_id") is not None:
        if not isinstance(message["tool_call_id"], str):
            raise InvalidRequest(f"{where}.tool_call_id must be a string")
        parsed["tool_call_id"] = message["tool_call_id"]
    if message.get("function_call"):
        raise InvalidRequest(f"{where}: function_call is deprecated; send tool_calls")
    return parsed


def _tool_calls(where: str, calls: object) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"{where}.tool_calls[{j}] needs function.name and arguments")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise InvalidRequest(
                    f"{where}.tool_calls[{j}].function.arguments is not valid JSON"
                ) from None
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _content_text(where: str, content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of text parts, got {brief(content)}"
        )
    texts = []
    for j, part in enumerate(content):
        is_text = isinstance(part, dict) and part.get("type") == "text"
        if not is_text or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} "
                f"(only text parts are supported), got {brief(part)}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


class _SafeNamespace(Namespace):
    """`namespace()` that refuses underscore names, as Hugging Face's does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes and cannot keep non-ASCII; templates expect json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env
