"""Elastic pools on Ray: instances started, flipped and stopped as actors while requests
run; a flipped actor that crashes comes back (Ray restarts it in its first role) and is
flipped back by the router's reconnect."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray

from cluster.elastic.pools import ElasticPools
from cluster.elastic.settings import AutoscaleSettings
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import DeploymentConfig
from cluster.router.types import GenerateInput
from cluster.workers.ranks import RAY_NAMESPACE
from tests.helpers import (
    assert_all_blocks_free,
    random_prompts,
    ray_router,
    wait_healthy,
    wait_until,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts([30, 120, 64, 200, 18, 90], seed=3)


async def _generate(router, prompt):
    ids = []
    async for chunk in router.generate(GenerateInput(prompt=prompt, params=GREEDY)):
        ids += chunk.token_ids
    return ids


async def _all(router):
    return await asyncio.gather(*(_generate(router, p) for p in PROMPTS))


@pytest.fixture(scope="module")
def elastic(ray_cluster, tiny_model_dir):
    config = DeploymentConfig(model=str(tiny_model_dir), mode="disaggregated",
                              autoscale=AutoscaleSettings())  # fmt: skip
    with ray_router(config) as (loop, router):
        pools = ElasticPools(router, router.launcher, {"prefill": 1, "decode": 1})
        yield loop, router, pools, loop.run(_all(router), 120)


def test_add_flip_and_remove_actors_while_serving(elastic):
    loop, router, pools, reference = elastic

    async def grow_and_flip():
        added = await pools.add("prefill")
        runs = asyncio.ensure_future(_all(router))
        flipped = await pools.flip("decode", added)  # the new prefill becomes a decode
        return added, flipped, await runs

    added, flipped, outputs = loop.run(grow_and_flip(), 300)
    assert outputs == reference
    assert flipped.role == "decode" and flipped.client is added.client
    assert flipped.info.role == "decode" and flipped.info.instance_id == flipped.instance_id
    assert sorted(i.role for i in router.instances) == ["decode", "decode", "prefill"]
    text = loop.run(router.metrics_text()).decode()
    assert 'pdcluster:pool_instances{role="decode"} 2.0' in text
    assert_all_blocks_free(loop, router.instances)

    # Killed, Ray restarts it as it was first made (a prefill instance); the router's
    # reconnect flips it back, under the same new identity.
    pid = loop.run(flipped.client.call("pid", timeout=30))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: flipped.healthy and flipped.info.pid != pid, 180, interval_s=0.2,
               message="the restarted instance was not reconnected")  # fmt: skip
    wait_healthy(router.instances, 180)
    info = flipped.info
    assert (info.role, info.instance_id) == ("decode", flipped.instance_id)
    assert loop.run(_all(router), 120) == reference

    name = f"pd-cluster-{added.instance_id}"  # its actor keeps its first name
    assert ray.get_actor(name, namespace=RAY_NAMESPACE)
    removed = loop.run(pools.remove("decode", flipped), 120)
    assert removed == flipped.instance_id
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace=RAY_NAMESPACE)
    assert sorted(i.role for i in router.instances) == ["decode", "prefill"]
    assert loop.run(_all(router), 120) == reference
    assert_all_blocks_free(loop, router.instances)


def test_detached_elastic_pools_are_found_again_in_the_roles_they_serve(ray_cluster,
                                                                       tiny_model_dir):  # fmt: skip
    """Under Ray Serve the pools outlive the ingress replica (deploy/serve_app.py): a new
    replica's start_ray must find every instance an earlier one's autoscaler started or
    flipped, in its current role, and stop_detached must end them all."""
    from cluster.launch import pool_tags, start_ray, stop_detached
    from cluster.loop_thread import LoopThread

    tag = "elastic-test"
    config = DeploymentConfig(model=str(tiny_model_dir), mode="disaggregated",
                              autoscale=AutoscaleSettings())  # fmt: skip
    loop = LoopThread()
    try:
        router = loop.run(start_ray(config, detached_as=tag), 300)
        pools = ElasticPools(router, router.launcher, {"prefill": 1, "decode": 1})
        loop.run(pools.add("prefill"), 300)
        loop.run(pools.add("prefill"), 300)
        flipped = loop.run(pools.flip("decode"), 300)  # 2 prefill + 2 decode now
        reference = loop.run(_all(router), 120)
        before = {i.instance_id: i.role for i in router.instances}
        loop.run(router.shutdown())  # the replica goes; its detached pools stay

        again = loop.run(start_ray(config, detached_as=tag), 300)
        try:
            assert {i.instance_id: i.role for i in again.instances} == before
            assert loop.run(_all(again), 120) == reference
            new = again.launcher.new_id("decode")  # numbering goes on after every id in use
            assert new not in before and new != flipped.instance_id
        finally:
            loop.run(again.shutdown())
        assert tag in pool_tags()
        assert len(stop_detached(tag)) == 4
        assert tag not in pool_tags()
    finally:
        loop.close()
