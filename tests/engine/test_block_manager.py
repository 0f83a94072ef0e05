"""BlockManager on the CPU: allocation and freeing, the hash-chained prefix cache (hits,
sharing, revival, LRU eviction, salts, verification) and check_integrity itself, plus a
hypothesis state machine that drives random allocate/grow/publish/free sequences."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cluster.engine.block_manager import BlockManager
from cluster.engine.request import Request
from cluster.engine.sampling_params import SamplingParams

BS = 4  # block_size in the hand-written tests


def make_request(request_id: str, token_ids, cache_salt: str | None = None) -> Request:
    params = SamplingParams(max_tokens=16)
    return Request(request_id, list(token_ids), params, cache_salt=cache_salt)


def snapshot(bm: BlockManager):
    """Everything a failed call must leave untouched."""
    blocks = [(b.ref_count, b.hash, b.parent_hash, b.token_ids) for b in bm.blocks]
    tables = {rid: list(table) for rid, table in bm.req_block_ids.items()}
    return blocks, list(bm.free_queue), dict(bm.cached_block_ids), tables


def compute(bm: BlockManager, request: Request, num_new_tokens: int) -> None:
    """Allocate and 'run' num_new_tokens more of the request, then publish full blocks."""
    assert bm.allocate_slots(request, num_new_tokens)
    bm.check_integrity()
    request.num_computed_tokens += num_new_tokens
    bm.cache_full_blocks(request, request.num_computed_tokens)
    bm.check_integrity()


def admit(bm: BlockManager, request: Request) -> list[int]:
    """Admit a request the way the scheduler does: take prefix hits, compute the rest."""
    hits = bm.find_cached_prefix(request)
    num_cached = len(hits) * bm.block_size
    assert bm.allocate_slots(request, request.num_tokens - num_cached, hits)
    bm.check_integrity()
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request, request.num_computed_tokens)
    bm.check_integrity()
    return hits


def free(bm: BlockManager, request: Request) -> None:
    bm.free(request.request_id)
    bm.check_integrity()


def assert_all_free(bm: BlockManager) -> None:
    bm.check_integrity(live_request_ids=set())
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(bm.free_queue) == list(range(bm.num_blocks))
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.usage == 0.0


# -- allocation -------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_allocate_grow_free_round_trip(enable_prefix_caching):
    bm = BlockManager(8, BS, enable_prefix_caching)
    req = make_request("a", range(10))
    compute(bm, req, 10)  # 10 tokens -> 3 blocks
    table = list(bm.block_ids("a"))
    assert len(table) == 3 and len(set(table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    assert not set(table) & set(bm.free_queue)
    assert all(bm.blocks[b].ref_count == 1 for b in table)

    req.append_output_token(100)
    req.append_output_token(101)
    compute(bm, req, 2)  # 12 tokens still fit in 3 blocks
    assert bm.block_ids("a") == table
    req.append_output_token(102)
    compute(bm, req, 1)  # the 13th token opens a 4th block, appended to the table
    assert bm.block_ids("a")[:3] == table and len(bm.block_ids("a")) == 4
    assert bm.num_free_blocks == 4

    free(bm, req)
    assert bm.block_ids("a") == []
    assert_all_free(bm)
    free(bm, req)  # freeing twice is a no-op
    assert_all_free(bm)


def test_num_blocks_needed_rounds_up():
    bm = BlockManager(4, BS)
    assert [bm.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_takes_blocks_from_the_front_of_the_free_queue():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    compute(bm, make_request("a", range(8)), 8)
    assert bm.block_ids("a") == [0, 1]
    assert list(bm.free_queue) == [2, 3, 4, 5]


def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, BS)
    a = make_request("a", range(9))
    compute(bm, a, 9)  # 3 of 4 blocks
    before = snapshot(bm)

    b = make_request("b", range(50, 58))
    assert not bm.can_allocate(b, 8, [])
    assert not bm.allocate_slots(b, 8)  # needs 2, 1 free
    assert snapshot(bm) == before
    assert "b" not in bm.req_block_ids
    bm.check_integrity(live_request_ids={"a"})

    a.append_output_token(7)
    a.append_output_token(8)
    a.append_output_token(9)
    a.append_output_token(10)
    assert not bm.allocate_slots(a, 8)  # growth past the pool: the table stays as it was
    assert snapshot(bm) == before
    assert bm.allocate_slots(a, 4)  # exactly the last block
    bm.check_integrity()
    assert bm.num_free_blocks == 0
    free(bm, a)
    assert_all_free(bm)


def test_failed_allocation_with_prefix_hits_changes_nothing():
    bm = BlockManager(4, BS)
    admit(bm, make_request("a", range(9)))
    free(bm, make_request("a", []))  # 2 cached blocks now sit in the free queue
    b = make_request("b", list(range(8)) + list(range(100, 120)))  # 2 hits + 20 new tokens
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    before = snapshot(bm)
    assert not bm.allocate_slots(b, b.num_tokens - 8, hits)  # 2 revived + 5 new > 4 free
    assert snapshot(bm) == before
    assert all(bm.blocks[h].hash is not None for h in hits)
    assert_all_free(bm)


# -- prefix cache -----------------------------------------------------------------------------


def test_prefix_hit_shares_blocks_still_in_use():
    bm = BlockManager(10, BS)
    a = make_request("a", range(10))
    assert admit(bm, a) == []
    a_blocks = list(bm.block_ids("a"))
    assert len(bm.cached_block_ids) == 2  # 2 full blocks published, the partial one not

    b = make_request("b", list(range(8)) + [77, 78, 79])
    hits = admit(bm, b)
    assert hits == a_blocks[:2]
    assert bm.block_ids("b")[:2] == a_blocks[:2]
    assert bm.block_ids("b")[2] not in a_blocks
    assert [bm.blocks[i].ref_count for i in a_blocks] == [2, 2, 1]
    assert bm.num_free_blocks == 10 - 4

    free(bm, a)  # shared blocks stay in use by b
    assert [bm.blocks[i].ref_count for i in a_blocks] == [1, 1, 0]
    assert a_blocks[0] not in bm.free_queue and a_blocks[2] in bm.free_queue
    free(bm, b)
    assert_all_free(bm)


@pytest.mark.parametrize(
    ("prompt_len", "expected_hits"),
    [(2 * BS, 1), (2 * BS + 1, 2), (3 * BS, 2), (BS, 0), (1, 0)],
)
def test_last_token_is_never_a_hit(prompt_len, expected_hits):
    bm = BlockManager(10, BS)
    a = make_request("a", range(3 * BS + 2))
    admit(bm, a)
    b = make_request("b", range(prompt_len))
    hits = admit(bm, b)
    assert hits == bm.block_ids("a")[:expected_hits]
    assert len(hits) * BS < b.num_tokens
    free(bm, a)
    free(bm, b)
    assert_all_free(bm)


def test_prefix_hit_revives_freed_cached_blocks():
    bm = BlockManager(6, BS)
    a = make_request("a", range(9))
    admit(bm, a)
    a_blocks = list(bm.block_ids("a"))
    free(bm, a)
    assert bm.num_free_blocks == 6
    assert all(bm.blocks[i].hash is not None for i in a_blocks[:2])

    b = make_request("b", range(12))
    hits = admit(bm, b)
    assert hits == a_blocks[:2]
    for block_id in hits:  # back in use, out of the free queue, hash kept
        assert bm.blocks[block_id].ref_count == 1
        assert block_id not in bm.free_queue
        assert bm.cached_block_ids[bm.blocks[block_id].hash] == block_id
    assert bm.num_free_blocks == 6 - 3
    free(bm, b)
    assert_all_free(bm)


def test_lru_evicts_front_first_and_a_request_tail_before_its_head():
    bm = BlockManager(6, BS)
    a = make_request("a", range(12))
    admit(bm, a)
    assert bm.block_ids("a") == [0, 1, 2]
    free(bm, a)
    # never-used blocks first, then a's blocks tail-first: its head is evicted last
    assert list(bm.free_queue) == [3, 4, 5, 2, 1, 0]

    b = make_request("b", range(100, 113))  # 4 blocks: takes 3, 4, 5 and evicts a's tail
    compute(bm, b, 13)
    assert bm.block_ids("b") == [3, 4, 5, 2]
    assert a.block_hashes[2] not in bm.cached_block_ids
    assert bm.blocks[2].hash is None and bm.blocks[2].token_ids == ()
    assert bm.cached_block_ids[a.block_hashes[1]] == 1

    c = make_request("c", range(13))
    assert bm.find_cached_prefix(c) == [0, 1]  # a's head survived

    d = make_request("d", range(200, 204))
    compute(bm, d, 4)  # evicts block 1, the next-oldest
    assert bm.block_ids("d") == [1]
    assert a.block_hashes[1] not in bm.cached_block_ids
    assert bm.find_cached_prefix(c) == [0]  # the chain stops where the cache does
    free(bm, b)
    free(bm, d)
    assert_all_free(bm)


def test_revived_block_goes_back_to_the_free_queue_tail():
    bm = BlockManager(4, BS)
    a = make_request("a", range(5))
    admit(bm, a)
    free(bm, a)
    assert list(bm.free_queue) == [2, 3, 1, 0]
    b = make_request("b", range(5))
    assert admit(bm, b) == [0]
    free(bm, b)
    assert list(bm.free_queue)[-1] == 0  # just used: evicted last


@pytest.mark.parametrize("salts", [("x", "y"), (None, "y"), ("x", None)])
def test_different_cache_salts_never_share(salts):
    bm = BlockManager(10, BS)
    a = make_request("a", range(9), cache_salt=salts[0])
    admit(bm, a)
    b = make_request("b", range(9), cache_salt=salts[1])
    assert admit(bm, b) == []
    assert not set(bm.block_ids("a")) & set(bm.block_ids("b"))
    assert a.block_hashes[0] != b.block_hashes[0]
    c = make_request("c", range(9), cache_salt=salts[1])
    assert admit(bm, c) == bm.block_ids("b")[:2]  # same salt does share
    for request in (a, b, c):
        free(bm, request)
    assert_all_free(bm)


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = make_request("a", range(9))
    admit(bm, a)
    assert bm.cached_block_ids == {}
    assert all(b.hash is None for b in bm.blocks)
    b = make_request("b", range(9))
    assert admit(bm, b) == []
    assert not set(bm.block_ids("a")) & set(bm.block_ids("b"))
    free(bm, a)
    free(bm, b)
    assert_all_free(bm)


@pytest.mark.parametrize("field", ["token_ids", "parent_hash"])
@pytest.mark.parametrize(("tampered_index", "expected_hits"), [(0, 0), (1, 1)])
def test_corrupted_cache_entry_is_rejected(field, tampered_index, expected_hits):
    bm = BlockManager(10, BS)
    a = make_request("a", range(9))
    admit(bm, a)
    a_blocks = list(bm.block_ids("a"))
    free(bm, a)
    block = bm.blocks[a_blocks[tampered_index]]
    if field == "token_ids":
        block.token_ids = (5, 5, 5, 5)
    else:
        block.parent_hash = b"\x00" * 16
    bm.check_integrity()  # the hash map is still consistent; only verification can tell

    b = make_request("b", range(9))
    hits = admit(bm, b)
    assert hits == a_blocks[:expected_hits]
    assert a_blocks[tampered_index] not in bm.block_ids("b")
    free(bm, b)
    assert_all_free(bm)


def test_hash_collision_is_rejected():
    """Point b's first block hash at a's block (a forged collision): verification refuses it."""
    bm = BlockManager(10, BS)
    a = make_request("a", range(9))
    admit(bm, a)
    b = make_request("b", range(100, 109))
    bm.find_cached_prefix(b)  # fills b.block_hashes
    bm.cached_block_ids[b.block_hashes[0]] = bm.block_ids("a")[0]
    assert bm.find_cached_prefix(b) == []


def test_cache_full_blocks_publishes_only_computed_full_blocks():
    bm = BlockManager(10, BS)
    a = make_request("a", range(10))
    compute(bm, a, 6)  # chunk of 6: one full block computed
    assert list(bm.cached_block_ids.values()) == [bm.block_ids("a")[0]]
    first = bm.blocks[bm.block_ids("a")[0]]
    assert first.token_ids == (0, 1, 2, 3)
    compute(bm, a, 4)
    assert len(bm.cached_block_ids) == 2
    for _ in range(2):
        a.append_output_token(50 + a.num_tokens)
    compute(bm, a, 2)  # block 2 is now full with 2 prompt and 2 output tokens
    third = bm.blocks[bm.block_ids("a")[2]]
    assert third.token_ids == (8, 9, 60, 61)
    assert third.parent_hash == a.block_hashes[1]
    assert len(bm.cached_block_ids) == 3

    b = make_request("b", [*range(10), 60, 61, 7])
    assert admit(bm, b) == bm.block_ids("a")  # output tokens are cached too
    free(bm, a)
    free(bm, b)
    assert_all_free(bm)


def test_identical_block_computed_twice_is_published_once():
    bm = BlockManager(10, BS)
    a = make_request("a", range(5))
    b = make_request("b", range(5))
    compute(bm, a, 5)
    compute(bm, b, 5)  # b ran without looking up the cache
    a_first, b_first = bm.block_ids("a")[0], bm.block_ids("b")[0]
    assert bm.cached_block_ids == {a.block_hashes[0]: a_first}
    assert bm.blocks[b_first].hash is None
    free(bm, a)
    c = make_request("c", range(200, 232))  # evicts every free block, a's included
    compute(bm, c, 32)
    assert bm.cached_block_ids.get(a.block_hashes[0]) is None
    bm.cache_full_blocks(b, b.num_computed_tokens)  # now b's copy can be published
    bm.check_integrity()
    assert bm.cached_block_ids[b.block_hashes[0]] == b_first
    free(bm, b)
    free(bm, c)
    assert_all_free(bm)


def test_reset_prefix_cache_forgets_every_hash():
    bm = BlockManager(10, BS)
    a = make_request("a", range(9))
    admit(bm, a)
    b = make_request("b", range(100, 109))
    admit(bm, b)
    free(bm, a)
    bm.reset_prefix_cache()
    bm.check_integrity()
    assert bm.cached_block_ids == {}
    assert all(block.hash is None and block.token_ids == () for block in bm.blocks)
    assert bm.find_cached_prefix(make_request("c", range(9))) == []
    free(bm, b)
    assert_all_free(bm)


# -- check_integrity --------------------------------------------------------------------------


def _busy_manager() -> BlockManager:
    bm = BlockManager(6, BS)
    admit(bm, make_request("a", range(9)))
    admit(bm, make_request("b", range(9)))  # shares 2 blocks with a
    bm.check_integrity(live_request_ids={"a", "b"})
    return bm


def test_check_integrity_catches_bumped_ref_count():
    bm = _busy_manager()
    bm.blocks[bm.block_ids("a")[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_integrity()


def test_check_integrity_catches_in_use_block_in_free_queue():
    bm = _busy_manager()
    bm.free_queue[bm.block_ids("a")[2]] = None
    with pytest.raises(AssertionError, match="free-queue"):
        bm.check_integrity()


def test_check_integrity_catches_free_block_missing_from_queue():
    bm = _busy_manager()
    del bm.free_queue[next(iter(bm.free_queue))]
    with pytest.raises(AssertionError, match="free-queue"):
        bm.check_integrity()


def test_check_integrity_catches_block_listed_twice():
    bm = _busy_manager()
    table = bm.req_block_ids["a"]
    table.append(table[0])
    bm.blocks[table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="twice"):
        bm.check_integrity()


def test_check_integrity_catches_stale_cache_entry():
    bm = _busy_manager()
    bm.blocks[bm.block_ids("a")[0]].hash = None
    with pytest.raises(AssertionError, match="stale"):
        bm.check_integrity()


def test_check_integrity_reports_leaked_request():
    bm = _busy_manager()
    with pytest.raises(AssertionError, match=r"\['b'\]"):
        bm.check_integrity(live_request_ids={"a"})
    bm.free("b")
    bm.check_integrity(live_request_ids={"a"})


# -- randomized -------------------------------------------------------------------------------

PREFIXES = [list(range(1000, 1040)), list(range(2000, 2040))]
# One drawn integer per rule, expanded with random.Random: hypothesis' per-draw cost would
# otherwise dominate and this file must stay fast.
SEEDS = st.integers(0, 2**32 - 1)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random requests over two shared prefixes, grown by random chunks (with decode tokens),
    published and freed in random order on a small pool. A shadow KV store records which
    token each (block, slot) was computed for, so every prefix hit is checked against what
    was really written there, and no request may ever write into a shared or published block."""

    @initialize(
        num_blocks=st.integers(2, 16),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.live: dict[str, Request] = {}
        self.kv: dict[tuple[int, int], int] = {}
        self.next_id = 0

    def _pick(self, seed: int) -> Request:
        live = sorted(self.live)
        return self.live[live[seed % len(live)]]

    def _write(self, request: Request, num_new: int) -> None:
        bs = self.bm.block_size
        table = self.bm.block_ids(request.request_id)
        start = request.num_computed_tokens
        for pos in range(start, start + num_new):
            block = self.bm.blocks[table[pos // bs]]
            assert block.ref_count == 1, "writing into a shared block"
            assert block.hash is None, "writing into a published block"
            self.kv[block.block_id, pos % bs] = request.all_token_ids[pos]
        request.num_computed_tokens += num_new
        self.bm.cache_full_blocks(request, request.num_computed_tokens)

    def _assert_kv(self, request: Request) -> None:
        bs = self.bm.block_size
        table = self.bm.block_ids(request.request_id)
        for pos in range(request.num_computed_tokens):
            assert self.kv[table[pos // bs], pos % bs] == request.all_token_ids[pos]

    @rule(seed=SEEDS)
    def add(self, seed):
        rng = random.Random(seed)
        prompt = rng.choice(PREFIXES)[: rng.randint(0, 40)]
        prompt += [rng.randint(0, 3) for _ in range(rng.randint(0 if prompt else 1, 10))]
        salt = rng.choice([None, "s"])
        request = make_request(f"r{self.next_id}", prompt, cache_salt=salt)
        self.next_id += 1
        hits = self.bm.find_cached_prefix(request)
        for i, block_id in enumerate(hits):
            assert self.bm.blocks[block_id].hash == request.block_hashes[i]
        num_cached = len(hits) * self.bm.block_size
        assert num_cached < request.num_tokens
        num_new = min(rng.randint(1, 24), request.num_tokens - num_cached)
        before = snapshot(self.bm)
        if not self.bm.allocate_slots(request, num_new, hits):
            assert snapshot(self.bm) == before
            return
        self.live[request.request_id] = request
        request.num_computed_tokens = num_cached
        self._assert_kv(request)  # the hits hold exactly this request's tokens
        self._write(request, num_new)

    @precondition(lambda self: self.live)
    @rule(seed=SEEDS)
    def grow(self, seed):
        rng = random.Random(seed)
        request = self._pick(seed)
        if request.num_pending_tokens == 0:
            request.append_output_token(rng.randint(0, 3))  # a decode: the sampled token
        num_new = min(rng.randint(1, 16), request.num_pending_tokens)
        before = snapshot(self.bm)
        if not self.bm.allocate_slots(request, num_new):
            assert snapshot(self.bm) == before
            return
        self._write(request, num_new)

    @precondition(lambda self: self.live)
    @rule(seed=SEEDS)
    def free(self, seed):
        request_id = self._pick(seed).request_id
        del self.live[request_id]
        self.bm.free(request_id)

    @invariant()
    def consistent(self):
        bm = self.bm
        bm.check_integrity(live_request_ids=set(self.live))
        num_in_use = sum(1 for b in bm.blocks if b.ref_count)
        assert num_in_use <= sum(len(bm.block_ids(rid)) for rid in self.live)
        assert bm.num_free_blocks + num_in_use == bm.num_blocks
        for request in self.live.values():
            num_needed = bm.num_blocks_needed(request.num_computed_tokens)
            assert len(bm.block_ids(request.request_id)) == num_needed
            self._assert_kv(request)

    def teardown(self):
        for request_id in list(self.live):
            self.bm.free(request_id)
            self.bm.check_integrity()
        assert_all_free(self.bm)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
