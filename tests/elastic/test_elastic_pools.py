"""Elastic pools in one process (real engines, real NIXL between them, the router): drains,
flips and scale-down, with requests in flight. Nothing may fail, change its output, or
leave a block behind because of a scaling action."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.elastic.pools import ElasticPools
from cluster.elastic.settings import AutoscaleSettings
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import DeploymentConfig, start_local
from cluster.loop_thread import LoopThread
from cluster.router.types import GenerateInput
from cluster.workers.protocol import Load, LoadQuery
from tests.helpers import assert_all_blocks_free, random_prompts, wait_until

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts([40, 90, 200, 17, 130, 260, 33, 75], seed=7)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """2 prefill + 2 decode elastic instances (flips allowed), fault points armed on demand."""
    config = DeploymentConfig(model=str(tiny_model_dir), mode="disaggregated",
                              engine={"fault_injection": True},
                              autoscale=AutoscaleSettings())  # fmt: skip
    config.prefill.num_instances = config.decode.num_instances = 2
    loop = LoopThread()
    router = loop.run(start_local(config))
    pools = ElasticPools(router, router.launcher, {"prefill": 1, "decode": 1}, 60.0)
    reference = [loop.run(_generate(router, p)) for p in PROMPTS]
    try:
        yield loop, router, pools, reference
    finally:
        loop.run(router.shutdown())
        loop.close()


async def _generate(router, prompt, first: asyncio.Event | None = None, times=None):
    ids = []
    async for chunk in router.generate(GenerateInput(prompt=prompt, params=GREEDY)):
        if first is not None and chunk.token_ids and not first.is_set():
            first.set()
            if times is not None:
                times["first_token"] = time.monotonic()
        ids += chunk.token_ids
    return ids


def _roles(router) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in router.instances:
        out[i.role] = out.get(i.role, 0) + 1
    return out


def test_flips_while_requests_run_in_both_phases(cluster):
    loop, router, pools, reference = cluster
    before = {i.instance_id for i in router.instances}

    async def scenario():
        first = asyncio.Event()
        runs = [asyncio.ensure_future(_generate(router, p, first)) for p in PROMPTS]
        await first.wait()  # some decode, some still wait for or run their prefill
        flips = await asyncio.gather(pools.flip("decode"), pools.flip("prefill"))
        outputs = await asyncio.gather(*runs)
        return flips, outputs

    flips, outputs = loop.run(scenario(), 120)
    assert outputs == reference
    assert {f.role for f in flips} == {"prefill", "decode"}
    assert not {f.instance_id for f in flips} & before  # a new identity per role
    assert _roles(router) == {"prefill": 2, "decode": 2}

    # The flipped instances serve in their new roles, as the others do.
    async def all_prompts():
        return await asyncio.gather(*(_generate(router, p) for p in PROMPTS))

    again = loop.run(all_prompts(), 120)
    assert again == reference
    assert_all_blocks_free(loop, router.instances)


def test_a_prefill_instance_is_released_only_after_its_lease_is_pulled(cluster):
    loop, router, pools, reference = cluster
    for i in router.pool("decode"):  # the pull waits: the prefill's lease stays out
        loop.run(i.client.call("inject_fault", "decode.before_read", "sleep:1.5", "", 1))

    async def leased():
        for i in router.pool("prefill"):
            load = await i.client.request(LoadQuery(), Load, 5.0)
            if load.num_pinned:
                return i
        return None

    async def scenario():
        times: dict[str, float] = {}
        first = asyncio.Event()
        run = asyncio.ensure_future(_generate(router, PROMPTS[2], first, times))
        holder = None
        while holder is None and not run.done():
            holder = await leased()
            await asyncio.sleep(0.01)
        assert holder is not None, "the request never held a lease"
        removed = await pools.remove("prefill", holder)
        times["removed"] = time.monotonic()
        return holder.instance_id, removed, await run, times

    holder, removed, output, times = loop.run(scenario(), 120)
    assert removed == holder
    assert output == reference[2]
    assert times["first_token"] < times["removed"]  # pulled, then released
    assert holder not in {i.instance_id for i in router.instances}
    assert_all_blocks_free(loop, router.instances)
    added = loop.run(pools.add("prefill"), 120)  # back to two, for the next test
    assert added.role == "prefill" and _roles(router)["prefill"] == 2


def test_scale_down_while_streaming_loses_nothing(cluster):
    loop, router, pools, reference = cluster

    async def scenario():
        first = asyncio.Event()
        runs = [asyncio.ensure_future(_generate(router, p, first)) for p in PROMPTS]
        await first.wait()
        removed = await pools.remove("decode")
        return removed, await asyncio.gather(*runs)

    removed, outputs = loop.run(scenario(), 120)
    assert outputs == reference
    assert removed not in {i.instance_id for i in router.instances}
    assert_all_blocks_free(loop, router.instances)
    loop.run(pools.add("decode"), 120)


def test_the_last_instance_of_a_role_is_never_drained(cluster):
    loop, router, pools, _ = cluster
    loop.run(pools.remove("decode"), 60)  # down to one decode instance
    with pytest.raises(ValueError, match="last decode instance"):
        loop.run(pools.remove("decode"), 60)
    with pytest.raises(ValueError, match="last decode instance"):
        loop.run(pools.flip("prefill"), 60)
    assert [i.draining for i in router.pool("decode")] == [False]
    assert router.is_ready()
    loop.run(pools.add("decode"), 120)


def test_device_seconds_count_every_instance_held_and_lost_ones_do_not_serve(cluster):
    loop, router, pools, _ = cluster
    now = [0.0]
    counted = ElasticPools(router, router.launcher, {"prefill": 2, "decode": 1},
                           clock=lambda: now[0])  # fmt: skip
    held = 2 * len(router.pool("prefill")) + len(router.pool("decode"))
    assert counted.devices == held
    now[0] = 10.0
    assert counted.device_seconds == pytest.approx(10.0 * held)
    assert counted.counts() == _roles(router)
    lost = router.pool("decode")[0]
    lost.healthy = False  # (as the router marks one it lost; its next poll restores it)
    try:
        assert counted.counts()["decode"] == _roles(router)["decode"] - 1
    finally:
        lost.healthy = True
    wait_until(lambda: router.is_ready(), 10)


def test_the_autoscaler_acts_on_a_breach_within_its_bounds(cluster):
    """The whole loop once (step() by hand, no sleeps): real requests in the router's window,
    every one missing an SLO no engine can meet, one device left under max_gpus."""
    from cluster.elastic.autoscaler import Autoscaler
    from cluster.elastic.controller import Controller

    loop, router, pools, reference = cluster
    held = len(router.instances)
    settings = AutoscaleSettings(ttft_s=1e-6, tpot_s=1e-6, max_gpus=held + 1, min_samples=4)
    autoscaler = Autoscaler(router, pools, Controller(settings, pools.gpus))

    async def scenario():
        await asyncio.gather(*(_generate(router, p) for p in PROMPTS))
        decision = await autoscaler.step()
        await asyncio.gather(*autoscaler._tasks)
        return decision

    try:
        decision = loop.run(scenario(), 120)
        text = loop.run(router.metrics_text()).decode()
    finally:
        loop.run(autoscaler.stop())
    assert decision.attainment == (0.0, 0.0)
    assert len(decision.actions) == 1 and decision.actions[0].kind == "add"
    assert len(router.instances) == held + 1 == pools.devices
    action = decision.actions[0]
    assert (f'pdcluster:autoscale_actions_total{{action="add",cause="{action.cause}",'
            f'role="{action.role}"}} 1.0') in text  # fmt: skip
    assert f"pdcluster:pool_gpus {held + 1}.0" in text
    loop.run(pools.remove(action.role), 120)
