"""The OpenAI fields a migrating user expects, through the real HTTP API (official `openai`
client) and the gRPC API, over in-process routers with real engines in both modes: logit
bias and penalties, structured outputs (response_format, vLLM's guided_* fields), tool calls
in three families' formats (streamed and not), tool_choice required and named, echo and
prompt_logprobs.

Scripted tool-call outputs come from the real tiny model under a one-string `guided_choice`:
the grammar makes it write exactly the script, so the whole path (template, engine, grammar,
detokenizer, parser, stream) is the real one."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import jsonschema
import openai
import pytest

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import create_local
from cluster.router.grpc_server import start_grpc_server
from cluster.router.http_server import start_http_server, stop_http_server
from tests.helpers import LoopThread
from tests.router.tool_templates import TEMPLATES, with_template

MODES = ["colocated", "disaggregated"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "clock",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
MESSAGES = [{"role": "user", "content": "Weather in Paris, and the time?"}]
SCRIPTS = {
    "hermes": 'Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", '
    '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "clock", "arguments": '
    '{"zone": "CET"}}\n</tool_call>',
    "llama3_json": '{"name": "weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
    '{"name": "clock", "parameters": {"zone": "CET"}}',
    "mistral": '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris", "unit": '
    '"celsius"}}, {"name": "clock", "arguments": {"zone": "CET"}}]',
}
EXPECTED_CALLS = [("weather", {"city": "Paris", "unit": "celsius"}), ("clock", {"zone": "CET"})]
ANSWER = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["calm", "stormy", "foggy"]},
        "ships": {"type": "integer", "minimum": 0, "maximum": 99},
        "lit": {"type": "boolean"},
    },
    "required": ["mood", "ships", "lit"],
    "additionalProperties": False,
}


class _Served:
    """Routers (with HTTP and gRPC servers) made on first use, one per (mode, model)."""

    def __init__(self, tiny_model_dir, tmp_path_factory) -> None:
        self.loop = LoopThread()
        self.tiny = tiny_model_dir
        self.tmp = tmp_path_factory
        self._made: dict = {}
        self._stops: list = []

    def get(self, mode: str, family: str | None = None) -> SimpleNamespace:
        key = (mode, family)
        if key not in self._made:
            model = self.tiny
            if family is not None:
                model = with_template(self.tiny, self.tmp.mktemp(family), TEMPLATES[family])
            call = self.loop.run
            router = call(create_local(model_dir=str(model), mode=mode))
            http, task, port = call(start_http_server(router, port=0))
            server, grpc_port = call(start_grpc_server(router, port=0))
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
            self._stops.append((router, http, task, server, channel))
            self._made[key] = SimpleNamespace(
                router=router,
                client=openai.OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120
                ),
                aclient_url=f"http://127.0.0.1:{port}/v1",
                stub=pb_grpc.PDClusterStub(channel),
                model=router.model_info.name,
            )
        return self._made[key]

    def close(self) -> None:
        for router, http, task, server, channel in self._stops:
            channel.close()
            self.loop.run(server.stop(None))
            self.loop.run(stop_http_server(http, task))
            self.loop.run(router.shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    pool = _Served(tiny_model_dir, tmp_path_factory)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir)))


# -- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_logit_bias_of_100_forces_the_token(served, mode):
    s = served.get(mode)
    out = s.client.completions.create(
        model=s.model,
        prompt="The keeper",
        max_tokens=6,
        temperature=1.0,
        seed=3,
        logit_bias={"77": 100},
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].logprobs is None
    ids = s.stub.Complete(
        pb.GenerateRequest(
            text="The keeper",
            sampling_params=pb.SamplingParams(
                max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logit_bias={77: 100.0}
            ),
        )
    ).token_ids
    assert list(ids) == [77] * 6


@pytest.mark.parametrize("mode", MODES)
def test_penalties_and_bias_give_the_engines_own_output(served, engine, mode):
    """The API carries every field to the engine (whose sampler is checked against a torch
    reference of the published semantics in tests/engine)."""
    s = served.get(mode)
    fields = dict(
        presence_penalty=0.8,
        frequency_penalty=0.6,
        repetition_penalty=1.3,
        logit_bias={12: 3.0, 40: -5.0},
        min_tokens=4,
    )
    reference = engine.generate(
        "The keeper climbed", SamplingParams(temperature=0, max_tokens=12, **fields)
    )[0]
    out = s.client.completions.create(
        model=s.model,
        prompt="The keeper climbed",
        max_tokens=12,
        temperature=0,
        presence_penalty=0.8,
        frequency_penalty=0.6,
        logit_bias={"12": 3.0, "40": -5.0},
        extra_body={"repetition_penalty": 1.3, "min_tokens": 4},
    )
    assert out.choices[0].text == reference.text
    plain = engine.generate("The keeper climbed", SamplingParams(temperature=0, max_tokens=12))
    assert plain[0].token_ids != reference.token_ids  # the fields did something


# -- structured outputs --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_json_schema_samples_all_validate(served, mode):
    """50 seeded samples at temperature 1 from a random model: the grammar, not the model,
    makes every one valid."""
    s = served.get(mode)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "lamp", "schema": ANSWER, "strict": True},
    }

    async def sample(client, seed):
        out = await client.chat.completions.create(
            model=s.model,
            messages=MESSAGES,
            temperature=1.0,
            seed=seed,
            max_tokens=600,
            response_format=response_format,
        )
        return out.choices[0].message.content, out.choices[0].finish_reason

    async def all_samples():
        client = openai.AsyncOpenAI(base_url=s.aclient_url, api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(sample(client, seed) for seed in range(50)))
        finally:
            await client.close()

    results = asyncio.run(all_samples())
    for text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), ANSWER)
    assert len({text for text, _ in results}) > 1  # sampled, not one fixed string


@pytest.mark.parametrize("mode", MODES)
def test_regex_choice_and_json_object(served, mode):
    s = served.get(mode)
    regex = s.client.completions.create(
        model=s.model,
        prompt="Code:",
        max_tokens=20,
        temperature=1.0,
        seed=1,
        extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"},
    )
    text = regex.choices[0].text
    assert len(text) == 6 and text[:3].isupper() and text[3] == "-" and text[4:].isdigit()
    choice = s.client.chat.completions.create(
        model=s.model, messages=MESSAGES, max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].message.content in ("yes", "no")
    obj = s.client.chat.completions.create(
        model=s.model,
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        extra_body={
            "structured_outputs": {
                "json": {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"}},
                    "required": ["ok"],
                    "additionalProperties": False,
                },
                "disable_any_whitespace": True,
            }
        },
    )
    assert isinstance(json.loads(obj.choices[0].message.content)["ok"], bool)
    grpc_out = s.stub.Complete(
        pb.GenerateRequest(
            text="Code:",
            sampling_params=pb.SamplingParams(
                max_tokens=10,
                structured_outputs=pb.StructuredOutputs(
                    choice=pb.ChoiceList(choices=["left", "right"])
                ),
            ),
        )
    )
    assert grpc_out.text in ("left", "right")


def test_a_bad_schema_is_a_400(served):
    s = served.get("colocated")
    with pytest.raises(openai.BadRequestError):
        s.client.completions.create(
            model=s.model, prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"}
        )


# -- tools ---------------------------------------------------------------------------------


def _calls(tool_calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls]


@pytest.mark.parametrize(
    "mode, family",
    [
        ("colocated", "hermes"),
        ("colocated", "llama3_json"),
        ("colocated", "mistral"),
        ("disaggregated", "hermes"),
    ],
)
def test_tool_calls_of_each_family_whole_and_streamed(served, mode, family):
    s = served.get(mode, family)
    script = {"guided_choice": [SCRIPTS[family]]}
    whole = s.client.chat.completions.create(
        model=s.model, messages=MESSAGES, tools=TOOLS, max_tokens=400, extra_body=script
    )
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert _calls(message.tool_calls) == EXPECTED_CALLS
    assert all(c.id.startswith("call_") and c.type == "function" for c in message.tool_calls)
    assert message.content == ("Checking." if family == "hermes" else None)

    stream = s.client.chat.completions.create(
        model=s.model,
        messages=MESSAGES,
        tools=TOOLS,
        max_tokens=400,
        stream=True,
        extra_body=script,
    )
    content, calls, finish = "", {}, None
    for chunk in stream:  # accumulated the way OpenAI's docs show
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = entry["id"] or call.id
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    got = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
    assert got == EXPECTED_CALLS and all(c["id"] for c in calls.values())
    assert content.strip() == (message.content or "")
    # the next turn carries the calls and their results back through the template
    follow = [
        *MESSAGES,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C"},
        {"role": "tool", "tool_call_id": message.tool_calls[1].id, "content": "13:05"},
    ]
    answer = s.client.chat.completions.create(
        model=s.model, messages=follow, tools=TOOLS, max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert answer.usage.completion_tokens == 4  # (rendering: test_tool_parsers.py vs HF)


@pytest.mark.parametrize("mode", MODES)
def test_tool_choice_required_and_named_always_call(served, mode):
    s = served.get(mode, "hermes")
    for seed in range(4):
        out = s.client.chat.completions.create(
            model=s.model,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        calls = _calls(out.choices[0].message.tool_calls)
        assert calls and out.choices[0].finish_reason == "tool_calls"
        for name, arguments in calls:
            schema = {"weather": WEATHER, "clock": CLOCK}[name]["function"]["parameters"]
            jsonschema.validate(arguments, schema)
    named = s.client.chat.completions.create(
        model=s.model,
        messages=MESSAGES,
        tools=TOOLS,
        max_tokens=200,
        temperature=1.0,
        seed=9,
        tool_choice={"type": "function", "function": {"name": "clock"}},
    )
    ((name, arguments),) = _calls(named.choices[0].message.tool_calls)
    assert name == "clock" and arguments["zone"] in ("UTC", "CET")


def test_tools_without_a_known_format_are_a_400(served):
    s = served.get("colocated")  # the tiny model's template renders no tools
    with pytest.raises(openai.BadRequestError, match="tool-call format"):
        s.client.chat.completions.create(model=s.model, messages=MESSAGES, tools=TOOLS)


# -- echo and prompt logprobs --------------------------------------------------------------


def test_echo_and_prompt_logprobs_are_the_same_in_both_modes(served):
    prompt = "The keeper climbed the steps"
    results = []
    for mode in MODES:
        s = served.get(mode)
        out = s.client.completions.create(
            model=s.model, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
        )
        choice = out.choices[0]
        assert choice.text.startswith(prompt)
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert "".join(lp.tokens) == choice.text and len(lp.tokens) == len(lp.text_offset)
        raw = s.client.completions.with_raw_response.create(
            model=s.model, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 1}
        ).http_response.json()["choices"][0]["prompt_logprobs"]
        assert raw[0] is None and all(len(entry) in (1, 2) for entry in raw[1:])
        grpc_out = s.stub.Complete(
            pb.GenerateRequest(
                text=prompt, sampling_params=pb.SamplingParams(max_tokens=1, prompt_logprobs=1)
            )
        )
        assert len(grpc_out.prompt_logprobs) == len(raw)
        results.append((lp.token_logprobs, raw))
    (a, raw_a), (b, raw_b) = results
    assert a[:-3] == pytest.approx(b[:-3], abs=1e-4) and a[-3:] == pytest.approx(b[-3:], abs=1e-4)
    assert [sorted(e) if e else e for e in raw_a] == [sorted(e) if e else e for e in raw_b]


# -- n and best_of -------------------------------------------------------------------------

LONG_PROMPT = list(range(5, 5 + 200))  # 12.5 blocks: 12 full ones to share


def _cache_counts(s) -> dict[tuple[str, str], float]:
    """(metric, role) -> total over the instances: prefix-cache queries and hits (tokens)."""
    counts: dict[tuple[str, str], float] = {}
    for line in served_metrics(s).splitlines():
        for name in ("queries", "hits"):
            if line.startswith(f"vllm:prefix_cache_{name}_total{{"):
                role = line.split('role="', 1)[1].split('"', 1)[0]
                counts[name, role] = counts.get((name, role), 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def served_metrics(s) -> str:
    return s.loop.run(s.router.metrics_text()).decode()


@pytest.mark.parametrize("mode", MODES)
def test_n_choices_one_prefill_reproducible_every_block_freed(served, mode):
    from tests.helpers import assert_all_blocks_free, wait_until

    s = served.get(mode)
    s.loop = served.loop
    before = _cache_counts(s)
    first = s.client.completions.create(
        model=s.model,
        prompt=LONG_PROMPT,
        max_tokens=8,
        n=4,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in first.choices) == [0, 1, 2, 3]
    assert len({c.text for c in first.choices}) > 1  # four samples, not one copied
    assert first.usage.prompt_tokens == 200 and first.usage.completion_tokens == 32
    # the prompt ran once (on the prefill instance, or the colocated one); the other choices
    # found its 12 full blocks in the cache and computed only the last partial block
    role = "decode" if mode == "disaggregated" else "colocated"

    def delta(name: str, of: str) -> float:
        return _cache_counts(s).get((name, of), 0.0) - before.get((name, of), 0.0)

    wait_until(
        lambda: delta("hits", role) >= 3 * 192,
        timeout_s=10,
        message=lambda: f"cache hits of the other choices: {delta('hits', role)}",
    )
    if mode == "disaggregated":
        assert delta("queries", "prefill") - delta("hits", "prefill") == 200  # one prefill
    else:
        assert delta("queries", role) - delta("hits", role) <= 200 + 3 * 16
    again = s.client.completions.create(
        model=s.model,
        prompt=LONG_PROMPT,
        max_tokens=8,
        n=4,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    # streamed, every choice's chunks carry its index
    texts: dict[int, str] = {}
    for chunk in s.client.completions.create(
        model=s.model,
        prompt=LONG_PROMPT,
        max_tokens=8,
        n=4,
        seed=11,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in first.choices]
    grpc_out = s.stub.Complete(
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=LONG_PROMPT),
            n=4,
            sampling_params=pb.SamplingParams(max_tokens=8, seed=11, ignore_eos=True),
        )
    )
    assert [c.text for c in grpc_out.choices] == [c.text for c in first.choices]
    assert_all_blocks_free(served.loop, s.router.instances)


@pytest.mark.parametrize("mode", MODES)
def test_best_of_returns_the_most_likely_choices(served, mode):
    s = served.get(mode)
    best = s.client.completions.create(
        model=s.model,
        prompt="The keeper",
        max_tokens=6,
        n=2,
        best_of=5,
        seed=4,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    every = s.client.completions.create(
        model=s.model,
        prompt="The keeper",
        max_tokens=6,
        n=5,
        seed=4,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    scores = sorted((sum(c.logprobs.token_logprobs) for c in every.choices), reverse=True)
    got = sorted((sum(c.logprobs.token_logprobs) for c in best.choices), reverse=True)
    assert got == pytest.approx(scores[:2], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="best_of cannot be streamed"):
        s.client.completions.create(model=s.model, prompt="x", n=1, best_of=2, stream=True)


@pytest.mark.parametrize("mode", MODES)
def test_abort_ends_every_choice_and_frees_every_block(served, mode):
    from tests.helpers import assert_all_blocks_free

    s = served.get(mode)
    rid = f"n-abort-{mode}"
    params = pb.SamplingParams(max_tokens=500, ignore_eos=True, seed=1)
    stream = s.stub.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), n=3, request_id=rid,
                           sampling_params=params)
    )  # fmt: skip
    seen: set[int] = set()
    for response in stream:  # until every choice has started
        seen.add(response.index)
        if seen == {0, 1, 2}:
            break
    assert s.stub.Abort(pb.AbortRequest(request_id=rid)).found
    finished = {r.index: r.finish_reason for r in stream if r.finish_reason}
    assert finished == {0: "abort", 1: "abort", 2: "abort"}
    assert_all_blocks_free(served.loop, s.router.instances)
