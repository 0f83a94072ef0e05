"""The engine API on the tiny default model: every request path leaves the block manager
clean, bad input is a ValueError that leaves the engine serving, roles round-trip, sampling
and stopping options behave, and the asyncio wrapper streams and cancels."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from cluster.engine.async_engine import AsyncLLMEngine
from cluster.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["The quick brown fox jumps", "Hello, world!", "café 日本語 naïve " * 3]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir)))


def assert_clean(engine: LLMEngine) -> None:
    engine.check_integrity()
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def step_until(engine: LLMEngine, predicate, max_steps: int = 200):
    outputs = []
    for _ in range(max_steps):
        outputs += engine.step()
        if predicate(outputs):
            return outputs
    raise AssertionError("condition not reached")


# -- request paths ----------------------------------------------------------------------


def test_finish_by_length(engine):
    out = engine.generate(PROMPTS, GREEDY)
    assert [len(o.token_ids) for o in out] == [12] * 3
    assert {o.finish_reason for o in out} == {"length"}
    assert_clean(engine)


def test_stop_string_truncates_text(engine):
    free_run = engine.generate(PROMPTS[0], GREEDY)[0]
    stop = free_run.text[3:6]
    assert len(stop) == 3
    out = engine.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free_run.text[: free_run.text.index(stop)]
    incl = SamplingParams(
        max_tokens=12, temperature=0, stop=[stop], include_stop_str_in_output=True
    )
    assert engine.generate(PROMPTS[0], incl)[0].text.endswith(stop)
    assert_clean(engine)


def test_streamed_deltas_never_show_a_cut_stop_string(engine):
    free_run = engine.generate(PROMPTS[0], GREEDY)[0]
    stop = free_run.text[5:8]
    assert len(stop) == 3
    engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    outs = step_until(engine, lambda o: o and o[-1].finished)
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert stop not in outs[-1].text
    assert_clean(engine)


def test_stop_token_ids(engine):
    free_run = engine.generate(PROMPTS[0], GREEDY)[0]
    stop_id = free_run.token_ids[4]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id])
    out = engine.generate(PROMPTS[0], params)[0]
    first = free_run.token_ids.index(stop_id)
    assert out.token_ids == free_run.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert_clean(engine)


def test_abort_mid_prefill_and_mid_decode(tiny_model_dir):
    small_budget = SchedulerConfig(max_num_batched_tokens=8)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), scheduler=small_budget))
    engine.add_request("long", list(range(3, 60)), GREEDY)
    engine.add_request("short", [5, 6, 7], GREEDY)
    engine.step()  # 8 of 57 prompt tokens done: "long" is mid-prefill
    assert 0 < engine.scheduler.running[0].num_computed_tokens < 57
    assert engine.abort("long")
    outs = step_until(engine, lambda o: any(x.request_id == "short" for x in o))
    assert outs[-1].request_id == "short" and not outs[-1].finished  # mid-decode now
    assert engine.abort("short")
    assert not engine.abort("short")  # second abort is a no-op
    assert_clean(engine)


def test_abort_waiting_request(engine):
    engine.add_request("w", PROMPTS[0], GREEDY)
    assert engine.abort("w")
    assert_clean(engine)


def test_preemption_path_is_clean(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(num_blocks=6)))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs = engine.generate([list(range(3, 35)), list(range(40, 70)), list(range(80, 100))], params)
    assert engine.scheduler.num_preemptions > 0
    assert any(o.metrics.num_preemptions for o in outs)
    assert all(len(o.token_ids) == 30 for o in outs)
    assert_clean(engine)


def test_timestamps_are_ordered(engine):
    m = engine.generate(PROMPTS[0], GREEDY)[0].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.ttft_s >= 0 and m.queue_time_s >= 0


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ("", None, "prompt is empty"),
        ([], None, "prompt is empty"),
        ([1] * 2048, None, "max_model_len"),
        ([99999], None, "token ids must be integers"),
    ],
)
def test_bad_prompts_raise_and_engine_keeps_serving(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(None, prompt, params)
    assert engine.generate(PROMPTS[0], GREEDY)[0].finish_reason == "length"
    assert_clean(engine)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_duplicate_request_id(engine):
    engine.add_request("dup", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", PROMPTS[1], GREEDY)
    engine.abort("dup")
    assert_clean(engine)


def test_prompt_larger_than_kv_pool(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(num_blocks=2)))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(None, list(range(3, 60)), GREEDY)


def test_unknown_architecture(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*Llama"):
        LLMEngine(EngineConfig(model=str(tmp_path / "m")))


def test_unsupported_rope_scaling(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        ModelConfig.from_dict(cfg)


def test_missing_weights_file(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLMEngine(EngineConfig(model=str(tmp_path / "m")))


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


# -- sampling ---------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_across_batches(engine):
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate(PROMPTS[0], seeded)[0].token_ids
    noise = SamplingParams(max_tokens=16, temperature=1.0)
    batched = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [noise, seeded, noise])
    assert batched[1].token_ids == alone
    other = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=4321)
    assert engine.generate(PROMPTS[0], other)[0].token_ids != alone
    assert_clean(engine)


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(PROMPTS[0], GREEDY)[0].token_ids
    top1 = SamplingParams(max_tokens=12, temperature=0.8, top_k=1, ignore_eos=True)
    assert engine.generate(PROMPTS[0], top1)[0].token_ids == greedy


def test_logprobs_match_a_full_forward(engine):
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    out = engine.generate(PROMPTS[0], params)[0]
    assert len(out.logprobs) == 6 and all(len(t) == 3 for t in out.top_logprobs)
    for lp, top in zip(out.logprobs, out.top_logprobs, strict=True):
        assert lp == pytest.approx(top[0][1], abs=1e-5)  # greedy picks the top token
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(engine.model_config.path)
    ids = torch.tensor([out.prompt_token_ids + out.token_ids])
    with torch.inference_mode():
        ref = torch.log_softmax(hf(ids).logits[0].float(), -1)
    n = len(out.prompt_token_ids)
    expected = [ref[n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_cache_salt_isolates_prefixes(engine):
    prompt = list(range(3, 60))
    engine.generate(prompt, GREEDY)
    engine.add_request("a", prompt, GREEDY, cache_salt="tenant-a")
    engine.add_request("b", prompt, GREEDY)
    outs = step_until(engine, lambda o: sum(x.finished for x in o) == 2)
    cached = {o.request_id: o.num_cached_tokens for o in outs if o.finished}
    assert cached["a"] == 0 and cached["b"] >= 48
    assert_clean(engine)


def test_priority_policy_runs_urgent_first(tiny_model_dir):
    config = EngineConfig(
        model=str(tiny_model_dir), scheduler=SchedulerConfig(policy="priority", max_num_seqs=1)
    )
    engine = LLMEngine(config)
    engine.add_request("late", PROMPTS[0], GREEDY, priority=5)
    engine.add_request("urgent", PROMPTS[1], GREEDY, priority=0)
    first = step_until(engine, lambda o: bool(o))[0]
    assert first.request_id == "urgent"
    engine.abort("late")
    engine.abort("urgent")
    assert_clean(engine)


# -- roles ------------------------------------------------------------------------------


def test_prefill_decode_round_trip_equals_colocated(tiny_model_dir):
    """Prefill role computes the prompt and token 1, decode role gets the KV blocks copied by
    hand (what NIXL does between processes) and continues: same tokens as colocated."""
    model = str(tiny_model_dir)
    colocated = LLMEngine(EngineConfig(model=model)).generate(PROMPTS, GREEDY)
    prefill = LLMEngine(EngineConfig(model=model, role="prefill"))
    decode = LLMEngine(EngineConfig(model=model, role="decode", cache=CacheConfig(block_size=16)))
    first = prefill.generate(PROMPTS, GREEDY)
    results = []
    for i, out in enumerate(first):
        assert out.finish_reason == "prefilled" and len(out.token_ids) == 1
        rid = f"d{i}"
        dst = decode.add_remote_request(rid, out.prompt_token_ids, GREEDY)
        assert dst is not None and len(dst) == len(out.kv_block_ids)
        decode.runner.kv_cache[dst] = prefill.runner.kv_cache[out.kv_block_ids]
        prefill.release(out.request_id)
        stream = [decode.commit_remote(rid, out.token_ids[0])]
        while not stream[-1].finished:
            stream += [o for o in decode.step() if o.request_id == rid]
        results.append(stream[-1])
        assert "".join(o.delta_text for o in stream) == stream[-1].text
    assert [r.token_ids for r in results] == [c.token_ids for c in colocated]
    assert [r.text for r in results] == [c.text for c in colocated]
    for e in (prefill, decode):
        assert_clean(e)


def test_prefill_role_pins_until_release(tiny_model_dir):
    prefill = LLMEngine(EngineConfig(model=str(tiny_model_dir), role="prefill"))
    out = prefill.generate(PROMPTS[0], GREEDY)[0]
    assert out.kv_block_ids and prefill.pinned_block_ids(out.request_id) == out.kv_block_ids
    assert prefill.num_free_blocks == prefill.block_manager.num_blocks - len(out.kv_block_ids)
    prefill.check_integrity()
    prefill.release(out.request_id)
    prefill.release(out.request_id)  # idempotent
    assert_clean(prefill)


def test_prefill_role_single_token_request_frees_at_once(tiny_model_dir):
    prefill = LLMEngine(EngineConfig(model=str(tiny_model_dir), role="prefill"))
    out = prefill.generate(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0))[0]
    assert out.finish_reason == "length" and not out.kv_block_ids
    assert_clean(prefill)


def test_decode_role_abort_while_waiting_for_kv(tiny_model_dir):
    decode = LLMEngine(EngineConfig(model=str(tiny_model_dir), role="decode"))
    assert decode.add_remote_request("r", PROMPTS[0], GREEDY)
    assert decode.abort("r")
    assert_clean(decode)


def test_decode_role_no_room_keeps_nothing(tiny_model_dir):
    decode = LLMEngine(
        EngineConfig(model=str(tiny_model_dir), role="decode", cache=CacheConfig(num_blocks=4))
    )
    assert decode.add_remote_request("a", list(range(3, 50)), GREEDY) is not None
    assert decode.add_remote_request("b", list(range(3, 50)), GREEDY) is None
    decode.abort("a")
    assert_clean(decode)


# -- asyncio ----------------------------------------------------------------------------


def test_async_streams_and_cancels(tiny_model_dir):
    sync = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    expected = [o.token_ids for o in sync.generate(PROMPTS, GREEDY)]
    engine = AsyncLLMEngine(sync)

    async def collect(prompt):
        outs = [o async for o in engine.generate(prompt, GREEDY)]
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
        return outs[-1].token_ids

    async def cancel_midway():
        async for out in engine.generate(PROMPTS[0], SamplingParams(max_tokens=500)):
            if len(out.token_ids) >= 3:
                break  # the generator's finally aborts the request

    async def main():
        got = await asyncio.gather(*(collect(p) for p in PROMPTS), cancel_midway())
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate("", GREEDY):
                pass
        return got[:3]

    try:
        assert asyncio.run(main()) == expected
        engine.call(assert_clean, sync)
    finally:
        engine.shutdown()


def test_what_is_observed_is_read_during_a_long_step_and_never_idler_than_the_engine(
    tiny_model_dir,
):
    """A worker's load report (AsyncLLMEngine.observe) answers while a step holds the engine
    lock (here a forward made 2 s long by a fault point): the router's poll must not take a
    long step for a hang. It shows the request that step runs, never an idle engine."""
    import threading
    import time

    sync = LLMEngine(EngineConfig(model=str(tiny_model_dir), fault_injection=True))
    engine = AsyncLLMEngine(sync)
    engine.observe(lambda: len(sync.scheduler.waiting) + len(sync.scheduler.running))
    assert engine.observed == 0
    sync.faults.arm("engine.forward", "sleep:2.0", match="long")
    stepping = threading.Event()

    async def main():
        async def run():
            async for _ in engine.generate(PROMPTS[0], GREEDY, request_id="long"):
                stepping.set()

        task = asyncio.ensure_future(run())
        while sync.faults.hits("engine.forward") == 0:  # the long step has begun
            await asyncio.sleep(0.01)
        started = time.monotonic()
        seen = engine.observed  # no lock: at once
        assert time.monotonic() - started < 0.5 and not engine.try_call(lambda: None)[0]
        assert seen == 1  # the request in that step
        await task
        for _ in range(500):  # its last step's update lands just after its last output
            if engine.observed == 0:
                return 0
            await asyncio.sleep(0.01)
        return engine.observed

    try:
        assert asyncio.run(main()) == 0  # it finished: observed after the last step
    finally:
        engine.shutdown()


def test_bucket_by_length_bounds_padding():
    from cluster.engine.model_runner import bucket_by_length

    lengths = [700, 5, 300, 64, 90, 1, 1000, 130, 260]
    groups = bucket_by_length(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        shortest, longest = min(lengths[i] for i in g), max(lengths[i] for i in g)
        assert longest <= max(2 * shortest, shortest + 64)
    assert len(groups) <= 5


# -- review findings: each was a real failure before its fix ----------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stop": [123]},
        {"logprobs": 1.5},
        {"top_k": 2.5},
        {"temperature": float("nan")},
        {"seed": 2**64},
        {"max_tokens": True},
    ],
)
def test_wrongly_typed_sampling_params_are_refused_up_front(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_cache_salt_and_priority(engine):
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request(None, PROMPTS[0], GREEDY, cache_salt=5)
    with pytest.raises(ValueError, match="priority"):
        engine.add_request(None, PROMPTS[0], GREEDY, priority="high")
    assert_clean(engine)


def test_auto_ids_never_collide_with_caller_ids(engine):
    engine.add_request("0", PROMPTS[0], GREEDY)
    assert engine.generate(PROMPTS[1], GREEDY)[0].finish_reason == "length"
    engine.abort("0")
    assert_clean(engine)


def test_commit_remote_checks_its_inputs(tiny_model_dir):
    decode = LLMEngine(EngineConfig(model=str(tiny_model_dir), role="decode"))
    with pytest.raises(ValueError, match="not waiting for its KV"):
        decode.commit_remote("nobody", 5)
    decode.add_remote_request("d", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        decode.commit_remote("d", 10**6)
    decode.abort("d")
    assert_clean(decode)


def test_seeded_sampling_survives_disaggregation(tiny_model_dir):
    model = str(tiny_model_dir)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    colocated = LLMEngine(EngineConfig(model=model)).generate(PROMPTS[0], seeded)[0]
    prefill = LLMEngine(EngineConfig(model=model, role="prefill"))
    decode = LLMEngine(EngineConfig(model=model, role="decode"))
    first = prefill.generate(PROMPTS[0], seeded)[0]
    dst = decode.add_remote_request("d", first.prompt_token_ids, seeded)
    decode.runner.kv_cache[dst] = prefill.runner.kv_cache[first.kv_block_ids]
    prefill.release(first.request_id)
    outs = [decode.commit_remote("d", first.token_ids[0])]
    while not outs[-1].finished:
        outs += decode.step()
    assert outs[-1].token_ids == colocated.token_ids
    for e in (prefill, decode):
        assert_clean(e)


def test_async_abort_from_outside_ends_the_stream_and_shutdown_ends_all(tiny_model_dir):
    from cluster.engine.async_engine import RequestAborted

    sync = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    engine = AsyncLLMEngine(sync)
    long = SamplingParams(max_tokens=2000, ignore_eos=True)  # outlives the test
    streaming = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def consume(request_id):
        outs = []
        async for out in engine.generate(PROMPTS[0], long, request_id=request_id):
            outs.append(out)
            streaming[request_id].set()
        return outs

    async def main():
        aborted = asyncio.create_task(consume("a"))
        stranded = asyncio.create_task(consume("b"))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming.values())), 30)
        assert engine.abort("a")
        with pytest.raises(RequestAborted):
            await aborted
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(stranded, timeout=10)
        with pytest.raises(RuntimeError, match="shut down"):
            async for _ in engine.generate(PROMPTS[1], GREEDY):
                pass

    asyncio.run(main())
    sync.abort("b")  # the loop is gone; free what it held by hand
    assert_clean(sync)
