"""Greedy output of our engine equals `transformers` (same weights, fp32, CPU) for every
supported family, single and batched, with prefix caching on and off, with chunked prefill at
several chunk sizes, and under preemption (DESIGN.md invariant 3)."""

from __future__ import annotations

import pytest

from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from tests.helpers import FAMILY_CONFIGS, hf_greedy, random_prompts

MAX_TOKENS = 20
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def run_engine(model_dir, prompts, **overrides) -> tuple[list[list[int]], LLMEngine]:
    cache = overrides.pop("cache", CacheConfig())
    scheduler = overrides.pop("scheduler", SchedulerConfig())
    engine = LLMEngine(EngineConfig(model=str(model_dir), cache=cache, scheduler=scheduler))
    outputs = engine.generate(prompts, GREEDY)
    engine.check_integrity()
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    return [o.token_ids for o in outputs], engine


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_matches_transformers(family, family_model_dir):
    model_dir = family_model_dir(family)
    prompts = random_prompts([3, 17, 40, 70], seed=1)
    expected = hf_greedy(model_dir, prompts)
    batched, _ = run_engine(model_dir, prompts)
    assert batched == expected
    single, _ = run_engine(model_dir, prompts[2:3])
    assert single == expected[2:3]


@pytest.fixture(scope="module")
def llama_case(family_model_dir):
    """Prompts that share a 40-token prefix (so prefix caching has work), and the reference."""
    model_dir = family_model_dir("llama")
    shared = random_prompts([40], seed=7)[0]
    prompts = random_prompts([5, 23, 50, 1], seed=3, prefix=shared) + random_prompts([30], 4)
    return model_dir, prompts, hf_greedy(model_dir, prompts)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_on_and_off(llama_case, prefix_caching):
    model_dir, prompts, expected = llama_case
    cache = CacheConfig(enable_prefix_caching=prefix_caching)
    engine = LLMEngine(EngineConfig(model=str(model_dir), cache=cache))
    first = engine.generate(prompts[:1], GREEDY)  # publishes the shared prefix
    rest = engine.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in first + rest] == expected
    num_cached = [o.num_cached_tokens for o in rest]
    if prefix_caching:
        assert all(n >= 32 for n in num_cached[:3]), num_cached  # two 16-token blocks at least
        assert engine.scheduler.num_prefix_hit_tokens == sum(num_cached)
        assert engine.scheduler.num_prefix_query_tokens == sum(map(len, prompts))
    else:
        assert num_cached == [0] * len(rest)
    engine.check_integrity()
    assert engine.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("budget,chunk_cap", [(7, 0), (16, 0), (64, 0), (2048, 13)])
def test_chunked_prefill(llama_case, budget, chunk_cap):
    model_dir, prompts, expected = llama_case
    scheduler = SchedulerConfig(
        max_num_batched_tokens=budget, long_prefill_token_threshold=chunk_cap
    )
    got, _ = run_engine(model_dir, prompts, scheduler=scheduler)
    assert got == expected


def test_preemption_recomputes_correctly(llama_case):
    model_dir, prompts, expected = llama_case
    # 12 blocks of 16 tokens: the five requests need ~25 blocks at their peak together.
    cache = CacheConfig(num_blocks=12, enable_prefix_caching=False)
    got, engine = run_engine(model_dir, prompts, cache=cache)
    assert got == expected
    assert engine.scheduler.num_preemptions > 0


def test_preemption_with_prefix_cache_and_small_chunks(llama_case):
    model_dir, prompts, expected = llama_case
    # 16 blocks of 8 tokens hold the longest request (110 tokens) alone, not all five at once.
    cache = CacheConfig(num_blocks=16, block_size=8)
    scheduler = SchedulerConfig(max_num_batched_tokens=24)
    got, engine = run_engine(model_dir, prompts, cache=cache, scheduler=scheduler)
    assert got == expected
    assert engine.scheduler.num_preemptions > 0
