"""KV-aware routing end to end: a disaggregated deployment in this process (2 prefill + 2
decode real engines, NIXL between them, the data plane on loopback) under `policy: kv`.
Multi-turn conversations keep their greedy output while the router reuses cached prefixes,
pulls only the blocks a decode instance lacks and prefills short suffixes locally; the
router's prefix index matches every instance's cache, a restarted router rebuilds it from
snapshots, salted tenants never share an entry, a lost instance's entries are dropped, and
every block is free on both sides afterwards."""

from __future__ import annotations

import random

import pytest

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import DeploymentConfig, start_local
from cluster.loop_thread import LoopThread
from cluster.router.instances import Instance
from cluster.router.prefix_index import prompt_hashes
from cluster.router.router import Router
from cluster.router.settings import RouterSettings
from cluster.router.types import GenerateInput
from cluster.workers.clients import LocalClient
from tests.helpers import assert_all_blocks_free, wait_until

pytest.importorskip("nixl")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
NUM_BLOCKS = 96  # small pools: long runs evict, and the index must follow


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    loop = LoopThread()
    config = DeploymentConfig.from_dict({
        "model": str(tiny_model_dir), "mode": "disaggregated",
        "engine": {"num_blocks": NUM_BLOCKS},
        "prefill": {"num_instances": 2}, "decode": {"num_instances": 2},
    })  # fmt: skip
    router = loop.run(start_local(config, RouterSettings(policy="kv", load_poll_interval_s=0.1)))
    yield loop, router
    loop.run(router.shutdown())
    loop.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    engine = LLMEngine.from_model(str(tiny_model_dir))
    return lambda prompt: engine.generate([prompt], GREEDY)[0].token_ids


async def _run(router, prompt, salt=None):
    ids, last = [], None
    async for chunk in router.generate(GenerateInput(prompt=prompt, params=GREEDY,
                                                     cache_salt=salt)):  # fmt: skip
        ids += chunk.token_ids
        last = chunk
    return ids, last


def _conversation(loop, router, seed: int, turns: int, salt=None, settle: bool = False):
    """`settle`: before each follow-up, wait until the index has every instance's events
    (a user's think time; without it the next turn may race the last one's events, which
    costs speed only)."""
    rng = random.Random(seed)
    history = [rng.randrange(3, 500) for _ in range(64)]  # a system prompt
    out = []
    for _ in range(turns):
        history += [rng.randrange(3, 500) for _ in range(rng.randrange(8, 30))]
        ids, last = loop.run(_run(router, list(history), salt))
        out.append((list(history), ids, last))
        history += ids
        if settle and router.index is not None:
            wait_until(lambda: _index_matches_caches(router), 10.0, message="index != caches")
    return out


def _index_matches_caches(router) -> bool:
    for i in router.instances:
        held = router.index._held.get(i.instance_id, set())
        if held != set(i.client.worker.llm.block_manager.cached_hashes()):
            return False
    return True


def test_multi_turn_output_is_unchanged_and_follow_ups_reuse_the_cache(served, reference):
    loop, router = served
    follow_ups = []
    for seed in range(3):
        turns = _conversation(loop, router, seed, turns=4, settle=True)
        for n, (prompt, ids, last) in enumerate(turns):
            assert ids == reference(prompt), f"conversation {seed}, turn {n}"
            if n:  # served where the history is cached: computed or pulled only in part
                t, cached = last.timing, last.usage.cached_tokens
                follow_ups.append((cached > 0 or t.kv_hit_tokens > 0, t, last.usage))
    misses = [f for f in follow_ups if not f[0]]
    assert not misses, misses
    assert_all_blocks_free(loop, router.instances)


def test_short_follow_ups_prefill_on_the_decode_instance(served):
    loop, router = served
    turns = _conversation(loop, router, seed=10, turns=5)
    local = [last.timing.local_prefill for _, _, last in turns[1:]]
    assert any(local), "no follow-up turn was prefilled locally"
    for _, _, last in turns[1:]:
        if last.timing.local_prefill:
            assert last.timing.prefill_instance == last.timing.decode_instance
            assert last.timing.kv_bytes == 0  # nothing moved between instances
    text = loop.run(router.metrics_text()).decode()
    assert "pdcluster:local_prefills_total" in text
    assert "pdcluster:prefix_cache_hit_ratio" in text


def test_index_follows_every_cache_through_evictions(served):
    loop, router = served
    # many distinct prompts through 96-block pools: the early ones are evicted
    for seed in range(20, 32):
        _conversation(loop, router, seed, turns=2)
    wait_until(lambda: _index_matches_caches(router), 10.0, message="index != caches")
    assert len(router.index) > 0


def test_a_restarted_router_rebuilds_the_index_from_snapshots(served):
    loop, router = served
    _conversation(loop, router, seed=40, turns=2)
    wait_until(lambda: _index_matches_caches(router), 10.0)

    async def second_router():
        # A new router (as after a restart): its own connections to the same workers.
        instances = []
        for i in router.instances:
            client = LocalClient(i.client.worker)
            await client.connect()
            instances.append(Instance(i.instance_id, i.role, client))
        return Router(instances, RouterSettings(policy="kv"), router.tokenizer)

    fresh = loop.run(second_router())
    try:
        wait_until(lambda: fresh.index._held == router.index._held, 10.0,
                   message="the new router's index differs")  # fmt: skip
    finally:

        async def close():
            fresh._poller.cancel()
            for task in fresh._subscriptions.values():
                task.cancel()
            for i in fresh.instances:
                i.client.close()

        loop.run(close())


def test_salted_tenants_never_share_an_index_entry(served):
    loop, router = served
    rng = random.Random(50)
    prompt = [rng.randrange(3, 500) for _ in range(120)]
    bs = router.model_info.block_size
    a, b = prompt_hashes(prompt, "tenant-a", bs), prompt_hashes(prompt, "tenant-b", bs)
    assert not set(a) & set(b)
    loop.run(_run(router, prompt, "tenant-a"))
    wait_until(lambda: any(router.index.overlap(a, [i.instance_id]).get(i.instance_id)
                           for i in router.instances), 10.0)  # fmt: skip
    ids = [i.instance_id for i in router.instances]
    assert not any(router.index.overlap(b, ids).values())
    _, last = loop.run(_run(router, prompt, "tenant-b"))
    assert last.usage.cached_tokens == 0 and last.timing.kv_hit_tokens == 0


def test_a_lost_instance_is_dropped_from_the_index(served, reference):
    """Last: it takes an instance down for the rest of the module."""
    loop, router = served
    _conversation(loop, router, seed=60, turns=2)
    wait_until(lambda: _index_matches_caches(router), 10.0)
    prefill = [i for i in router.instances if i.role == "prefill"]
    victim = max(prefill, key=lambda i: router.index.num_blocks(i.instance_id))
    loop.run(victim.client.kill())
    wait_until(lambda: not victim.healthy, 30.0, message="not marked lost")
    assert not router.index._held.get(victim.instance_id)
    assert all(victim.instance_id not in h for h in router.index._holders.values())
    # the conversation goes on elsewhere, its output unchanged
    for prompt, ids, _ in _conversation(loop, router, seed=60, turns=3):
        assert ids == reference(prompt)
    assert_all_blocks_free(loop, [i for i in router.instances if i.healthy])


def test_policy_setting_is_checked():
    with pytest.raises(ValueError, match="policy must be load or kv"):
        RouterSettings(policy="cache")


def test_follow_ups_pull_only_the_blocks_the_decode_instance_lacks(tiny_model_dir, reference):
    """Policy load, one decode instance, no local prefill: every follow-up is handed off,
    and the decode instance pulls only the tail its cache lacks."""
    loop = LoopThread()
    config = DeploymentConfig.from_dict({"model": str(tiny_model_dir), "mode": "disaggregated",
                                         "engine": {"num_blocks": NUM_BLOCKS}})  # fmt: skip
    router = loop.run(start_local(config, RouterSettings(policy="load")))
    try:
        turns = _conversation(loop, router, seed=70, turns=3)
        bs = router.model_info.block_size
        per_block = turns[0][2].timing.kv_bytes / -(-len(turns[0][0]) // bs)
        for n, (prompt, ids, last) in enumerate(turns):
            assert ids == reference(prompt)
            assert not last.timing.local_prefill
            if n:
                assert last.timing.kv_hit_tokens > 0
                pulled = -(-len(prompt) // bs) - last.timing.kv_hit_tokens // bs
                assert last.timing.kv_bytes == pulled * per_block
        assert_all_blocks_free(loop, router.instances)
    finally:
        loop.run(router.shutdown())
        loop.close()
