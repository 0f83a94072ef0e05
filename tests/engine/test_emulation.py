"""The emulated model runner in one process (no Ray): a real LLMEngine whose forward pass is
the placement latency model's step time. Each step's modelled time is AnalyticLatency's for
exactly that batch; the KV pool is the planner's capacity; the tokens are the same whatever
the scheduling (chunked, prefill-first) or the emulated TP; bad emulations fail with a reason;
and prefill-first scheduling never mixes a prompt into a decode step."""

from __future__ import annotations

import time

import pytest

from cluster.emulate import EmulationSettings, describe, emulate, num_devices
from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine.emulation import Emulation
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import DeploymentConfig, PoolSpec
from cluster.placement.hardware import get_hardware, load_catalog
from cluster.placement.instance import ParallelConfig, kv_capacity_tokens
from cluster.placement.latency import AnalyticLatency
from cluster.placement.model_spec import load_model_spec
from tests.helpers import random_prompts

HARDWARE, MODEL = "A100-80GB", "OPT-13B"  # 40 heads, 40 layers
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def emulated_engine(tp: int = 1, pp: int = 1, time_scale: float = 1.0, **options) -> LLMEngine:
    """An emulated engine; `options` are EngineConfig fields (cache, scheduler, ...)."""
    emulation = {"hardware": HARDWARE, "model": MODEL, "tp": tp, "pp": pp,
                 "time_scale": time_scale}  # fmt: skip
    return LLMEngine(EngineConfig(model_runner="emulated", emulation=emulation, **options))


def step_modelled(engine: LLMEngine) -> float:
    """Run one step; the modelled time the runner slept for it (real seconds)."""
    stats = engine.runner.stats
    before = (stats.num_steps, stats.modelled_s, stats.achieved_s)
    engine.step()
    assert stats.num_steps == before[0] + 1
    modelled, achieved = stats.modelled_s - before[1], stats.achieved_s - before[2]
    assert achieved >= modelled  # the sleep never ends early
    return modelled


@pytest.mark.parametrize("time_scale", [1.0, 3.0])
def test_step_time_is_the_latency_models_for_the_batch(time_scale):
    """Prompts of 10 and 20 tokens, then a 6-token prompt joining their decodes, then three
    decodes: each step's modelled time is AnalyticLatency's for that batch x time_scale."""
    engine = emulated_engine(tp=2, time_scale=time_scale)
    latency = AnalyticLatency(load_model_spec(MODEL), get_hardware(HARDWARE, load_catalog()), 2)
    a, b, c = random_prompts([10, 20, 6], seed=3)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("a", a, params)
    engine.add_request("b", b, params)
    # both prompts whole: 30 tokens, attention pairs 10²/2 + 20²/2, no decode
    assert step_modelled(engine) == pytest.approx(latency.mixed_time(30, 250.0, 0, 0) * time_scale)
    engine.add_request("c", c, params)
    # decodes of a (context 10 + 1) and b (20 + 1) beside c's 6 tokens (pairs 6²/2)
    assert step_modelled(engine) == pytest.approx(latency.mixed_time(6, 18.0, 2, 32) * time_scale)
    # three decodes: contexts 12, 22 and 7
    assert step_modelled(engine) == pytest.approx(latency.decode_time(3, 41) * time_scale)
    assert latency.decode_time(3, 41) > 0


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_kv_pool_is_the_planners_capacity(tp, pp):
    engine = emulated_engine(tp, pp)
    hardware = get_hardware(HARDWARE, load_catalog())
    capacity = kv_capacity_tokens(load_model_spec(MODEL), ParallelConfig(hardware, tp, pp))
    block_size = engine.block_manager.block_size
    assert engine.block_manager.num_blocks == capacity // block_size > 0
    assert engine.max_model_len == load_model_spec(MODEL).max_position_embeddings


def test_kv_capacity_and_num_blocks_overrides():
    engine = LLMEngine(
        EngineConfig(
            model_runner="emulated",
            emulation=Emulation(HARDWARE, MODEL, kv_capacity_tokens=4096),
            cache=CacheConfig(block_size=32),
        )
    )
    assert engine.block_manager.num_blocks == 4096 // 32
    fixed = emulated_engine(cache=CacheConfig(num_blocks=200))
    assert fixed.block_manager.num_blocks == 200


def test_tokens_equal_across_scheduling_and_instance_shape():
    """Deterministic hash tokens: chunked prefill (64-token steps), prefill-first (whole
    prompts) and an emulated TP2 instance give the same ids, never an EOS."""
    prompts = random_prompts([5, 40, 100, 300], seed=1)
    chunked = emulated_engine(scheduler=SchedulerConfig(max_num_batched_tokens=64))
    prefill_first = emulated_engine(scheduler=SchedulerConfig(chunked_prefill=False))
    tp2 = emulated_engine(tp=2)
    outputs = [
        [o.token_ids for o in engine.generate(prompts, GREEDY)]
        for engine in (chunked, prefill_first, tp2)
    ]
    assert outputs[0] == outputs[1] == outputs[2]
    assert all(len(ids) == GREEDY.max_tokens for ids in outputs[0])
    assert len({tuple(ids) for ids in outputs[0]}) == len(prompts)  # prompt-dependent
    eos = set(chunked.eos_token_ids)
    assert not eos & {t for ids in outputs[0] for t in ids}
    for engine in (chunked, prefill_first, tp2):
        engine.check_integrity()
        assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_transfer_delay_is_the_models_kv_bytes_over_the_link():
    runner = emulated_engine(tp=2).runner
    spec = load_model_spec(MODEL)
    bandwidth = runner.hardware.inter_node_bandwidth * 2  # one link per rank
    assert runner.transfer_delay_s(2000) - runner.transfer_delay_s(1000) == pytest.approx(
        1000 * spec.kv_bytes_per_token / bandwidth
    )
    given = LLMEngine(
        EngineConfig(
            model_runner="emulated", emulation=Emulation(HARDWARE, MODEL, kv_bandwidth=1e9)
        )
    ).runner
    assert given.transfer_delay_s(1000) - given.transfer_delay_s(0) == pytest.approx(
        1000 * spec.kv_bytes_per_token / 1e9
    )


def test_a_step_after_an_idle_wait_sleeps_its_whole_time():
    """Decode role: a's last token is computed while b's KV is in flight (b reserved, so
    the engine has unfinished work), then steps find nothing to run until b is committed.
    b's step is not back to back with a's: it sleeps its whole modelled time, not what is
    left of it counted from a's end (long past). A lower bound: a sleep never ends early."""
    engine = emulated_engine(role="decode")
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    a, b = random_prompts([30, 50], seed=4)
    engine.add_remote_request("a", a, params)
    engine.commit_remote("a", 5)
    assert engine.add_remote_request("b", b, params) is not None
    engine.step()
    assert engine.has_unfinished() and engine.step() == []  # b's KV still in flight
    time.sleep(0.1)  # (the pull: real time passes while the engine has nothing to run)
    engine.commit_remote("b", 7)
    before, start = engine.runner.stats.modelled_s, time.perf_counter()
    engine.step()
    elapsed, modelled = time.perf_counter() - start, engine.runner.stats.modelled_s - before
    assert modelled > 0 and elapsed >= modelled


# -- what refuses to start ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("emulation", "words"),
    [
        ({"time_scale": 0.5}, "time_scale must be >= 1, got 0.5"),
        ({"tp": 0}, "tp and pp must be >= 1"),
        ({"kv_bandwidth": 0}, "kv_bandwidth must be > 0"),
        ({"hardware": "Z100"}, "unknown hardware 'Z100': the catalog has"),
        ({"model": "GPT-9"}, "unknown model 'GPT-9'"),
        ({"tp": 3}, "cannot emulate OPT-13B on A100-80GB TP3xPP1: TP=3 does not divide"),
        ({"pp": 3}, "PP=3 does not divide the model's 40 layers"),
        ({"model": "Llama-3-70B", "tp": 16}, "TP=16 does not fit in one A100-80GB node"),
        ({"model": "OPT-175B"}, "the weights need"),
        ({"flavour": "x"}, "unknown emulation keys ['flavour']"),
    ],
)
def test_a_bad_emulation_is_refused_with_its_reason(emulation, words):
    entry = {"hardware": HARDWARE, "model": MODEL, **emulation}
    with pytest.raises(ValueError) as info:
        LLMEngine(EngineConfig(model_runner="emulated", emulation=entry))
    assert words in str(info.value)


def test_emulated_runner_and_emulation_go_together_in_one_process():
    with pytest.raises(ValueError, match="go together"):
        EngineConfig(model_runner="emulated")
    with pytest.raises(ValueError, match="go together"):
        EngineConfig(emulation={"hardware": HARDWARE, "model": MODEL})
    with pytest.raises(ValueError, match="one process: give its TP x PP in emulation"):
        LLMEngine(
            EngineConfig(
                model_runner="emulated",
                emulation={"hardware": HARDWARE, "model": MODEL},
                tensor_parallel_size=2,
                dist_init_method="tcp://127.0.0.1:1",
            )
        )


# -- prefill-first scheduling (chunked_prefill: false) ---------------------------------------


class PlanSpy:
    """Records what each step's plan ran (a spy around the real runner's execute):
    [(request id, prefill chunk or decode, tokens)] per step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.steps: list[list[tuple[str, bool, int]]] = []
        execute = engine.runner.execute

        def spy(plan, *args):
            self.steps.append(
                [
                    (r.request_id, r.is_prefilling, plan.num_scheduled_tokens[r.request_id])
                    for r in plan.requests
                ]
            )
            return execute(plan, *args)

        engine.runner.execute = spy

    def mixed_steps(self) -> list:
        return [s for s in self.steps if len({is_prefill for _, is_prefill, _ in s}) > 1]


def run_staggered(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Two prompts, then a third and fourth arriving while those decode; every output."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids

    for i in range(2):
        engine.add_request(f"r{i}", prompts[i], params)
    step()
    step()
    for i in range(2, 4):
        engine.add_request(f"r{i}", prompts[i], params)
    while engine.has_unfinished():
        step()
    return outputs


def test_prefill_first_never_mixes_a_prompt_into_a_decode_step():
    """Prompts that arrive while others decode run whole, alone, in the next step (the
    decodes wait); chunked prefill with the same arrivals runs them beside the decodes."""
    prompts = random_prompts([30, 50, 40, 20], seed=7)
    prefill_first = emulated_engine(scheduler=SchedulerConfig(chunked_prefill=False))
    spy = PlanSpy(prefill_first)
    got = run_staggered(prefill_first, prompts)
    assert spy.steps and not spy.mixed_steps(), spy.steps
    prompt_steps = [s for s in spy.steps if s[0][1]]
    assert prompt_steps[0] == [("r0", True, 30), ("r1", True, 50)]
    assert spy.steps[2] == [("r2", True, 40), ("r3", True, 20)]  # r0, r1 wait a step
    assert len(prompt_steps) == 2  # every prompt whole, in one step

    chunked = emulated_engine()
    chunked_spy = PlanSpy(chunked)
    assert run_staggered(chunked, prompts) == got
    mixed = [("r0", False, 1), ("r1", False, 1), ("r2", True, 40), ("r3", True, 20)]
    assert chunked_spy.steps[2] == mixed
    for engine in (prefill_first, chunked):
        engine.check_integrity()
        assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_prefill_first_batches_whole_prompts_up_to_the_budget():
    """Budget 512: a 700-token prompt runs whole and alone (the first of a step always
    runs, however long); then 100 + 300 (the next 200 no longer fits: it waits); then the
    200, alone, while the others' decodes wait; then decodes only."""
    engine = emulated_engine(
        scheduler=SchedulerConfig(chunked_prefill=False, max_num_batched_tokens=512)
    )
    assert engine.max_model_len == 2048  # prompts over the budget are not refused
    spy = PlanSpy(engine)
    prompts = random_prompts([700, 100, 300, 200], seed=2)
    outputs = engine.generate(prompts, GREEDY)
    assert spy.steps[:3] == [
        [("auto-0", True, 700)],
        [("auto-1", True, 100), ("auto-2", True, 300)],
        [("auto-3", True, 200)],
    ]
    assert not spy.mixed_steps()
    assert all(not is_prefill for step in spy.steps[3:] for _, is_prefill, _ in step)
    assert [o.token_ids for o in outputs] == [
        o.token_ids for o in emulated_engine().generate(prompts, GREEDY)
    ]


def test_prefill_first_takes_no_chunk_cap():
    with pytest.raises(ValueError, match="long_prefill_token_threshold caps chunks: it needs"):
        SchedulerConfig(chunked_prefill=False, long_prefill_token_threshold=64)


# -- a deployment turned emulated (cluster/emulate.py) -----------------------------------------


def test_emulate_moves_each_pools_tp_and_pp_into_its_emulation():
    """2 prefill TP2 + 1 decode TP2 x PP2: 8 emulated devices, one process per instance,
    the decode pool with the planner's KV link bandwidth, the prefill pool batching whole
    prompts (chunked_prefill false, as the planner models DistServe's prefill instances)."""
    config = DeploymentConfig(
        prefill=PoolSpec(num_instances=2, engine={"tensor_parallel_size": 2}),
        decode=PoolSpec(engine={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    )
    emulate(config, EmulationSettings(HARDWARE, MODEL, time_scale=2))
    prefill, decode = config.engine_config("prefill"), config.engine_config("decode")
    assert prefill.world_size == decode.world_size == 1
    assert (prefill.emulation.tp, prefill.emulation.pp) == (2, 1)
    assert (decode.emulation.tp, decode.emulation.pp) == (2, 2)
    assert prefill.emulation.time_scale == decode.emulation.time_scale == 2
    assert prefill.emulation.kv_bandwidth is None and decode.emulation.kv_bandwidth > 0
    assert not prefill.scheduler.chunked_prefill and decode.scheduler.chunked_prefill
    assert config.served_model_name == MODEL and config.model is None
    assert num_devices(config) == 8
    assert describe(config) == (
        "emulated OPT-13B on 8x A100-80GB (2 prefill TP2, 1 decode TP2xPP2), time scale 2"
    )


def test_emulate_refuses_a_shape_the_model_cannot_take():
    config = DeploymentConfig(prefill=PoolSpec(engine={"tensor_parallel_size": 3}))
    with pytest.raises(ValueError, match="TP=3 does not divide the model's 40 attention heads"):
        emulate(config, EmulationSettings(HARDWARE, MODEL))
    with pytest.raises(ValueError, match="--time-scale must be >= 1"):
        EmulationSettings(HARDWARE, MODEL, time_scale=0)
