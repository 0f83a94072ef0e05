"""KV cache events (engine/kv_events.py) from the block manager and a real engine: what is
announced (full blocks, once, with their parent; evictions; one AllBlocksCleared for a
reset), that a router's PrefixIndex fed every event holds exactly the engine's cached hashes
under eviction and preemption, and that the router's prompt_hashes are the engine's own
block hashes, salt included, one token short as find_cached_prefix is."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster.engine.block_manager import BlockManager
from cluster.engine.config import CacheConfig, EngineConfig
from cluster.engine.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventLog,
)
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.request import Request
from cluster.engine.sampling_params import SamplingParams
from cluster.router.prefix_index import PrefixIndex, prompt_hashes
from tests.engine.test_block_manager import BS, admit, compute, make_request


def with_events(bm: BlockManager) -> BlockManager:
    bm.events = KVEventLog()
    return bm


def drain(bm: BlockManager) -> list:
    return [event for _, event in bm.events.drain()]


def replay(events: list, held: set[bytes]) -> None:
    """Apply events to `held` strictly: a block is announced only when it is not held yet,
    removed only when it is (a duplicate or a phantom removal would fail here)."""
    for event in events:
        if isinstance(event, AllBlocksCleared):
            held.clear()
        elif isinstance(event, BlockStored):
            assert event.block_hashes, "an empty BlockStored"
            for h in event.block_hashes:
                assert h not in held, "a block announced twice"
                held.add(h)
        else:
            assert isinstance(event, BlockRemoved)
            for h in event.block_hashes:
                assert h in held, "a block removed that was never announced"
                held.remove(h)


def assert_index_holds(index: PrefixIndex, instance_id: str, hashes: list[bytes]) -> None:
    """The index's set for `instance_id` is exactly `hashes` (same size, each one held)."""
    assert index.num_blocks(instance_id) == len(set(hashes))
    for h in hashes:
        assert index.overlap([h], [instance_id])[instance_id] == 1


# -- what is announced ------------------------------------------------------------------------


def test_full_blocks_are_stored_with_chained_hashes_and_parent():
    bm = with_events(BlockManager(8, BS))
    req = make_request("a", range(10, 20))  # 10 tokens: 2 full blocks and 2 tokens
    compute(bm, req, 10)
    assert drain(bm) == [BlockStored(req.block_hashes[:2], None)]
    assert req.block_hashes[:2] == prompt_hashes(list(range(10, 20)), None, BS)
    req.all_token_ids += [20, 21]  # the third block fills: stored alone, parent the second
    compute(bm, req, 2)
    assert drain(bm) == [BlockStored([req.block_hashes[2]], req.block_hashes[1])]
    assert sorted(bm.cached_hashes()) == sorted(req.block_hashes)


def test_partial_blocks_and_hits_are_not_announced():
    bm = with_events(BlockManager(8, BS))
    partial = make_request("p", range(3))  # under one block
    compute(bm, partial, 3)
    compute(bm, partial, 0)
    assert drain(bm) == []
    bm.free("p")
    a = make_request("a", range(100, 112))
    admit(bm, a)
    assert drain(bm) == [BlockStored(a.block_hashes, None)]
    b = make_request("b", list(range(100, 112)) + list(range(50, 56)))  # a's 3 blocks + 6
    hits = admit(bm, b)
    assert len(hits) == 3  # taken from the cache: announced once already
    assert drain(bm) == [BlockStored([b.block_hashes[3]], a.block_hashes[2])]


def test_duplicate_of_a_cached_block_is_not_announced():
    """Two identical prompts computed side by side (neither was cached at admission): the
    second one's copies are not published, its first own block names the cached parent."""
    bm = with_events(BlockManager(12, BS))
    tokens = list(range(200, 216))
    a, b = make_request("a", tokens), make_request("b", tokens)
    assert bm.allocate_slots(a, 16) and bm.allocate_slots(b, 16)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a, 4)
    assert drain(bm) == [BlockStored(a.block_hashes[:1], None)]
    b.num_computed_tokens = 16
    bm.cache_full_blocks(b, 16)
    assert drain(bm) == [BlockStored(b.block_hashes[1:4], b.block_hashes[0])]
    a.num_computed_tokens = 16
    bm.cache_full_blocks(a, 16)
    assert drain(bm) == []  # every block of a is a duplicate now
    bm.check_integrity()


def test_a_run_after_a_gap_carries_its_own_parent():
    """A request whose block 1 is cached elsewhere while its blocks 0 and 2 are new: two
    BlockStored, the second's parent the cached block between them."""
    bm = with_events(BlockManager(8, BS))
    tokens = list(range(300, 312))
    v = make_request("v", tokens[:4])
    compute(bm, v, 4)  # h0, on v's block
    assert drain(bm) == [BlockStored(v.block_hashes, None)]
    x = make_request("x", tokens)
    compute(bm, x, 8)  # x's block 0 duplicates v's; its block 1 publishes h1
    h0, h1 = x.block_hashes[:2]
    assert drain(bm) == [BlockStored([h1], h0)]
    bm.free("v")
    w = make_request("w", range(400, 424))
    assert bm.allocate_slots(w, 24)  # takes every free block: evicts h0, keeps x's h1
    assert drain(bm) == [BlockRemoved([h0])]
    bm.free("w")
    a = make_request("a", tokens)
    compute(bm, a, 12)
    assert drain(bm) == [BlockStored([h0], None), BlockStored([a.block_hashes[2]], h1)]
    assert sorted(bm.cached_hashes()) == sorted(a.block_hashes)


def test_eviction_announces_each_cached_block_removed():
    bm = with_events(BlockManager(6, BS))
    a = make_request("a", range(10, 22))  # 3 full blocks
    admit(bm, a)
    partial = make_request("p", range(60, 66))  # 1 full block, 1 partial
    admit(bm, partial)
    drain(bm)
    bm.free("a")
    bm.free("p")
    big = make_request("big", range(500, 524))  # 6 blocks: every block is reused
    assert bm.allocate_slots(big, 24)
    removed = drain(bm)
    assert len(removed) == 1, "one allocation's evictions are one event"
    assert all(isinstance(e, BlockRemoved) for e in removed)
    hashes = [h for e in removed for h in e.block_hashes]
    # (p's partial block was never cached: nothing to announce for it)
    assert sorted(hashes) == sorted(a.block_hashes + partial.block_hashes)
    assert bm.cached_hashes() == []


def test_log_wakes_its_consumer_only_for_an_event_into_an_empty_log():
    woken = []
    log = KVEventLog(on_ready=lambda: woken.append(1))
    log.append(BlockStored([b"a", b"b"]))
    log.append(BlockRemoved([b"x"]))
    log.append(BlockRemoved([b"y"]))
    assert len(woken) == 1  # an engine step's many events wake the worker once
    assert log.drain() == [
        (1, BlockStored([b"a", b"b"])),
        (2, BlockRemoved([b"x"])),
        (3, BlockRemoved([b"y"])),
    ]
    assert log.drain() == []  # nothing appended: nothing to wake for
    assert len(woken) == 1
    log.append(BlockRemoved([b"z"]))
    assert len(woken) == 2


def test_reset_prefix_cache_is_one_all_blocks_cleared():
    bm = with_events(BlockManager(12, BS))
    for i in range(3):
        admit(bm, make_request(f"r{i}", range(i * 100, i * 100 + 9)))
    bm.free("r0")
    drain(bm)
    assert len(bm.cached_hashes()) == 6
    bm.reset_prefix_cache()
    assert drain(bm) == [AllBlocksCleared()]
    assert bm.cached_hashes() == []
    bm.check_integrity()
    bm.events = None
    bm.reset_prefix_cache()  # without a log: nothing recorded, nothing raised


# -- the index follows the cache: a hypothesis state machine, then a real engine ---------------


class EventsFollowTheCache(RuleBasedStateMachine):
    """Random admissions (shared prefixes, two salts), chunked compute, decode growth, frees,
    resets on a small pool; after every rule the events so far, applied to a PrefixIndex,
    give exactly the block manager's cached hashes."""

    BASES = [list(range(10, 40)), list(range(40, 70)), [7] * 30]

    def __init__(self):
        super().__init__()
        self.bm = with_events(BlockManager(10, BS))
        self.index = PrefixIndex()
        self.held: set[bytes] = set()
        self.live: dict[str, Request] = {}
        self.counter = 0

    @rule(
        base=st.sampled_from(range(3)),
        prefix_len=st.integers(0, 20),
        suffix=st.lists(st.integers(3, 9), max_size=6),
        salt=st.sampled_from([None, "t"]),
        chunk=st.integers(0, 12),
    )
    def admit(self, base, prefix_len, suffix, salt, chunk):
        tokens = self.BASES[base][:prefix_len] + suffix
        if not tokens:
            return
        self.counter += 1
        req = make_request(f"r{self.counter}", tokens, salt)
        hits = self.bm.find_cached_prefix(req)
        num_cached = len(hits) * BS
        if not self.bm.allocate_slots(req, req.num_tokens - num_cached, hits):
            return
        req.num_computed_tokens = min(req.num_tokens, num_cached + chunk)
        self.bm.cache_full_blocks(req, req.num_computed_tokens)
        self.live[req.request_id] = req

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 8))
    def advance(self, data, n):
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if req.num_computed_tokens == req.num_tokens:  # decode: one more token first
            if not self.bm.allocate_slots(req, 1):
                return
            req.append_output_token(data.draw(st.integers(3, 9)))
        req.num_computed_tokens = min(req.num_tokens, req.num_computed_tokens + n)
        self.bm.cache_full_blocks(req, req.num_computed_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.live)))
        self.bm.free(request_id)
        del self.live[request_id]

    @rule()
    def reset(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def index_equals_cache(self):
        self.bm.check_integrity(set(self.live))
        events = drain(self.bm)
        replay(events, self.held)
        self.index.apply("x", KVEventBatch(0, events))
        cached = self.bm.cached_hashes()
        assert self.held == set(cached)
        assert_index_holds(self.index, "x", cached)


TestEventsFollowTheCache = EventsFollowTheCache.TestCase
TestEventsFollowTheCache.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_equals_engine_cache_under_eviction(tiny_model_dir, seed):
    """A real engine on a 24-block pool (block_size 4), random requests over four shared
    prefixes and two salts, aborts and a reset: after every step, the index fed the step's
    events holds exactly the engine's cached hashes, and no event is a duplicate."""
    rng = random.Random(seed)
    cache = CacheConfig(block_size=BS, num_blocks=24)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=cache))
    bm = with_events(engine.block_manager)
    index, held = PrefixIndex(), set()
    prefixes = [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 25))] for _ in range(4)]
    num_added = num_removed = 0
    for step in itertools.count():
        if step >= 120 and not engine.has_unfinished():
            break
        assert step < 400, "requests never finished"
        if step < 120 and rng.random() < 0.5:
            suffix = [rng.randrange(3, 500) for _ in range(rng.randrange(11))]
            prompt = rng.choice(prefixes) + suffix
            params = SamplingParams(max_tokens=rng.randrange(1, 9), temperature=0, ignore_eos=True)
            engine.add_request(f"s{step}", prompt, params, cache_salt=rng.choice([None, "t"]))
            num_added += 1
        if rng.random() < 0.05 and engine.scheduler.running:
            engine.abort(rng.choice(engine.scheduler.running).request_id)
        if step == 80:
            bm.reset_prefix_cache()
        engine.step()
        events = drain(bm)
        num_removed += sum(isinstance(e, BlockRemoved) for e in events)
        replay(events, held)
        index.apply("x", KVEventBatch(step, events))
        cached = bm.cached_hashes()
        assert held == set(cached), f"step {step}"
        assert_index_holds(index, "x", cached)
        engine.check_integrity()
    assert num_added > 30 and num_removed > 0, "the pool never evicted: make it smaller"
    assert engine.num_free_blocks == bm.num_blocks


# -- salts and the router's hashes ------------------------------------------------------------


def test_salts_give_disjoint_hashes_and_no_overlap(tiny_model_dir):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(block_size=BS, num_blocks=64))
    )
    bm = with_events(engine.block_manager)
    prompt = list(range(30, 55))  # 25 tokens: 6 hashable blocks
    params = SamplingParams(max_tokens=1, temperature=0)
    by_salt = {salt: prompt_hashes(prompt, salt, BS) for salt in (None, "a", "b")}
    assert all(len(h) == 6 for h in by_salt.values())
    assert len({h for hashes in by_salt.values() for h in hashes}) == 18  # pairwise disjoint
    index = PrefixIndex()
    for salt, instance_id in (("a", "x"), (None, "y")):
        engine.add_request(None, prompt, params, cache_salt=salt)
        while engine.has_unfinished():
            engine.step()
        index.apply(instance_id, KVEventBatch(0, drain(bm)))
        # the engine's own blocks for this salt are the router's hashes for it
        hits = bm.find_cached_prefix(make_request("q", prompt, salt))
        assert [bm.blocks[b].hash for b in hits] == by_salt[salt]
    assert index.overlap(by_salt["a"], ["x", "y"]) == {"x": 6, "y": 0}
    assert index.overlap(by_salt[None], ["x", "y"]) == {"x": 0, "y": 6}
    assert index.overlap(by_salt["b"], ["x", "y"]) == {"x": 0, "y": 0}
    assert not bm.find_cached_prefix(make_request("q", prompt, "b"))


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 9, 15, 16, 17, 33])
def test_prompt_hashes_are_the_engines_and_stop_one_token_short(num_tokens):
    tokens = [random.Random(num_tokens).randrange(3, 500) for _ in range(num_tokens)]
    for salt in (None, "tenant"):
        bm = BlockManager(16, BS)
        req = make_request("a", tokens, salt)
        assert bm.find_cached_prefix(req) == []
        assert len(req.block_hashes) == num_tokens // BS  # every full block
        hashes = prompt_hashes(tokens, salt, BS)
        assert len(hashes) == (num_tokens - 1) // BS  # one token always left to compute
        assert hashes == req.block_hashes[: len(hashes)]
        admit(bm, req)
        again = make_request("b", tokens, salt)
        hits = bm.find_cached_prefix(again)  # what the engine would serve from its cache
        assert [bm.blocks[b].hash for b in hits] == hashes


def test_prompt_hashes_match_a_real_engines_hits(tiny_model_dir):
    """Through the engine: a second identical request is served exactly the blocks that
    prompt_hashes names, for a prompt that ends on a block boundary and one that does not."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    bs = engine.block_manager.block_size
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for num_tokens in (3 * bs, 3 * bs + 5):
        prompt = list(range(7, 7 + num_tokens))
        engine.generate(prompt, params)
        second = engine.generate(prompt, params)[0]
        hashes = prompt_hashes(prompt, None, bs)
        assert second.num_cached_tokens == len(hashes) * bs
        assert set(hashes) <= set(engine.block_manager.cached_hashes())
