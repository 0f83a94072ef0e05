"""Layer-wise KV pulls across real processes: a Ray deployment (2 prefill + 1 decode actors)
with transfer.layerwise. Concurrent requests equal the `transformers` reference; a prefill
actor killed while long prompts are in flight leaves every request served (retried on the
other prefill, or recomputed) and every block free — the layer READs posted against the dead
instance are released before their blocks are."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.router.types import GenerateInput  # noqa: E402
from tests.helpers import assert_all_blocks_free, hf_greedy, ray_router, wait_until  # noqa: E402

MAX_TOKENS = 10
rng = random.Random(7)
PROMPTS = [[rng.randrange(3, 500) for _ in range(rng.randrange(200, 600))] for _ in range(12)]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    from cluster.launch import DeploymentConfig, PoolSpec
    from cluster.workers.base import TransferSettings

    config = DeploymentConfig(
        model=str(tiny_model_dir),
        prefill=PoolSpec(num_instances=2),
        engine={"num_blocks": 512},
        router={"instance_wait_s": 60.0},
        transfer=TransferSettings(layerwise=True),
    )
    with ray_router(config) as (loop, router):
        yield loop, router


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return hf_greedy(str(tiny_model_dir), PROMPTS, MAX_TOKENS)


def _generate(loop, router, prompt):
    async def run():
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        ids, timing = [], None
        async for chunk in router.generate(GenerateInput(prompt=prompt, params=params)):
            ids += chunk.token_ids
            timing = chunk.timing or timing
        return ids, timing

    return loop.run(run(), timeout_s=120)


def test_concurrent_layerwise_equals_reference(served, reference):
    loop, router = served
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda p: _generate(loop, router, p), PROMPTS))
    assert [ids for ids, _ in got] == reference
    assert all(t.num_recomputes == 0 for _, t in got)  # served by the layer-wise handoff
    assert_all_blocks_free(loop, router.instances, timeout_s=30)


def test_prefill_killed_mid_flight_still_serves_and_frees(served, reference):
    loop, router = served
    victim = next(i for i in router.instances if i.role == "prefill")

    def kill_mid_flight():  # once the router has sent it a prompt it has not answered yet
        wait_until(lambda: victim.pending_prompt_tokens > 0, timeout_s=60, interval_s=0.01)
        ray.kill(victim.client.actor, no_restart=True)

    killer = threading.Thread(target=kill_mid_flight)
    killer.start()
    with ThreadPoolExecutor(6) as pool:  # (_generate bounds each request: none hangs)
        got = list(pool.map(lambda p: _generate(loop, router, p), PROMPTS))
    killer.join()
    assert [ids for ids, _ in got] == reference
    # The router notices the death (a failed call or a poll); the survivors hold nothing.
    wait_until(
        lambda: sum(i.healthy for i in router.instances if i.role == "prefill") == 1,
        timeout_s=15,
        interval_s=0.2,
    )
    assert_all_blocks_free(loop, router.instances, timeout_s=30)
