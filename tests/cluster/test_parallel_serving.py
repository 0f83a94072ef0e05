"""Served tensor/pipeline-parallel instances on one real Ray cluster: rank 0 in the worker
actor, the other ranks follower actors in the instance's placement group, KV moved rank to
rank over real NIXL and re-sharded when prefill and decode layouts differ. Greedy output must
equal `transformers` (and so the colocated TP=1 engine); a rank that dies must end its
instance's requests by the failure policy, not hang them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from tests.helpers import (
    LoopThread,
    assert_all_blocks_free,
    hf_greedy,
    ray_router,
    router_token_ids,
    wait_healthy,
    wait_until,
)

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

pytestmark = pytest.mark.timeout(600)

PROMPTS = [[5, 6, 7], list(range(3, 40)), [11 + (i * 7) % 400 for i in range(90)]]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The module's loop thread; every test serves its own deployment on the one Ray."""
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    return hf_greedy(str(tiny_model_dir), PROMPTS, MAX_TOKENS)


@contextlib.contextmanager
def _serving(loop, model_dir, mode="disaggregated", prefill=None, decode=None, colocated=None,
             router=None):  # fmt: skip
    """The deployment's router, shut down after."""
    from cluster.launch import DeploymentConfig, PoolSpec

    config = DeploymentConfig(
        model=str(model_dir),
        mode=mode,
        prefill=PoolSpec(engine=prefill or {}),
        decode=PoolSpec(engine=decode or {}),
        colocated=PoolSpec(engine=colocated or {}),
        engine={"num_blocks": 64},
        router=router or {},
    )
    with ray_router(config, loop) as (_, served):
        yield served


async def _generate(router, prompt, params=None, streaming: asyncio.Event | None = None):
    """The request's token ids; `streaming` is set at its first chunk."""
    from cluster.engine.sampling_params import SamplingParams

    params = params or SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return await router_token_ids(router, prompt, params, streaming)


async def _start_streams(router, params) -> list[asyncio.Future]:
    """One long request per prompt, returned once every one of them streams."""
    events = [asyncio.Event() for _ in PROMPTS]
    tasks = [
        asyncio.ensure_future(_generate(router, p, params, e))
        for p, e in zip(PROMPTS, events, strict=True)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=60)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return tasks


def _serve_all(loop, router) -> list[list[int]]:
    async def run():
        return await asyncio.gather(*(_generate(router, p) for p in PROMPTS))

    return loop.run(run(), timeout_s=180)


def _serve_once_restarted(loop, router) -> list[list[int]]:
    """Every prompt's output once Ray has restarted a lost instance (RequestFailed, or
    Unavailable once instance_wait_s passes with the instance still restarting, until)."""
    from cluster.router.types import RequestFailed, Unavailable

    def served():
        try:
            return _serve_all(loop, router)
        except (RequestFailed, Unavailable):
            return None

    return wait_until(served, timeout_s=120, interval_s=2, message="never served again")


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [
        ({"tensor_parallel_size": 2}, {}),
        ({}, {"tensor_parallel_size": 2}),
        ({"pipeline_parallel_size": 2}, {"tensor_parallel_size": 2}),
    ],
    ids=["prefill-tp2-decode-tp1", "prefill-tp1-decode-tp2", "prefill-pp2-decode-tp2"],
)
def test_disaggregated_pools_of_different_layouts(cluster, tiny_model_dir, expected, prefill,
                                                   decode):  # fmt: skip
    """Each decode rank reads exactly its heads and layers from the prefill ranks holding
    them; the output equals the reference, the prompt is not recomputed, and every block on
    every instance is free afterwards (the prefill freed on the decode's one message)."""
    with _serving(cluster, tiny_model_dir, prefill=prefill, decode=decode) as router:
        assert _serve_all(cluster, router) == expected
        # the prefill frees on the notification: shortly
        assert_all_blocks_free(cluster, router.instances, timeout_s=10)


def test_colocated_tp2_instance_serves_reference_output(cluster, tiny_model_dir, expected):
    """Rank 1 a follower actor, kept in lockstep by the leader's broadcasts; a sampled
    request too (had the ranks drawn different tokens, the all-reduces would mix two
    sequences and the output would leave the TP=1 one)."""
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    with _serving(
        cluster, tiny_model_dir, mode="colocated", colocated={"tensor_parallel_size": 2}
    ) as router:
        assert _serve_all(cluster, router) == expected
        sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=123)
        single = LLMEngine.from_model(str(tiny_model_dir)).generate([PROMPTS[1]], sampled)
        got = cluster.run(_generate(router, PROMPTS[1], sampled), timeout_s=60)
        assert got == single[0].token_ids
        assert_all_blocks_free(cluster, router.instances)


@pytest.mark.slow  # ~10 s: the instance is restarted
def test_a_dead_rank_ends_requests_by_the_failure_policy(cluster, tiny_model_dir, expected):
    """Kill rank 1 of a TP=2 decode instance while requests stream: under policy `fail`
    every request ends with RequestFailed (no hang); Ray restarts the instance with new
    ranks and it serves correct output again."""
    from cluster.engine.sampling_params import SamplingParams
    from cluster.router.types import RequestFailed
    from cluster.workers.ranks import actor_name

    with _serving(
        cluster,
        tiny_model_dir,
        decode={"tensor_parallel_size": 2},
        router={"failure_policy": "fail"},
    ) as router:
        (decode,) = [i for i in router.instances if i.role == "decode"]
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

        async def doomed():
            tasks = await _start_streams(router, long)
            follower = ray.get_actor(actor_name(decode.instance_id, 1), namespace="pd-cluster")
            ray.kill(follower)
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = cluster.run(doomed(), timeout_s=120)  # (bounded: no request hangs)
        assert all(isinstance(r, RequestFailed) for r in results), results

        assert _serve_once_restarted(cluster, router) == expected


@pytest.mark.slow  # ~40 s: waits out dist_timeout_s, then the restart
def test_a_hung_rank_ends_requests_after_the_dist_timeout(cluster, tiny_model_dir, expected):
    """Stop (SIGSTOP) rank 1 of a colocated TP=2 instance while requests stream: the rank
    neither dies nor answers, so the leader's next all-reduce waits for it (on NCCL a dead
    rank looks the same: its peers wait). The router marks the instance lost once its load
    poll goes unanswered (5 s), and every request ends with RequestFailed under policy `fail`
    then, not after the collective's timeout; after `dist_timeout_s` the collective fails,
    the instance exits, Ray restarts it and it serves correct output again."""
    from cluster.engine.sampling_params import SamplingParams
    from cluster.router.types import RequestFailed
    from cluster.workers.ranks import actor_name

    timeout_s = 30
    with _serving(
        cluster,
        tiny_model_dir,
        mode="colocated",
        colocated={"tensor_parallel_size": 2, "dist_timeout_s": timeout_s},
        router={"failure_policy": "fail"},
    ) as router:
        (instance,) = router.instances
        follower = ray.get_actor(actor_name(instance.instance_id, 1), namespace="pd-cluster")
        pid = ray.get(follower.__ray_call__.remote(lambda self: os.getpid()))
        try:
            long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

            async def doomed():
                tasks = await _start_streams(router, long)
                os.kill(pid, signal.SIGSTOP)
                return await asyncio.gather(*tasks, return_exceptions=True)

            results = cluster.run(doomed(), timeout_s=timeout_s + 90)  # (no request hangs)
            assert all(isinstance(r, RequestFailed) for r in results), results

            assert _serve_once_restarted(cluster, router) == expected
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # Ray has killed it with its dead owner, normally


@pytest.mark.slow  # ~13 s: the instance is restarted
def test_a_prefill_rank_dead_while_idle_is_replaced_and_requests_retry(cluster, tiny_model_dir,
                                                                      expected):  # fmt: skip
    """Kill rank 1 of an idle TP=2 prefill instance: its leader finds out at its next
    collective (a heartbeat, or the next request's step), exits, and Ray restarts it with new
    ranks; under policy `retry` requests sent meanwhile still get the reference output (with
    no healthy prefill instance the router recomputes them on decode), and the restarted
    instance is whole (every rank's blocks free) and serves again."""
    from cluster.workers.ranks import actor_name

    with _serving(
        cluster,
        tiny_model_dir,
        prefill={"tensor_parallel_size": 2},
        router={"failure_policy": "retry", "instance_wait_s": 120},
    ) as router:
        (prefill,) = [i for i in router.instances if i.role == "prefill"]
        assert _serve_all(cluster, router) == expected
        ray.kill(ray.get_actor(actor_name(prefill.instance_id, 1), namespace="pd-cluster"))
        assert _serve_all(cluster, router) == expected  # (recomputed on decode meanwhile)
        # The prefill instance comes back with new ranks: whole, every rank's blocks free
        # (until it is up, asking it fails).
        wait_healthy(router.instances, timeout_s=120)
        assert_all_blocks_free(cluster, router.instances, timeout_s=120, retry_on=(Exception,))
        assert _serve_all(cluster, router) == expected
