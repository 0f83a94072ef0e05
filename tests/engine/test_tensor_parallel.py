"""Tensor parallelism inside one instance (cluster/engine/parallel.py): every rank is its own
process running the same engine over its weight shards, gloo all-reduces between them. Greedy
output of TP=2 and TP=4 (KV heads replicated: 2 KV heads over 4 ranks) equals TP=1 and the
`transformers` reference, for the tiny Llama and for Qwen2 (q/k/v biases: sharded with their
heads) and a tied-embedding Llama."""

from __future__ import annotations

import pytest

from tests.helpers import hf_greedy

PROMPTS = [[5, 6, 7], list(range(3, 40)), [11 + (i * 7) % 400 for i in range(90)]]
MAX_TOKENS = 10


def _rank_main(rank: int, init_method: str, size: int, model_dir: str, pp: int) -> tuple:
    import torch

    from cluster.engine.config import CacheConfig, EngineConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            tensor_parallel_size=size // pp,
            tensor_parallel_rank=rank % (size // pp),
            pipeline_parallel_size=pp,
            pipeline_parallel_rank=rank // (size // pp),
            dist_init_method=init_method,
            cache=CacheConfig(num_blocks=64),
        )
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    out = [o.token_ids for o in engine.generate(PROMPTS, params)]
    engine.check_integrity()
    return out, tuple(engine.runner.kv_cache.shape)


def run_tp(model_dir: str, size: int, pp: int = 1) -> list:
    """Run PROMPTS on an instance of `size` ranks in `pp` stages, one process per rank;
    [(rank, token ids, KV pool shape)] in rank order."""
    from cluster.engine.parallel import run_local_ranks

    results = run_local_ranks(_rank_main, size, (size, model_dir, pp), timeout_s=240)
    return [(rank, out, shape) for rank, (out, shape) in enumerate(results)]


@pytest.mark.parametrize("size", [2, 4])
def test_tp_equals_tp1_and_transformers(tiny_model_dir, size):
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    expected = hf_greedy(str(tiny_model_dir), PROMPTS, MAX_TOKENS)
    single = LLMEngine.from_model(str(tiny_model_dir))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in single.generate(PROMPTS, params)] == expected
    results = run_tp(str(tiny_model_dir), size)
    for rank, out, shape in results:
        assert out == expected, f"rank {rank}"
        # Each rank caches only its KV heads: 2 KV heads split (TP=2) or one each (TP=4).
        assert shape[1] == 1


@pytest.mark.parametrize(("size", "pp"), [(2, 2), (4, 2)])
def test_pipeline_parallel_equals_tp1_and_transformers(tiny_model_dir, size, pp):
    """PP=2 (two layers a stage) and TP=2 x PP=2: every rank's replica sees the same tokens,
    each stage caches only its layers and its TP rank's heads."""
    expected = hf_greedy(str(tiny_model_dir), PROMPTS, MAX_TOKENS)
    for rank, out, shape in run_tp(str(tiny_model_dir), size, pp):
        assert out == expected, f"rank {rank}"
        assert shape[2] == 4 // pp  # the tiny model's 4 layers, split over the stages
        assert shape[1] == 2 // (size // pp)  # 2 KV heads over the stage's TP ranks


def _feature_params() -> list:
    """A grammar, penalties, logit_bias, min_tokens and prompt logprobs, one prompt each."""
    from cluster.engine.sampling_params import SamplingParams, StructuredOutputs

    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    grammar = StructuredOutputs(json=schema, disable_any_whitespace=True)
    return [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured_outputs=grammar,
                       presence_penalty=0.5, prompt_logprobs=2),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, ignore_eos=True,
                       frequency_penalty=1.0, repetition_penalty=1.2, logit_bias={9: 3.0}),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, min_tokens=4,
                       prompt_logprobs=0, logit_bias={1: 50.0}),
    ]  # fmt: skip


def _feature_rank_main(rank: int, init_method: str, size: int, model_dir: str, pp: int):
    import torch

    from cluster.engine.config import CacheConfig, EngineConfig
    from cluster.engine.llm_engine import LLMEngine

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(
        model=model_dir, tensor_parallel_size=size // pp, tensor_parallel_rank=rank % (size // pp),
        pipeline_parallel_size=pp, pipeline_parallel_rank=rank // (size // pp),
        dist_init_method=init_method, cache=CacheConfig(num_blocks=64),
    ))  # fmt: skip
    outs = engine.generate(PROMPTS, _feature_params())
    return [(o.token_ids, o.text, o.prompt_logprobs) for o in outs]


@pytest.mark.parametrize(("size", "pp"), [(2, 1), (2, 2)])
def test_sampling_features_under_tp_and_pp(tiny_model_dir, size, pp):
    """Every rank applies the same masks and penalties and gets the prompt logprobs (the
    last stage computes them, the others receive them): the same as one process."""
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.parallel import run_local_ranks

    single = LLMEngine.from_model(str(tiny_model_dir)).generate(PROMPTS, _feature_params())
    expected = [(o.token_ids, o.text, o.prompt_logprobs) for o in single]
    assert expected[0][1].startswith('{"n":') and expected[2][0][-1] == 1  # EOS after 4
    args = (size, str(tiny_model_dir), pp)
    for rank, outs in enumerate(run_local_ranks(_feature_rank_main, size, args, timeout_s=240)):
        for (ids, text, plp), (ref_ids, ref_text, ref_plp) in zip(outs, expected, strict=True):
            assert (ids, text) == (ref_ids, ref_text), f"rank {rank}"
            assert (plp is None) == (ref_plp is None)
            for got, ref in zip(plp or [], ref_plp or [], strict=True):
                if ref is not None:
                    assert got[0] == pytest.approx(ref[0], abs=1e-4)
                    assert [t for t, _ in got[1]] == [t for t, _ in ref[1]]


def test_microbatches_split_a_step_by_tokens():
    from cluster.engine.model_runner import split_microbatches
    from cluster.engine.request import Request
    from cluster.engine.sampling_params import SamplingParams
    from cluster.engine.scheduler import SchedulerOutput

    plan = SchedulerOutput()
    for i, n in enumerate([1, 1, 1, 1, 60, 4]):
        r = Request(f"r{i}", list(range(3, 3 + n)), SamplingParams())
        plan.requests.append(r)
        plan.num_scheduled_tokens[r.request_id] = n
    parts = split_microbatches(plan, 2)
    assert [[r.request_id for r in p.requests] for p in parts] == [
        ["r0", "r1", "r2", "r3", "r4"],
        ["r5"],
    ]
    assert sum(p.total_num_tokens for p in parts) == plan.total_num_tokens
    assert len(split_microbatches(plan, 8)) <= 6  # never an empty micro-batch
    assert all(p.requests for p in split_microbatches(plan, 8))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama-linear-rope-tied"])
def test_tp2_on_other_families(family_model_dir, family):
    model_dir = str(family_model_dir(family))
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    for _, out, _ in run_tp(model_dir, 2):
        assert out == expected
    if family == "llama-linear-rope-tied":  # the tied head on the last stage, not the first
        for _, out, _ in run_tp(model_dir, 2, pp=2):
            assert out == expected


def test_tp_refuses_bad_settings(tiny_model_dir):
    from cluster.engine.config import EngineConfig

    with pytest.raises(ValueError, match="dist_init_method"):
        EngineConfig(model=str(tiny_model_dir), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_rank"):
        EngineConfig(tensor_parallel_size=2, tensor_parallel_rank=2, dist_init_method="tcp://x:1")
    with pytest.raises(ValueError, match="dist_timeout_s must be > 0"):
        EngineConfig(dist_timeout_s=0)


def test_sizes_the_model_cannot_take_are_refused_with_the_ones_it_can(tiny_model_dir):
    """Before any process group forms: the engine, and start_ray before any actor starts."""
    import asyncio

    from cluster.engine.config import EngineConfig, ModelConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.parallel import check_parallel
    from cluster.launch import DeploymentConfig, PoolSpec, start_ray

    model = ModelConfig.from_pretrained(tiny_model_dir)  # 4 heads, 2 KV heads, 4 layers
    for tp in (1, 2, 4):
        check_parallel(model, tp, model.num_layers)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .* use one of \[1, 2, 4\]"):
        check_parallel(model, 3, 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=8"):
        check_parallel(model, 8, 1)
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        check_parallel(model, 1, 5)
    config = EngineConfig(model=str(tiny_model_dir), pipeline_parallel_size=5,
                          dist_init_method="tcp://127.0.0.1:1")  # fmt: skip
    with pytest.raises(ValueError, match="pipeline_parallel_size=5"):
        LLMEngine(config)  # refused before it would wait for ranks at the rendezvous
    deployment = DeploymentConfig(model=str(tiny_model_dir),
                                  decode=PoolSpec(engine={"tensor_parallel_size": 3}))  # fmt: skip
    with pytest.raises(ValueError, match="the decode pool: tensor_parallel_size=3"):
        asyncio.run(start_ray(deployment))  # (no Ray needed: nothing is started)


def test_parallel_instances_need_ray(tiny_model_dir):
    import asyncio

    from cluster.launch import DeploymentConfig, PoolSpec, start_local

    config = DeploymentConfig(model=str(tiny_model_dir), mode="colocated",
                              colocated=PoolSpec(engine={"pipeline_parallel_size": 2}))  # fmt: skip
    with pytest.raises(ValueError, match="runs its ranks as Ray actors"):
        asyncio.run(start_local(config))
