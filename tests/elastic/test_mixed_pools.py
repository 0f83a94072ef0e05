"""Mixed hardware pools in one process: an emulated deployment (Llama-3-8B) whose pools hold
instances of two emulated device types at once (A100-80GB and L40S: each instance steps at
its own type's latency model and holds its own type's KV capacity), real engines and NIXL
between them. Requests served across the types, a migration from one type to the other by
the autoscaler with requests in flight, and a flip within a type lose nothing, change no
output and leave no block behind; devices and cost are counted per type."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.elastic.autoscaler import Autoscaler, start_autoscaler
from cluster.elastic.controller import Controller, TypedSizes
from cluster.elastic.hardware import pool_hardware
from cluster.elastic.pools import ElasticPools
from cluster.elastic.settings import AutoscaleSettings
from cluster.emulate import EmulationSettings, emulate
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import DeploymentConfig, start_local
from cluster.loop_thread import LoopThread
from cluster.placement.hardware import load_catalog
from cluster.router.types import GenerateInput
from tests.helpers import assert_all_blocks_free, random_prompts

OLD, NEW = "A100-80GB", "L40S"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts([40, 90, 200, 17, 130, 260, 33, 75, 55, 140, 20, 310], seed=11)


@pytest.fixture(scope="module")
def cluster():
    """1 prefill + 1 decode emulated instance on A100-80GB (the first type listed), either
    role allowed on A100-80GB or L40S, flips allowed."""
    hardware = {"prefill": [OLD, NEW], "decode": [OLD, NEW]}
    config = DeploymentConfig(mode="disaggregated",
                              autoscale=AutoscaleSettings(hardware=hardware))  # fmt: skip
    emulate(config, EmulationSettings(OLD, "llama-3-8b"))
    kinds = pool_hardware(config)
    loop = LoopThread()
    router = loop.run(start_local(config))
    pools = ElasticPools(router, router.launcher, {"prefill": 1, "decode": 1}, 60.0,
                         hardware={r: kinds.default(r) for r in ("prefill", "decode")},
                         prices=kinds.prices)  # fmt: skip
    reference = loop.run(_all(router), 120)
    try:
        yield loop, router, pools, reference
    finally:
        loop.run(router.shutdown())
        loop.close()


async def _generate(router, prompt, first: asyncio.Event | None = None) -> list[int]:
    ids = []
    async for chunk in router.generate(GenerateInput(prompt=prompt, params=GREEDY)):
        if first is not None and chunk.token_ids:
            first.set()
        ids += chunk.token_ids
    return ids


async def _all(router, first: asyncio.Event | None = None) -> list[list[int]]:
    return await asyncio.gather(*(_generate(router, p, first) for p in PROMPTS))


async def _gather(*runs):
    return await asyncio.gather(*runs)


def _tokens(loop, instance) -> float:
    """Prompt plus generated tokens this instance computed (its own /metrics)."""
    families = loop.run(instance.client.call("metrics"))
    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    return sum(s.value for f in families for s in f.samples if s.name in names)


def _types(pools, router) -> dict[str, list[str]]:
    return {role: sorted(pools.hardware_of(i) for i in router.pool(role))
            for role in ("prefill", "decode")}  # fmt: skip


def test_a_pool_of_two_types_serves_and_migrates_without_losing_anything(cluster):
    loop, router, pools, reference = cluster
    assert _types(pools, router) == {"prefill": [OLD], "decode": [OLD]}
    added = loop.run(_gather(pools.add("prefill", NEW), pools.add("decode", NEW)), 120)
    assert _types(pools, router) == {"prefill": [OLD, NEW], "decode": [OLD, NEW]}
    assert pools.counts_by_type() == {"prefill": {OLD: 1, NEW: 1}, "decode": {OLD: 1, NEW: 1}}
    # Each instance is its own type's emulation: an L40S holds less KV than an A100-80GB.
    old_blocks = {i.info.num_blocks for i in router.instances if pools.hardware_of(i) == OLD}
    assert all(a.info.num_blocks < min(old_blocks) for a in added)

    before = {i.instance_id: _tokens(loop, i) for i in router.instances}
    assert loop.run(_all(router), 120) == reference
    for i in router.instances:  # every instance of both types served some of them
        assert _tokens(loop, i) > before[i.instance_id], i.instance_id

    catalog = load_catalog()
    assert pools.devices_by_type() == {OLD: 2, NEW: 2}
    assert pools.cost_per_hour == pytest.approx(
        2 * catalog[OLD].price_per_hour + 2 * catalog[NEW].price_per_hour
    )

    # The autoscaler chooses L40S for both roles (A100-80GB cannot meet the targets, says
    # its model here): the L40S instances serve already, so the A100s drain and go, with
    # requests in flight.
    def sizer(rate, input_lens, output_lens, hardware=None):
        pair = hardware or {"prefill": NEW, "decode": NEW}
        return TypedSizes(1, 1, pair, meets_target=pair["prefill"] == NEW)

    settings = AutoscaleSettings(ttft_s=100.0, tpot_s=100.0, min_samples=4)
    controller = Controller(settings, pools.gpus, sizer,
                            hardware={"prefill": (OLD, NEW), "decode": (OLD, NEW)})  # fmt: skip
    autoscaler = Autoscaler(router, pools, controller)

    async def migrate():
        first = asyncio.Event()
        runs = asyncio.ensure_future(_all(router, first))
        await first.wait()
        decision = await autoscaler.step()
        await asyncio.gather(*autoscaler._tasks)
        return decision, await runs

    try:
        decision, outputs = loop.run(migrate(), 180)
        text = loop.run(router.metrics_text()).decode()
    finally:
        loop.run(autoscaler.stop())
    assert decision.hardware == {"prefill": NEW, "decode": NEW}
    assert sorted((a.kind, a.role, a.cause, a.hardware) for a in decision.actions) == [
        ("remove", "decode", "migrate", OLD), ("remove", "prefill", "migrate", OLD)
    ]  # fmt: skip
    assert outputs == reference
    assert _types(pools, router) == {"prefill": [NEW], "decode": [NEW]}
    assert pools.devices_by_type() == {NEW: 2}
    assert_all_blocks_free(loop, router.instances)
    metrics = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert metrics["pdcluster:pool_cost_per_hour"].value == pytest.approx(
        2 * catalog[NEW].price_per_hour
    )
    assert metrics["pdcluster:pool_cost_seconds_total"].value > 0
    by_type = {s.labels["hardware"]: s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "pdcluster:pool_gpus_by_hardware"}  # fmt: skip
    assert by_type == {NEW: 2.0}
    # Device-seconds per type: the A100s' stopped growing when they left.
    held, old_s = pools.device_seconds_by_type(), pools.device_seconds_by_type()[OLD]
    assert held[OLD] > 0 and held[NEW] > 0 and old_s == held[OLD]
    assert pools.cost_seconds == pytest.approx(  # (the clock moves on between the two)
        held[OLD] * catalog[OLD].price_per_hour + held[NEW] * catalog[NEW].price_per_hour,
        rel=1e-2,
    )


def test_a_flip_keeps_the_instances_type(cluster):
    loop, router, pools, reference = cluster
    loop.run(pools.add("decode", NEW), 120)
    flipped = loop.run(pools.flip("prefill", hardware=NEW), 120)
    assert flipped.role == "prefill" and pools.hardware_of(flipped) == NEW
    assert pools.counts_by_type() == {"prefill": {NEW: 2}, "decode": {NEW: 1}}
    assert pools.devices_by_type() == {NEW: 3}
    assert loop.run(_all(router), 120) == reference
    assert_all_blocks_free(loop, router.instances)


def test_the_served_autoscaler_chooses_among_the_listed_types(cluster):
    """What `cluster serve` starts for this config: a controller over the listed types, pools
    that start new instances on the first, priced from the catalog."""
    loop, router, _, _ = cluster

    async def started():
        return start_autoscaler(router, router.launcher.config)

    autoscaler = loop.run(started())
    try:
        assert autoscaler.controller.hardware == {"prefill": (OLD, NEW), "decode": (OLD, NEW)}
        assert autoscaler.pools.hardware == {"prefill": OLD, "decode": OLD}
        assert set(autoscaler.pools.prices) == {OLD, NEW}
        best = autoscaler.controller.sizer(2.0, [300] * 20, [100] * 20)
        assert set(best.hardware.values()) <= {OLD, NEW} and best.meets_target
    finally:
        loop.run(autoscaler.stop())
