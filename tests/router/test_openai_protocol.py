"""OpenAI request parsing, response shapes and chat-template rendering, without a server.

Rendering is checked against `transformers`' own apply_chat_template; response objects are
validated by the official `openai` client's pydantic models, which is what a client parses.
"""

from __future__ import annotations

import math

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cluster.engine.tokenizer import Tokenizer
from cluster.router.chat_template import ChatTemplate, parse_messages
from cluster.router.openai_protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    InvalidField,
    ResponseFormatter,
    ServedModel,
    model_list,
    parse_chat_request,
    parse_completion_request,
    router_error_body,
)
from cluster.router.types import InvalidRequest, ModelInfo, StreamChunk, Usage

MODEL = "tiny-llama-v1"
MAX_MODEL_LEN = 2048

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How far is the lighthouse?"},
        {"role": "assistant", "content": "112 steps."},
        {"role": "user", "content": "Déjà vu: 日本語 🙂"},
    ],
    [{"role": "user", "content": ""}],
]

# A template in the style of real checkpoints: special tokens, namespace(), loop controls,
# raise_exception, tojson with non-ASCII, whitespace control that trim/lstrip_blocks affect,
# a test on `tools` (None, not undefined).
RICH_TEMPLATE = """{{ bos_token }}
{% if tools is not none %}TOOLS{% endif %}
{% set ns = namespace(system='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.system = m['content'] %}
        {% continue %}
    {% endif %}
    {% if m['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + m['role']) }}
    {% endif %}
<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if ns.system %}system={{ ns.system | tojson }}{% endif %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def served(tokenizer) -> ServedModel:
    info = ModelInfo(MODEL, "LlamaForCausalLM", MAX_MODEL_LEN, 512, "float32", 4, 16, (1,))
    return ServedModel(info, tokenizer, ChatTemplate.from_tokenizer(tokenizer))


def _hf_render(tokenizer: Tokenizer, messages, template: str | None = None) -> str:
    return tokenizer.hf.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


# -- chat template ---------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_render_matches_transformers(tokenizer, messages):
    template = ChatTemplate.from_tokenizer(tokenizer)
    assert template.render(parse_messages(messages)) == _hf_render(tokenizer, messages)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rich_template_matches_transformers(tokenizer, messages):
    template = ChatTemplate(RICH_TEMPLATE, tokenizer.hf.special_tokens_map)
    rendered = template.render(parse_messages(messages))
    assert rendered == _hf_render(tokenizer, messages, RICH_TEMPLATE)
    assert rendered.startswith("<|bos|>")


def test_tojson_keeps_non_ascii(tokenizer):
    template = ChatTemplate(RICH_TEMPLATE, tokenizer.hf.special_tokens_map)
    rendered = template.render([{"role": "system", "content": "café"}])
    assert 'system="café"' in rendered


def test_raise_exception_is_a_bad_request(tokenizer):
    template = ChatTemplate(RICH_TEMPLATE, tokenizer.hf.special_tokens_map)
    with pytest.raises(InvalidRequest, match="unknown role: tool"):
        template.render([{"role": "tool", "content": "42"}])


def test_sandbox_blocks_attribute_escapes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest):
        template.render([{"role": "user", "content": "x"}])
    template = ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(InvalidRequest):
        template.render([{"role": "user", "content": "x"}])


def test_text_parts_are_joined_with_newlines(tokenizer):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    template = ChatTemplate.from_tokenizer(tokenizer)
    as_parts = template.render(parse_messages([{"role": "user", "content": parts}]))
    as_text = template.render(parse_messages([{"role": "user", "content": "first\nsecond"}]))
    assert as_parts == as_text


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        "hello",
        ["hello"],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
    ],
)
def test_bad_messages_are_rejected(messages):
    with pytest.raises(InvalidRequest):
        parse_messages(messages)


def test_template_source_falls_back_to_tokenizer_config(tiny_model_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    tokenizer.hf.chat_template = None  # e.g. transformers dropped it: read the file itself
    template = ChatTemplate.from_tokenizer(tokenizer)
    assert template is not None and "add_generation_prompt" in template.source


# -- parsing ---------------------------------------------------------------------------------


def test_completion_defaults(served):
    req = parse_completion_request({"prompt": "Hello"}, served)
    params = req.input.params
    assert req.kind == "completion" and req.input.prompt == "Hello"
    assert params.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS and params.temperature == 1.0
    assert not req.stream and req.num_logprobs is None and req.input.request_id
    assert req.input.model == MODEL


def test_completion_fields_reach_sampling_params(served):
    body = {
        "model": MODEL,
        "prompt": [5, 6, 7],
        "max_tokens": 9,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 3,
        "min_p": 0.1,
        "seed": 11,
        "stop": "x",
        "stop_token_ids": [4],
        "ignore_eos": True,
        "logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "ignored",
        "priority": 3,
    }
    req = parse_completion_request(body, served, request_id="abc")
    p = req.input.params
    assert req.input.prompt == [5, 6, 7] and req.input.request_id == "abc"
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (9, 0, 0.5, 3, 0.1)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (11, ["x"], [4], True, 2)
    assert req.stream and req.include_usage and req.num_logprobs == 2
    assert req.input.priority == 3


@pytest.mark.parametrize("prompt", [["only one"], [[5, 6]]])
def test_single_prompt_lists_are_unwrapped(served, prompt):
    assert parse_completion_request({"prompt": prompt}, served).input.prompt == prompt[0]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "prompt", "prompt must be"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": ["a", "b"]}, "prompt", "batched prompts are not supported"),
        ({"prompt": [1, 99999]}, "prompt", r"\[0, 512\)"),
        ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
        ({"prompt": "x", "top_p": 2}, "top_p", "top_p must be in"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature must be a number"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "max_tokens must be an integer"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be"),
        ({"prompt": "x", "stream": "yes"}, "stream", "stream must be true or false"),
        ({"prompt": "x", "stop": 5}, "stop", "stop must be"),
        ({"prompt": "x", "n": 0}, "n", r"n must be in \[1, 16\]"),
        ({"prompt": "x", "n": 17}, "n", r"n must be in \[1, 16\]"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "best_of .2. must be >= n"),
        ({"prompt": "x", "best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "must be in"),
        ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty", "must be in"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
        ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias", "keys are token ids"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "must be in"),
        ({"prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias", "values are numbers"),
        ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "300"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens", "min_tokens"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs", "prompt_logprobs must be"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be in"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "fill-in-the-middle"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({"prompt": "x", "guided_choice": []}, "guided_choice", "non-empty list"),
        ({"prompt": "x", "guided_regex": 5}, "guided_regex", "non-empty string"),
        ({"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one"),
        (
            {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
            "exactly one",
        ),
        (
            {
                "prompt": "x",
                "guided_json": {"type": "object"},
                "response_format": {"type": "json_object"},
            },
            "guided_json",
            "one output constraint",
        ),
        ({"prompt": "x", "model": "gpt-4"}, "model", "model 'gpt-4' is not served here; use"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)
def test_bad_completion_requests(served, body, param, message):
    with pytest.raises(InvalidField, match=message) as info:
        parse_completion_request(body, served)
    assert info.value.param == param
    assert router_error_body(info.value)["error"]["param"] == param
    assert info.value.http_status == 400


def test_body_must_be_an_object(served):
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_completion_request(["prompt"], served)


def test_chat_prompt_is_the_rendered_template(served, tokenizer):
    messages = CONVERSATIONS[1]
    req = parse_chat_request({"messages": messages}, served)
    expected_ids = tokenizer.hf.encode(_hf_render(tokenizer, messages), add_special_tokens=False)
    assert req.kind == "chat" and req.input.prompt == expected_ids
    # vLLM's default for chat: all the context that is left
    assert req.input.params.max_tokens == MAX_MODEL_LEN - len(expected_ids)


def test_chat_max_tokens_and_logprobs(served):
    body = {
        "messages": CONVERSATIONS[0],
        "max_tokens": 5,
        "max_completion_tokens": 7,
        "logprobs": True,
        "top_logprobs": 3,
    }
    req = parse_chat_request(body, served)
    assert req.input.params.max_tokens == 7  # max_completion_tokens wins, as in vLLM
    assert req.num_logprobs == 3 and req.input.params.logprobs == 3
    plain = parse_chat_request({"messages": CONVERSATIONS[0], "logprobs": True}, served)
    assert plain.num_logprobs == 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"n": 30}, "n"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_bad_chat_requests(served, extra, param):
    with pytest.raises(InvalidField) as info:
        parse_chat_request({"messages": CONVERSATIONS[0], **extra}, served)
    assert info.value.param == param


def test_chat_without_template_points_to_completions(served):
    bare = ServedModel(served.info, served.tokenizer, None)
    with pytest.raises(InvalidRequest, match="no chat template.*/v1/completions"):
        parse_chat_request({"messages": CONVERSATIONS[0]}, bare)


# -- responses -------------------------------------------------------------------------------


def _chunks(tokenizer: Tokenizer, with_logprobs: bool = False) -> list[StreamChunk]:
    ids = tokenizer.encode(" the lamp burned")
    chunks = []
    for i, token_id in enumerate(ids):
        last = i == len(ids) - 1
        chunks.append(
            StreamChunk(
                request_id="r1",
                token_ids=[token_id],
                text=tokenizer.decode([token_id]),
                logprobs=[-0.5 * (i + 1)] if with_logprobs else None,
                top_logprobs=[[(token_id, -0.5), (7, -math.inf)]] if with_logprobs else None,
                finished=last,
                finish_reason="length" if last else None,
                usage=Usage(4, len(ids), cached_tokens=2) if last else None,
            )
        )
    return chunks


def test_completion_response_shape(served, tokenizer):
    req = parse_completion_request({"prompt": "x", "logprobs": 1}, served, "r1")
    chunks = _chunks(tokenizer, with_logprobs=True)
    body = ResponseFormatter.for_request(req, served).response(chunks)
    parsed = Completion.model_validate(body)
    choice = parsed.choices[0]
    assert parsed.id == "cmpl-r1" and parsed.model == MODEL
    assert choice.text == " the lamp burned" and choice.finish_reason == "length"
    assert parsed.usage.total_tokens == 4 + len(chunks)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    tokens = choice.logprobs.tokens
    assert "".join(tokens) == choice.text
    assert choice.logprobs.text_offset == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    assert choice.logprobs.token_logprobs == [-0.5 * (i + 1) for i in range(len(chunks))]
    # the sampled token plus the top 1 alternative (here the same token)
    assert choice.logprobs.top_logprobs[1] == {tokens[1]: -1.0}


def test_completion_stream_chunks(served, tokenizer):
    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    req = parse_completion_request(body, served, "r1")
    formatter = ResponseFormatter.for_request(req, served)
    chunks = _chunks(tokenizer)
    events = formatter.opening_chunks() + [formatter.stream_chunk(c) for c in chunks]
    events.append(formatter.usage_chunk(chunks[-1].usage))
    # The client's Completion type wants a finish_reason, which only the last chunk has (as
    # with OpenAI): validate the two final events strictly, the rest by key.
    last, usage = Completion.model_validate(events[-2]), Completion.model_validate(events[-1])
    assert all(set(e) == set(events[-2]) for e in events)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " the lamp burned"
    assert [e["choices"][0]["finish_reason"] for e in events[:-2]] == [None] * (len(chunks) - 1)
    assert last.choices[0].finish_reason == "length" and last.object == "text_completion"
    assert all(e["usage"] is None for e in events[:-1])
    assert usage.choices == [] and usage.usage.completion_tokens == len(chunks)


def test_chat_response_and_stream_shapes(served, tokenizer):
    req = parse_chat_request({"messages": CONVERSATIONS[0], "stream": True}, served, "r2")
    formatter = ResponseFormatter.for_request(req, served)
    chunks = _chunks(tokenizer)
    events = formatter.opening_chunks() + [formatter.stream_chunk(c) for c in chunks]
    parsed = [ChatCompletionChunk.model_validate(e) for e in events]
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].id == "chatcmpl-r2"
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)
    assert "".join(p.choices[0].delta.content or "" for p in parsed) == " the lamp burned"
    assert parsed[-1].choices[0].finish_reason == "length"

    req = parse_chat_request({"messages": CONVERSATIONS[0]}, served, "r2")
    body = ResponseFormatter.for_request(req, served).response(chunks)
    completion = ChatCompletion.model_validate(body)
    assert completion.choices[0].message.content == " the lamp burned"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.prompt_tokens == 4


def test_chat_logprobs_shape(served, tokenizer):
    body = {"messages": CONVERSATIONS[0], "logprobs": True, "top_logprobs": 2}
    req = parse_chat_request(body, served, "r3")
    response = ResponseFormatter.for_request(req, served).response(_chunks(tokenizer, True))
    content = ChatCompletion.model_validate(response).choices[0].logprobs.content
    first = content[0]
    assert first.logprob == -0.5 and bytes(first.bytes).decode() == first.token
    assert [t.logprob for t in first.top_logprobs] == [-0.5, -9999.0]  # -inf as OpenAI sends it


def test_stream_skips_empty_chunks(served):
    req = parse_completion_request({"prompt": "x", "stream": True}, served, "r4")
    formatter = ResponseFormatter.for_request(req, served)
    held_back = StreamChunk("r4", token_ids=[300], text="")  # e.g. half a UTF-8 character
    assert formatter.stream_chunk(held_back) is None


def test_model_list(served):
    listing = model_list(served)
    assert [m["id"] for m in listing["data"]] == [MODEL]
    assert listing["data"][0]["max_model_len"] == MAX_MODEL_LEN


# -- sampling extensions and structured outputs --------------------------------------------


def test_penalties_bias_and_min_tokens_reach_the_sampling_params(served):
    body = {"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1.0,
            "repetition_penalty": 1.2, "logit_bias": {"7": -100, "9": 2.5}, "min_tokens": 3,
            "max_tokens": 8, "prompt_logprobs": 2}  # fmt: skip
    params = parse_completion_request(body, served).input.params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.repetition_penalty == 1.2 and params.min_tokens == 3
    assert params.logit_bias == {7: -100.0, 9: 2.5} and params.prompt_logprobs == 2


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object"}, "strict": True}}},
         {"json": '{"type": "object"}'}),
        ({"guided_json": {"type": "integer"}}, {"json": '{"type": "integer"}'}),
        ({"guided_json": '{"type": "integer"}'}, {"json": '{"type": "integer"}'}),
        ({"guided_regex": "[ab]+"}, {"regex": "[ab]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
        ({"structured_outputs": {"choice": ["a"], "disable_any_whitespace": True}},
         {"choice": ["a"], "disable_any_whitespace": True}),
        ({"response_format": {"type": "text"}}, None),
    ],
)  # fmt: skip
def test_every_way_of_asking_for_structure(served, extra, expected):
    for parse, base in ((parse_completion_request, {"prompt": "x"}),
                        (parse_chat_request, {"messages": CONVERSATIONS[0]})):  # fmt: skip
        structured = parse({**base, **extra}, served).input.params.structured_outputs
        if expected is None:
            assert structured is None
        else:
            got = {k: getattr(structured, k) for k in expected}
            assert got == expected


def test_echo_with_logprobs_asks_for_the_prompts_logprobs(served):
    req = parse_completion_request({"prompt": "x y", "echo": True, "logprobs": 2}, served)
    assert req.echo_prompt == "x y" and req.input.params.prompt_logprobs == 2
    plain = parse_completion_request({"prompt": "x y", "echo": True}, served)
    assert plain.echo_prompt == "x y" and plain.input.params.prompt_logprobs is None


def test_suffix_uses_the_models_fill_in_the_middle_tokens(served, tokenizer, monkeypatch):
    vocab = {**tokenizer.hf.get_vocab(), "<|fim_prefix|>": 1, "<|fim_suffix|>": 2,
             "<|fim_middle|>": 3}  # fmt: skip
    monkeypatch.setattr(tokenizer.hf, "get_vocab", lambda: vocab)
    req = parse_completion_request({"prompt": "def f(", "suffix": "return x"}, served)
    assert req.input.prompt == "<|fim_prefix|>def f(<|fim_suffix|>return x<|fim_middle|>"


CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "weather", "parameters": CITY}}


def test_a_forced_tool_choice_constrains_the_output_to_its_schema(served):
    import json

    named = {"type": "function", "function": {"name": "weather"}}
    req = parse_chat_request({"messages": CONVERSATIONS[0], "tools": [TOOL],
                              "tool_choice": named}, served)  # fmt: skip
    assert req.tools.forced and req.tools.named == "weather"
    assert json.loads(req.input.params.structured_outputs.json) == TOOL["function"]["parameters"]
    req = parse_chat_request({"messages": CONVERSATIONS[0], "tools": [TOOL],
                              "tool_choice": "required"}, served)  # fmt: skip
    assert json.loads(req.input.params.structured_outputs.json)["type"] == "array"
    none = parse_chat_request({"messages": CONVERSATIONS[0], "tools": [TOOL],
                               "tool_choice": "none"}, served)  # fmt: skip
    assert none.tools is None and none.input.params.structured_outputs is None
