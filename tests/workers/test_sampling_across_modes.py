"""Sampling features through the whole serving path, colocated and disaggregated, in one
process (real engines, NIXL between prefill and decode, the data plane on loopback): the
prefill samples token 1 under the request's grammar and the decode instance continues from
the grammar state it implies, so outputs are valid and identical to colocated ones (greedy
and seeded); penalties, logit_bias and min_tokens give the same tokens in both modes;
prompt logprobs come once, on the router's first chunk, and agree across modes."""

from __future__ import annotations

import json

import jsonschema
import pytest

from cluster.engine.sampling_params import SamplingParams, StructuredOutputs
from cluster.launch import create_local
from cluster.loop_thread import LoopThread
from cluster.router.types import GenerateInput, InvalidRequest
from tests.helpers import assert_all_blocks_free, random_prompts

pytest.importorskip("nixl")

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["color", "count", "tags"],
    "additionalProperties": False,
}
PROMPTS = random_prompts([6, 19, 33], seed=23)
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def routers(tiny_model_dir):
    loop = LoopThread()
    made = {mode: loop.run(create_local(str(tiny_model_dir), mode=mode))
            for mode in ("colocated", "disaggregated")}  # fmt: skip
    yield loop, made
    for router in made.values():
        loop.run(router.shutdown())
    loop.close()


async def _collect(router, prompt, params):
    chunks = [c async for c in router.generate(GenerateInput(prompt=prompt, params=params))]
    return chunks


def run_both(routers, prompt, params):
    loop, made = routers
    return {mode: loop.run(_collect(router, prompt, params)) for mode, router in made.items()}


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks) -> str:
    return "".join(c.text for c in chunks)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            structured_outputs=StructuredOutputs(
                json=json.dumps(SCHEMA), disable_any_whitespace=True
            ),
        ),
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=5,
            structured_outputs=StructuredOutputs(json=json.dumps(SCHEMA)),
        ),
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.8,
            seed=9,
            presence_penalty=1.0,
            structured_outputs=StructuredOutputs(regex=r"[a-z]{3,8}( [a-z]{3,8}){2}"),
        ),
    ],
    ids=["greedy-json", "seeded-json", "seeded-regex-penalised"],
)
def test_grammar_continues_on_the_decode_instance(routers, params):
    for prompt in PROMPTS:
        got = run_both(routers, prompt, params)
        assert tokens(got["disaggregated"]) == tokens(got["colocated"])
        assert text(got["disaggregated"]) == text(got["colocated"])
        last = got["disaggregated"][-1]
        assert last.finish_reason == "stop"
        assert last.timing.kv_bytes > 0 and not last.timing.local_prefill  # a real handoff
        if params.structured_outputs.json is not None:
            jsonschema.validate(json.loads(text(got["disaggregated"])), SCHEMA)


def test_penalties_bias_and_min_tokens_agree_across_modes(routers):
    loop, made = routers
    eos = 1  # the tiny model's
    params = SamplingParams(max_tokens=24, temperature=0.0, frequency_penalty=0.8,
                            repetition_penalty=1.2, logit_bias={eos: 30.0, 11: 2.0},
                            min_tokens=6)  # fmt: skip
    for prompt in PROMPTS:
        got = run_both(routers, prompt, params)
        assert tokens(got["disaggregated"]) == tokens(got["colocated"])
        assert len(tokens(got["colocated"])) == 7  # EOS, held back until 6 tokens


def test_prompt_logprobs_come_once_and_agree_across_modes(routers):
    params = SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=3, logprobs=1)
    got = run_both(routers, PROMPTS[2], params)
    for chunks in got.values():
        assert chunks[0].prompt_logprobs is not None
        assert all(c.prompt_logprobs is None for c in chunks[1:])
    colocated = got["colocated"][0].prompt_logprobs
    disaggregated = got["disaggregated"][0].prompt_logprobs
    assert len(colocated) == len(PROMPTS[2]) and colocated[0] is None
    for (lp, top), (lp2, top2) in zip(colocated[1:], disaggregated[1:], strict=True):
        assert lp == pytest.approx(lp2, abs=1e-5) and len(top) == 3
        assert [t for t, _ in top] == [t for t, _ in top2]


def test_an_invalid_grammar_is_invalid_request_in_both_modes(routers):
    loop, made = routers
    params = SamplingParams(structured_outputs=StructuredOutputs(regex="(unclosed"))
    for router in made.values():
        with pytest.raises(InvalidRequest, match="structured_outputs.regex is not valid"):
            loop.run(_collect(router, PROMPTS[0], params))


def test_every_block_is_free_afterwards(routers):
    loop, made = routers
    for router in made.values():
        assert_all_blocks_free(loop, router.instances)
