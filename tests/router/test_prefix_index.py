"""The router's KV-aware parts, pure Python: PrefixIndex (what each instance holds, from its
KV events; leading-prefix overlap), the routing policy under `load` and `kv`, and the
LocalPrefill break-even threshold (conditional disaggregation)."""

from __future__ import annotations

import random

import msgspec
import pytest

from cluster.engine.block_manager import BlockManager
from cluster.engine.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventLog,
)
from cluster.engine.request import Request
from cluster.engine.sampling_params import SamplingParams
from cluster.router.instances import Instance
from cluster.router.local_prefill import LocalPrefill
from cluster.router.policy import pick
from cluster.router.prefix_index import PrefixIndex, prompt_hashes
from cluster.workers.protocol import EngineTiming, InstanceInfo, Load

H = [bytes([i]) * 16 for i in range(10)]  # stand-ins for chained block hashes


def batch(*events, seq: int = 1, snapshot: bool = False) -> KVEventBatch:
    return KVEventBatch(seq, list(events), snapshot=snapshot)


# -- PrefixIndex ------------------------------------------------------------------------------


def test_overlap_counts_the_leading_prefix_only():
    index = PrefixIndex()
    index.apply("a", batch(BlockStored(H[0:3])))
    index.apply("b", batch(BlockStored([H[0], H[2], H[3]], H[1])))  # b lacks H[1]: a gap
    index.apply("c", batch(BlockStored(H[1:4], H[0])))  # c lacks the first block
    assert index.overlap(H[0:6], ["a", "b", "c", "d"]) == {"a": 3, "b": 1, "c": 0, "d": 0}
    assert index.overlap([], ["a"]) == {"a": 0}
    assert index.overlap(H[2:4], ["a", "b", "c"]) == {"a": 1, "b": 2, "c": 2}
    assert len(index) == 4
    assert [index.num_blocks(i) for i in "abcd"] == [3, 3, 3, 0]


def test_removal_forgets_one_holder_of_a_shared_block():
    index = PrefixIndex()
    index.apply("a", batch(BlockStored(H[0:3])))
    index.apply("b", batch(BlockStored(H[0:2])))
    index.apply("a", batch(BlockRemoved([H[1]]), BlockRemoved([H[9]])))  # H[9]: unknown
    assert index.overlap(H[0:3], ["a", "b"]) == {"a": 1, "b": 2}
    assert len(index) == 3  # H[1] still held by b
    index.apply("b", batch(BlockRemoved(H[0:2])))
    assert len(index) == 2 and index.num_blocks("b") == 0
    assert index.overlap(H[0:3], ["a", "b"]) == {"a": 1, "b": 0}


def test_all_blocks_cleared_empties_that_instance_in_order():
    index = PrefixIndex()
    index.apply("b", batch(BlockStored(H[0:2])))
    index.apply("a", batch(BlockStored(H[0:2]), AllBlocksCleared(), BlockStored([H[5]])))
    assert index.num_blocks("a") == 1
    assert index.overlap(H[0:2], ["a", "b"]) == {"a": 0, "b": 2}
    assert index.overlap([H[5]], ["a", "b"]) == {"a": 1, "b": 0}


def test_drop_forgets_only_that_instance():
    index = PrefixIndex()
    index.apply("a", batch(BlockStored(H[0:3])))
    index.apply("b", batch(BlockStored(H[0:4])))
    index.drop("a")
    index.drop("nobody")
    assert index.num_blocks("a") == 0 and index.num_blocks("b") == 4
    assert index.overlap(H[0:4], ["a", "b"]) == {"a": 0, "b": 4}
    assert len(index) == 4
    index.drop("b")
    assert len(index) == 0


def test_a_snapshot_batch_rebuilds_an_instance():
    """What a new subscription's first batch does: AllBlocksCleared, then every cached
    hash (stale entries from before go; the other instances stay)."""
    index = PrefixIndex()
    index.apply("a", batch(BlockStored(H[0:4])))
    index.apply("b", batch(BlockStored(H[0:2])))
    snapshot = batch(AllBlocksCleared(), BlockStored([H[7], H[0], H[1]]), seq=0, snapshot=True)
    index.apply("a", snapshot)
    assert index.num_blocks("a") == 3 and index.num_blocks("b") == 2
    assert index.overlap(H[0:4], ["a", "b"]) == {"a": 2, "b": 2}
    assert index.overlap([H[7]], ["a"]) == {"a": 1}
    index.apply("a", snapshot)  # applied twice (a resubscription): the same state
    assert index.num_blocks("a") == 3 and len(index) == 3


def test_batches_survive_the_wire():
    """KVEventBatch crosses the data plane (msgpack): every event kind round-trips."""
    sent = batch(
        AllBlocksCleared(), BlockStored(H[0:2]), BlockStored([H[2]], H[1]), BlockRemoved([H[0]])
    )
    wire = msgspec.msgpack.encode(sent)
    assert msgspec.msgpack.decode(wire, type=KVEventBatch) == sent


# -- policy -----------------------------------------------------------------------------------


class StubClient:
    """A stand-in for InstanceClient: pick() reads only `.info` from the client (a pure
    policy test; no connection is involved)."""

    def __init__(self, info: InstanceInfo):
        self.info = info


def instance(
    instance_id: str,
    role: str = "decode",
    *,
    num_blocks: int = 100,
    free: int | None = None,
    pending: int = 0,
    streams: int = 0,
    recent: int = 0,
    active: int = 0,
    healthy: bool = True,
) -> Instance:
    info = InstanceInfo(
        instance_id=instance_id, role=role, node="n", address="tcp://127.0.0.1:1", pid=1,
        model_path="m", architecture="LlamaForCausalLM", max_model_len=1024, vocab_size=512,
        dtype="float32", num_layers=2, block_size=16, num_blocks=num_blocks, eos_token_ids=(2,),
    )  # fmt: skip
    load = None
    if free is not None:
        load = Load(0, 0, pending, num_blocks, free, 0.0)
    i = Instance(instance_id, role, StubClient(info), healthy=healthy, load=load)
    i.pending_prompt_tokens, i.num_streams, i.num_recent_blocks = pending, streams, recent
    i.num_active_blocks = active
    return i


def picks(pool, role, n=60, **kwargs) -> set[str]:
    """The instances pick() chose over n tries (it breaks ties at random)."""
    kwargs.setdefault("exclude", set())
    kwargs.setdefault("need_blocks", 0)
    return {pick(pool, role, **kwargs).instance_id for _ in range(n)}


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(1234)  # pick() shuffles with the module's generator


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_kv_prefers_the_larger_overlap_at_equal_load(role):
    pool = [instance(x, role, free=50, pending=64) for x in "abc"]
    overlap = {"a": 2, "b": 6, "c": 0}
    got = picks(pool, role, need_blocks=8, overlap=overlap, num_prompt_blocks=8)
    assert got == {"b"}


@pytest.mark.parametrize("role", ["prefill", "colocated"])
def test_kv_prefers_the_shorter_queue_at_equal_overlap(role):
    pool = [
        instance("a", role, free=50, pending=320),
        instance("b", role, free=50, pending=32),
        instance("c", role, free=50, pending=160),
    ]
    overlap = {"a": 3, "b": 3, "c": 3}
    assert picks(pool, role, need_blocks=8, overlap=overlap, num_prompt_blocks=8) == {"b"}


def test_kv_decode_prefers_fewer_blocks_in_use_at_equal_overlap():
    """In use: the blocks of the streams the router has open there (its own count), not the
    polled free figure (cached blocks count as free in it)."""
    pool = [
        instance("a", free=20, active=80),
        instance("b", free=20, active=20),
        instance("c", free=90, active=30),
    ]
    overlap = dict.fromkeys("abc", 4)
    assert picks(pool, "decode", need_blocks=8, overlap=overlap, num_prompt_blocks=8) == {"b"}


def test_kv_weights_apply_to_their_role():
    """overlap_weight 0 makes prefill ignore overlap (queue alone); decode_overlap_weight 0
    makes decode ignore it (blocks in use alone)."""
    overlap = {"a": 8, "b": 0}
    prefill = [instance("a", "prefill", pending=64), instance("b", "prefill", pending=0)]
    kw = {"overlap": overlap, "num_prompt_blocks": 8}
    assert picks(prefill, "prefill", weights=(1.0, 0.0), **kw) == {"a"}
    assert picks(prefill, "prefill", weights=(0.0, 1.0), **kw) == {"b"}
    decode = [instance("a", free=90, active=10), instance("b", free=95, active=5)]
    assert picks(decode, "decode", weights=(0.0, 1.0), **kw) == {"a"}
    assert picks(decode, "decode", weights=(1.0, 0.0), **kw) == {"b"}


@pytest.mark.parametrize("role", ["decode", "colocated"])
def test_kv_respects_kv_room_first(role):
    need = 10
    # a holds 8 of the 10 blocks but has 1 free: no room for the other 2, whatever its score
    pool = [instance("a", role, free=1), instance("b", role, free=40, pending=800)]
    overlap = {"a": 8, "b": 0}
    kw = {"need_blocks": need, "overlap": overlap, "num_prompt_blocks": need}
    assert picks(pool, role, **kw) == {"b"}
    # neither has room: the hit decides (the KV wait on the instance does the rest)
    pool = [instance("a", role, free=2), instance("b", role, free=2)]
    assert picks(pool, role, **kw) == {"a"}
    # blocks routed since the last poll are not free any more
    pool = [instance("a", role, free=5, recent=4), instance("b", role, free=40, pending=800)]
    assert picks(pool, role, **kw) == {"b"}
    # nowhere has room: still one instance (the caller's KV wait decides)
    pool = [instance("a", role, free=0), instance("b", role, free=0)]
    assert picks(pool, role, **kw) == {"a"}


def test_kv_room_counts_cached_blocks_that_are_free():
    """A decode instance's cached prefix sits in free blocks once the turn that made it has
    ended (Load.num_free_kv_blocks counts them): reserving the next turn revives them out of
    that free count, so they do not lower the free blocks it needs. Here instance a (an
    8-block prefix cached, 10 free, 12 needed) cannot reserve the request, b (12 free) can:
    policy kv must not pick a as the one with room."""
    bs = 16
    turn1 = list(range(3, 3 + 8 * bs))
    turn2 = turn1 + list(range(200, 260))  # 188 tokens: 12 blocks, the first 8 cached on a
    need_blocks = -(-(len(turn2) + 1) // bs)  # as the router counts them (request_run.py)
    managers = {"a": BlockManager(12, bs), "b": BlockManager(12, bs)}
    a = managers["a"]
    a.events = KVEventLog()
    index = PrefixIndex()
    first = Request("t1", turn1, SamplingParams(max_tokens=1))
    assert a.allocate_slots(first, len(turn1))
    first.num_computed_tokens = len(turn1)
    a.cache_full_blocks(first, len(turn1))
    a.free("t1")  # turn 1 ended: its 8 blocks are cached and free
    other = Request("other", list(range(300, 332)), SamplingParams(max_tokens=1))
    assert a.allocate_slots(other, 32)  # 2 blocks in use by another request
    index.apply("a", KVEventBatch(0, [e for _, e in a.events.drain()]))
    hashes = prompt_hashes(turn2, None, bs)
    overlap = index.overlap(hashes, ["a", "b"])
    assert overlap == {"a": 8, "b": 0} and a.num_free_blocks == 10
    pool = [instance(x, free=managers[x].num_free_blocks, num_blocks=12) for x in "ab"]
    chosen = pick(pool, "decode", set(), need_blocks, overlap, len(hashes), block_size=bs)
    bm = managers[chosen.instance_id]
    second = Request("t2", turn2, SamplingParams(max_tokens=1))
    hits = bm.find_cached_prefix(second)
    assert bm.can_allocate(second, len(turn2) - len(hits) * bs, hits), (
        f"picked {chosen.instance_id}, which has no room for the request"
    )


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
@pytest.mark.parametrize("policy", ["load", "kv"])
def test_ties_are_broken_at_random_over_all_equal_instances(role, policy):
    pool = [instance(x, role, free=50, pending=16, streams=1) for x in "abcd"]
    kw = {"overlap": dict.fromkeys("abcd", 2), "num_prompt_blocks": 4} if policy == "kv" else {}
    assert picks(pool, role, n=200, need_blocks=4, **kw) == set("abcd")


def test_load_policy_is_unchanged():
    pending = {"a": 300, "b": 20, "c": 90}
    prefill = [instance(x, "prefill", pending=p) for x, p in pending.items()]
    assert picks(prefill, "prefill") == {"b"}
    decode = [
        instance("a", free=3, streams=0),  # no room for 4 blocks
        instance("b", free=50, streams=2),
        instance("c", free=40, streams=1),
        instance("d", free=60, streams=1),
    ]
    assert picks(decode, "decode", need_blocks=4) == {"d"}  # room, fewest streams, most free
    assert picks(decode, "colocated", need_blocks=4) == {"d"}
    assert picks(decode, "decode", need_blocks=100) == {"a"}  # nowhere has room: fewest streams


def test_exclude_and_health():
    pool = [instance("a", free=50), instance("b", free=90), instance("c", free=99, healthy=False)]
    assert picks(pool, "decode", exclude={"b"}) == {"a"}
    assert picks(pool, "decode", exclude={"a", "b"}) == {"b"}  # every healthy one failed: reuse
    kv = {"overlap": {"a": 0, "b": 0, "c": 9}, "num_prompt_blocks": 9}
    assert picks(pool, "decode", exclude={"b"}, **kv) == {"a"}
    assert pick([instance("x", healthy=False)], "decode", set(), 0) is None
    assert pick([], "prefill", set(), 0, overlap={}) is None


# -- LocalPrefill -----------------------------------------------------------------------------

# prefill_s / 64 tokens = 1/128 s a token; handoff = transfer 0.25 + (call 1.0 - queue 0.25
# - prefill 0.5) = 0.5 s: break-even at 0.5 * 128 = 64 tokens (exact in binary)
TIMING = EngineTiming(engine_queue_s=0.25, prefill_s=0.5, prefill_call_s=1.0, transfer_s=0.25)


def test_local_prefill_is_off_until_measured_or_when_disabled():
    local = LocalPrefill(max_tokens=2048)
    assert local.threshold(0) == 0 and local.threshold(10_000) == 0  # nothing measured yet
    local.observe(EngineTiming(prefill_s=0.5), 64)  # compute measured, no handoff yet
    assert local.threshold(10_000) == 0
    off = LocalPrefill(max_tokens=0)
    off.observe(TIMING, 64)
    assert off.threshold(0) == 0 and off.threshold(10_000) == 0


def test_local_prefill_threshold_grows_with_what_the_prefill_side_must_do_first():
    local = LocalPrefill(max_tokens=2048)
    local.observe(TIMING, 64)
    assert local.threshold(0) == 64
    assert local.threshold(100) == 164
    assert [local.threshold(q) for q in (0, 10, 500, 1000)] == sorted(
        local.threshold(q) for q in (0, 10, 500, 1000)
    )


def test_local_when_the_first_token_comes_no_later_and_the_suffix_is_within_the_cap():
    local = LocalPrefill(max_tokens=100)
    local.observe(TIMING, 64)  # a handoff costs 64 tokens' worth
    assert local.local(uncached=64, local_queue=0, remote_tokens=0)
    assert not local.local(uncached=65, local_queue=0, remote_tokens=0)
    # the prefill instance lacks the history (500 tokens to recompute): local wins
    assert local.local(uncached=90, local_queue=0, remote_tokens=500)
    # ... unless the decode instance already prefills as much itself
    assert not local.local(uncached=90, local_queue=480, remote_tokens=500)
    # the cap is its headroom: what it prefills at once, however long the remote side takes
    assert not local.local(uncached=101, local_queue=0, remote_tokens=10_000)
    assert not local.local(uncached=60, local_queue=41, remote_tokens=10_000)
    assert local.local(uncached=60, local_queue=40, remote_tokens=10_000)
    off = LocalPrefill(max_tokens=0)
    off.observe(TIMING, 64)
    assert not off.local(uncached=1, local_queue=0, remote_tokens=10_000)


def test_local_prefill_moves_with_new_measurements():
    local = LocalPrefill(max_tokens=4096)
    local.observe(TIMING, 64)
    before = local.threshold(0)
    for _ in range(50):  # handoffs get slower (transfer 2.25 s): local pays off longer
        local.observe(msgspec.structs.replace(TIMING, transfer_s=2.25), 64)
    assert before < local.threshold(0) <= 2.5 * 128
    assert local.describe()["max_tokens"] == 4096
