"""Tool-call parsers (cluster/router/tool_parsers.py) on scripted outputs of each family's
format: whole and streamed in every split (hypothesis), the streamed content never shows a
marker fragment, and what does not parse stays content."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.router.tool_parsers import (
    ToolStream,
    detect_parser,
    forced_schema,
    get_parser,
    parse_forced,
)

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"zone": "Europe/Paris"}

# (parser, output, content, [(name, arguments)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}\n</tool_call>', None, [("weather", WEATHER)]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "time", "arguments": '
     '{"zone": "Europe/Paris"}}\n</tool_call>', "Let me look.",
     [("weather", WEATHER), ("time", TIME)]),
    ("hermes", "No tools needed: it is 3 < 4.", "No tools needed: it is 3 < 4.", []),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "weather", "parameters": {"city": "Paris", '
     '"unit": "celsius"}}; {"name": "time", "parameters": {"zone": "Europe/Paris"}}', None,
     [("weather", WEATHER), ("time", TIME)]),
    ("llama3_json", "The weather is fine {probably}.", "The weather is fine {probably}.", []),
    ("mistral", '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}, {"name": "time", "arguments": {"zone": "Europe/Paris"}}]', None,
     [("weather", WEATHER), ("time", TIME)]),
    ("mistral", '[TOOL_CALLS]weather[ARGS]{"city": "Paris", "unit": "celsius"}'
     '[TOOL_CALLS]time[ARGS]{"zone": "Europe/Paris"}', None,
     [("weather", WEATHER), ("time", TIME)]),
    ("mistral", '[{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
     None, [("weather", WEATHER)]),  # [TOOL_CALLS] is a special token: may be stripped
    ("mistral", "[1, 2] are numbers", "[1, 2] are numbers", []),
]  # fmt: skip


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, output, content, expected", CASES)
def test_whole_outputs_parse(parser, output, content, expected):
    got_content, calls = get_parser(parser).parse(output)
    assert _calls(calls) == expected
    assert got_content == (content if expected else output)
    assert all(c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == len(calls)


def _stream(parser: str, pieces: list[str]) -> tuple[str, list]:
    stream = ToolStream(get_parser(parser))
    sent = [stream.feed(p) for p in pieces]
    rest, calls = stream.finish()
    return "".join(sent) + rest, calls, sent


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streaming_in_any_split_equals_the_whole(case, cuts):
    parser, output, content, expected = case
    points = sorted({min(c, len(output)) for c in cuts} | {0, len(output)})
    pieces = [output[a:b] for a, b in zip(points, points[1:], strict=False)]
    streamed, calls, sent = _stream(parser, pieces)
    assert _calls(calls) == expected
    # (streamed content may keep whitespace before a call that the whole parse trims)
    assert (streamed.strip() if expected else streamed) == ((content or "") if expected else output)
    if expected:  # nothing of the tool-call section leaked out before the end
        marker_free = "".join(sent)
        assert "<tool_call" not in marker_free and "[TOOL" not in marker_free
        assert '"name"' not in marker_free


def test_broken_tool_call_text_becomes_content():
    text = '<tool_call>\n{"name": "weather", "arguments": {"city": \n</tool_call>'
    content, calls = get_parser("hermes").parse(text)
    assert calls == [] and content == text
    streamed, calls, _ = _stream("hermes", [text[:7], text[7:]])
    assert calls == [] and streamed == text


def test_detect_parser_from_the_chat_template():
    assert detect_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_parser("{% if tools %}[AVAILABLE_TOOLS]{% endif %}") == "mistral"
    assert detect_parser("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert detect_parser("{{ messages }}") is None and detect_parser(None) is None


TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "time"}},
]  # fmt: skip


def test_forced_choices_schema_and_parse():
    jsonschema = pytest.importorskip("jsonschema")
    named = forced_schema(TOOLS, "weather")
    jsonschema.validate({"city": "Paris"}, named)
    assert _calls(parse_forced('{"city": "Paris"}', "weather")) == [("weather", {"city": "Paris"})]
    required = forced_schema(TOOLS, None)
    output = [{"name": "weather", "parameters": {"city": "Oslo"}}, {"name": "time",
              "parameters": {}}]  # fmt: skip
    jsonschema.validate(output, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "nope", "parameters": {}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    calls = parse_forced(json.dumps(output), None)
    assert _calls(calls) == [("weather", {"city": "Oslo"}), ("time", {})]
    assert parse_forced('[{"name": "weather", "parameters": {"ci', None) == []  # cut short


# -- tools in the chat template, against transformers --------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You help with trips."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
    {"role": "user", "content": "And the time there?"},
]  # fmt: skip


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "mistral"])
def test_tools_render_as_transformers_renders_them(family, tiny_model_dir):
    from transformers import AutoTokenizer

    from cluster.router.chat_template import ChatTemplate, parse_messages, parse_tools
    from tests.router.tool_templates import TEMPLATES

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    hf.chat_template = TEMPLATES[family]
    # transformers takes the arguments as objects (its templates expect them so)
    reference_messages = json.loads(json.dumps(CONVERSATION))
    call = reference_messages[2]["tool_calls"][0]["function"]
    call["arguments"] = json.loads(call["arguments"])
    expected = hf.apply_chat_template(reference_messages, tools=TOOLS, tokenize=False,
                                      add_generation_prompt=True)  # fmt: skip
    ours = ChatTemplate(TEMPLATES[family], hf.special_tokens_map).render(
        parse_messages(CONVERSATION), True, parse_tools(TOOLS)
    )
    assert ours == expected
    assert '"weather"' in ours and "18 C, clear" in ours
    assert detect_parser(TEMPLATES[family]) == family


@pytest.mark.parametrize(
    "tools, message",
    [
        ([], "non-empty list"),
        ([{"type": "function", "function": {}}], "needs a name"),
        ([{"type": "retrieval"}], "'type': 'function'"),
        (TOOLS + TOOLS[:1], "two tools are named"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema"),
    ],
)
def test_bad_tools_are_refused(tools, message):
    from cluster.router.chat_template import parse_tools
    from cluster.router.types import InvalidRequest

    with pytest.raises(InvalidRequest, match=message):
        parse_tools(tools)
