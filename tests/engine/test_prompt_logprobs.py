"""prompt_logprobs (vLLM's meaning): for every prompt token after the first, its logprob and
the top-N alternatives, under the raw model distribution. They equal a reference from
`transformers`' full-sequence logits of the same weights, whole or chunked, alone or batched,
with or without a cached prefix (a request that asks computes every position), and come with
the request's first output only."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.config import EngineConfig, SchedulerConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from tests.helpers import random_prompts

PROMPTS = random_prompts([40, 23, 2], seed=17)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32
    ).eval()

    def prompt_logprobs(prompt: list[int], top_n: int):
        with torch.inference_mode():
            logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        out = [None]
        for j in range(1, len(prompt)):
            values, ids = logprobs[j - 1].topk(top_n) if top_n else (torch.empty(0),) * 2
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out.append((logprobs[j - 1, prompt[j]].item(), top))
        return out

    return prompt_logprobs


def assert_close(got, expected) -> None:
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for (lp, top), (ref_lp, ref_top) in zip(got[1:], expected[1:], strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert [t for t, _ in top] == [t for t, _ in ref_top]
        assert [v for _, v in top] == pytest.approx([v for _, v in ref_top], abs=1e-4)


def engine_with(tiny_model_dir, **scheduler) -> LLMEngine:
    config = EngineConfig(model=str(tiny_model_dir), scheduler=SchedulerConfig(**scheduler))
    return LLMEngine(config)


@pytest.mark.parametrize("budget", [2048, 7])  # whole prompts, and chunks of 7 tokens
def test_equal_reference_whole_and_chunked(tiny_model_dir, reference, budget):
    engine = engine_with(tiny_model_dir, max_num_batched_tokens=budget)
    params = [SamplingParams(max_tokens=3, prompt_logprobs=n) for n in (5, 0, 20)]
    outs = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs, strict=True):
        assert_close(out.prompt_logprobs, reference(prompt, p.prompt_logprobs))
    engine.check_integrity()


def test_only_the_first_output_carries_them_and_others_have_none(tiny_model_dir):
    engine = engine_with(tiny_model_dir)
    engine.add_request("asks", PROMPTS[0], SamplingParams(max_tokens=4, prompt_logprobs=1))
    engine.add_request("plain", PROMPTS[1], SamplingParams(max_tokens=4))
    seen = {"asks": [], "plain": []}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out.prompt_logprobs)
    assert seen["asks"][0] is not None and len(seen["asks"][0]) == len(PROMPTS[0])
    assert all(x is None for x in seen["asks"][1:] + seen["plain"])


def test_a_cached_prefix_is_computed_again_for_them(tiny_model_dir, reference):
    engine = engine_with(tiny_model_dir)
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=1))  # caches the prompt's blocks
    again = engine.generate(PROMPTS[0], SamplingParams(max_tokens=1))[0]
    assert again.num_cached_tokens >= 32
    out = engine.generate(PROMPTS[0], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.num_cached_tokens == 0
    assert_close(out.prompt_logprobs, reference(PROMPTS[0], 2))


def test_prefill_role_returns_them_with_the_prefilled_output(tiny_model_dir, reference):
    prefill = LLMEngine(EngineConfig(model=str(tiny_model_dir), role="prefill"))
    out = prefill.generate(PROMPTS[1], SamplingParams(max_tokens=8, prompt_logprobs=3))[0]
    assert out.finish_reason == "prefilled"
    assert_close(out.prompt_logprobs, reference(PROMPTS[1], 3))
    prefill.release(out.request_id)
