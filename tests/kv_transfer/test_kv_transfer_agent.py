"""NixlKVAgent between two real Ray actor processes, real NIXL/UCX over DRAM: a decode-side
actor pulls scattered blocks of a prefill-side actor's engine-shaped KV pool, and the bytes
are compared on the driver."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.kv_transfer import KVAgentInfo, KVLayout, LayoutMismatchError  # noqa: E402

pytestmark = pytest.mark.timeout(60)

NUM_BLOCKS = 12
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 16
# Runs 5..7 -> 0..2 merge; the rest is scattered on one side or the other.
REMOTE_BLOCK_IDS = [5, 6, 7, 1, 9, 3, 4]
LOCAL_BLOCK_IDS = [0, 1, 2, 8, 4, 6, 10]
NUM_RUNS = 5


def kv_shape(block_size: int) -> tuple[int, ...]:
    return (NUM_BLOCKS, NUM_KV_HEADS, NUM_LAYERS, 2, block_size, HEAD_DIM)


@ray.remote(num_cpus=0)
class KVRank:
    """One engine rank's KV pools (one per layout under test), each behind a NixlKVAgent."""

    def __init__(self) -> None:
        self.agents = {}
        self.pools = {}

    def open(
        self, name: str, block_size: int, dtype: str, seed: int | None, layerwise: bool = False
    ) -> KVAgentInfo:
        from cluster.kv_transfer.agent import NixlKVAgent

        kv_cache = torch.zeros(kv_shape(block_size), dtype=getattr(torch, dtype))
        if seed is not None:
            kv_cache.copy_(
                torch.randn(kv_shape(block_size), generator=torch.Generator().manual_seed(seed))
            )
        self.pools[name] = kv_cache
        self.agents[name] = NixlKVAgent(name, kv_cache, layerwise=layerwise)
        return self.agents[name].info()

    def open_shard(self, name: str, shard: dict, seed: int | None) -> KVAgentInfo:
        """A rank's pool of a MODEL_LAYERS x MODEL_KV_HEADS model sharded by `shard`
        (tp_rank, tp_size, pp_rank, pp_size), filled with its slice of full_kv(seed)."""
        from cluster.engine.parallel import kv_head_range, layer_range
        from cluster.kv_transfer.agent import NixlKVAgent

        l0, l1 = layer_range(shard["pp_rank"], shard["pp_size"], MODEL_LAYERS)
        h0, h1 = kv_head_range(shard["tp_rank"], shard["tp_size"], MODEL_KV_HEADS)
        kv_cache = torch.zeros(NUM_BLOCKS, h1 - h0, l1 - l0, 2, 8, HEAD_DIM)
        if seed is not None:
            kv_cache.copy_(full_kv(seed)[:, h0:h1, l0:l1])
        self.pools[name] = kv_cache
        self.agents[name] = NixlKVAgent(
            name, kv_cache, **shard, model_layers=MODEL_LAYERS, model_kv_heads=MODEL_KV_HEADS
        )
        return self.agents[name].info()

    def pull_resharded(self, name: str, infos: list, remote_ids, local_ids):
        """Plan (reshard.plan_reads), post one READ per overlapping source, wait for all;
        [(source agent, descriptors, state)]."""
        from cluster.kv_transfer.reshard import plan_reads

        agent = self.agents[name]
        reads = []
        for i, pieces in plan_reads(agent.layout, [info.layout for info in infos]).items():
            agent.add_remote(infos[i])
            reads.append(agent.read_pieces(infos[i].agent_name, pieces, remote_ids, local_ids))
        for handle in reads:
            while agent.poll(handle) == "PROC":
                pass
            agent.release(handle)
        return [(h.remote_name, h.num_descs, h.state) for h in reads]

    def close(self, name: str) -> None:
        self.agents.pop(name).close()
        del self.pools[name]

    def compat_hash(self, name: str) -> str:
        return self.agents[name].layout.compat_hash

    def add_remote(self, name: str, info: KVAgentInfo) -> str:
        return self.agents[name].add_remote(info)

    def pull(self, name: str, remote_name: str, remote_ids, local_ids, notif: bytes):
        """Read and wait; return (final state, descriptors used)."""
        agent = self.agents[name]
        handle = agent.read_blocks(remote_name, remote_ids, local_ids, notif)
        while agent.poll(handle) == "PROC":
            pass
        agent.release(handle)
        return handle.state, handle.num_descs

    def pull_layers(self, name: str, remote_name: str, remote_ids, local_ids, layers):
        agent = self.agents[name]
        handle = agent.read_layers(remote_name, remote_ids, local_ids, layers, b"")
        while agent.poll(handle) == "PROC":
            pass
        agent.release(handle)
        return handle.state, handle.num_bytes

    def notify(self, name: str, remote_name: str, message: bytes) -> None:
        self.agents[name].send_notification(remote_name, message)

    def blocks(self, name: str) -> torch.Tensor:
        return self.pools[name].clone()

    def wait_notifications(self, name: str, timeout_s: float = 5.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            notifs = self.agents[name].get_notifications()
            if notifs:
                return notifs
            time.sleep(0.001)
        return []


MODEL_LAYERS, MODEL_KV_HEADS = 4, 4


def full_kv(seed: int) -> torch.Tensor:
    """The whole model's KV pool (all heads, all layers, block size 8) a sharded pool slices."""
    shape = (NUM_BLOCKS, MODEL_KV_HEADS, MODEL_LAYERS, 2, 8, HEAD_DIM)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ranks(ray_cluster):
    return KVRank.remote(), KVRank.remote()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_pull_scattered_blocks_is_byte_exact(ranks, dtype, block_size):
    prefill, decode = ranks
    src_name, dst_name = f"prefill-{dtype}-{block_size}", f"decode-{dtype}-{block_size}"
    src_info = ray.get(prefill.open.remote(src_name, block_size, dtype, seed=block_size))
    ray.get(decode.open.remote(dst_name, block_size, dtype, seed=None))
    assert ray.get(decode.add_remote.remote(dst_name, src_info)) == src_name
    state, num_descs = ray.get(
        decode.pull.remote(dst_name, src_name, REMOTE_BLOCK_IDS, LOCAL_BLOCK_IDS, b"req-7")
    )
    assert (state, num_descs) == ("DONE", NUM_RUNS)
    src, dst = ray.get([prefill.blocks.remote(src_name), decode.blocks.remote(dst_name)])
    assert torch.equal(as_bytes(dst[LOCAL_BLOCK_IDS]), as_bytes(src[REMOTE_BLOCK_IDS]))
    untouched = sorted(set(range(NUM_BLOCKS)) - set(LOCAL_BLOCK_IDS))
    assert not dst[untouched].any(), "a pull wrote outside its destination blocks"
    assert ray.get(prefill.wait_notifications.remote(src_name)) == [(dst_name, b"req-7")]
    ray.get([prefill.close.remote(src_name), decode.close.remote(dst_name)])


def test_compat_hash_is_stable_across_processes(ranks):
    prefill, _ = ranks
    ray.get(prefill.open.remote("hash-check", 16, "bfloat16", seed=None))
    here = KVLayout.from_tensor(torch.empty(kv_shape(16), dtype=torch.bfloat16))
    assert ray.get(prefill.compat_hash.remote("hash-check")) == here.compat_hash
    ray.get(prefill.close.remote("hash-check"))


@pytest.mark.parametrize(
    ("remote_block_size", "remote_dtype", "field"),
    [(16, "float32", "dtype"), (32, "bfloat16", "block_size")],
)
def test_mismatched_layout_refuses_naming_the_field(ranks, remote_block_size, remote_dtype, field):
    prefill, decode = ranks
    src_info = ray.get(prefill.open.remote("mismatch-src", remote_block_size, remote_dtype, None))
    ray.get(decode.open.remote("mismatch-dst", 16, "bfloat16", None))
    with pytest.raises(LayoutMismatchError, match=rf"{field}: local=.* remote="):
        ray.get(decode.add_remote.remote("mismatch-dst", src_info))
    ray.get([prefill.close.remote("mismatch-src"), decode.close.remote("mismatch-dst")])


def test_re_add_after_remote_restart(ranks):
    """The holder process dies and comes back under the same agent name with a new pool; the
    puller sees new metadata, drops the old remote and reads the new pool's bytes."""
    _, decode = ranks
    ray.get(decode.open.remote("restart-dst", 8, "float32", None))
    infos, pools = [], []
    for seed in (1, 2):
        holder = KVRank.remote()
        infos.append(ray.get(holder.open.remote("restart-src", 8, "float32", seed)))
        ray.get(decode.add_remote.remote("restart-dst", infos[-1]))
        state, _ = ray.get(decode.pull.remote("restart-dst", "restart-src", [3], [0], b"r"))
        assert state == "DONE"
        pools.append(ray.get(holder.blocks.remote("restart-src")))
        assert torch.equal(ray.get(decode.blocks.remote("restart-dst"))[0], pools[-1][3])
        ray.kill(holder)
    assert infos[0].metadata != infos[1].metadata
    assert not torch.equal(pools[0][3], pools[1][3])
    ray.get(decode.close.remote("restart-dst"))


def test_bad_pulls_refuse_before_touching_nixl(ranks):
    prefill, decode = ranks
    src_info = ray.get(prefill.open.remote("bad-src", 8, "float32", None))
    ray.get(decode.open.remote("bad-dst", 8, "float32", None))
    with pytest.raises(KeyError, match="unknown remote KV agent 'bad-src'"):
        ray.get(decode.pull.remote("bad-dst", "bad-src", [1], [1], b""))
    ray.get(decode.add_remote.remote("bad-dst", src_info))
    with pytest.raises(ValueError, match=r"remote block ids \[12\] outside \[0, 12\)"):
        ray.get(decode.pull.remote("bad-dst", "bad-src", [12], [1], b""))
    with pytest.raises(ValueError, match="local block ids repeat"):
        ray.get(decode.pull.remote("bad-dst", "bad-src", [1, 2], [3, 3], b""))
    ray.get([prefill.close.remote("bad-src"), decode.close.remote("bad-dst")])


def test_layerwise_pull_moves_only_the_asked_layers(ranks):
    """Layer-wise streaming: each layer of scattered blocks arrives on its own READ, exact,
    and nothing else is written; the holder can announce a ready layer to the puller."""
    prefill, decode = ranks
    src_info = ray.get(prefill.open.remote("prefill-lw", 16, "float32", seed=3, layerwise=True))
    dst_info = ray.get(decode.open.remote("decode-lw", 16, "float32", seed=None, layerwise=True))
    ray.get(decode.add_remote.remote("decode-lw", src_info))
    ray.get(prefill.add_remote.remote("prefill-lw", dst_info))  # for the readiness messages
    ray.get(prefill.notify.remote("prefill-lw", "decode-lw", b"layer 1 ready"))
    assert ray.get(decode.wait_notifications.remote("decode-lw")) == [
        ("prefill-lw", b"layer 1 ready")
    ]
    state, num_bytes = ray.get(
        decode.pull_layers.remote("decode-lw", "prefill-lw", REMOTE_BLOCK_IDS, LOCAL_BLOCK_IDS, [1])
    )
    assert (
        state == "DONE" and num_bytes == len(LOCAL_BLOCK_IDS) * 2 * 16 * NUM_KV_HEADS * HEAD_DIM * 4
    )
    src, dst = ray.get([prefill.blocks.remote("prefill-lw"), decode.blocks.remote("decode-lw")])
    assert torch.equal(dst[LOCAL_BLOCK_IDS, :, 1], src[REMOTE_BLOCK_IDS, :, 1])
    assert not dst[:, :, 0].any(), "layer 0 was not asked for"
    ray.get(
        decode.pull_layers.remote("decode-lw", "prefill-lw", REMOTE_BLOCK_IDS, LOCAL_BLOCK_IDS, [0])
    )
    dst = ray.get(decode.blocks.remote("decode-lw"))
    assert torch.equal(as_bytes(dst[LOCAL_BLOCK_IDS]), as_bytes(src[REMOTE_BLOCK_IDS]))
    with pytest.raises(ray.exceptions.RayTaskError, match="non-empty subset"):
        ray.get(decode.pull_layers.remote("decode-lw", "prefill-lw", [1], [1], [NUM_LAYERS]))
    ray.get([prefill.close.remote("prefill-lw"), decode.close.remote("decode-lw")])


def _shards(tp: int, pp: int) -> list[dict]:
    return [
        {"tp_rank": r % tp, "tp_size": tp, "pp_rank": r // tp, "pp_size": pp}
        for r in range(tp * pp)
    ]


@pytest.mark.parametrize(
    ("src_tp", "src_pp", "dst_tp", "dst_pp", "reads_per_rank"),
    [
        (2, 1, 1, 1, [2]),  # each source rank's heads, whole layers
        (1, 1, 2, 1, [1, 1]),  # each decode rank its half of the heads
        (1, 2, 2, 1, [2, 2]),  # two stages' layers, half the heads each
        (2, 2, 4, 1, [2, 2, 2, 2]),
        (4, 1, 1, 2, [4, 4]),
        (2, 1, 8, 1, [1] * 8),  # 4 heads over 8 ranks: replicated on the decode side
    ],
)
def test_resharded_pull_moves_exactly_each_ranks_heads_and_layers(
    ranks, src_tp, src_pp, dst_tp, dst_pp, reads_per_rank
):
    """Every decode rank reads its heads and layers straight from the prefill ranks that
    hold them (one READ per overlapping pair), scattered blocks, byte-exact against the
    model-wide KV; nothing outside the destination blocks is written."""
    from cluster.engine.parallel import kv_head_range, layer_range

    prefill, decode = ranks
    tag = f"{src_tp}{src_pp}{dst_tp}{dst_pp}"
    infos = [
        ray.get(prefill.open_shard.remote(f"rs-src{tag}-{i}", shard, seed=7))
        for i, shard in enumerate(_shards(src_tp, src_pp))
    ]
    expected = full_kv(7)
    for i, shard in enumerate(_shards(dst_tp, dst_pp)):
        name = f"rs-dst{tag}-{i}"
        ray.get(decode.open_shard.remote(name, shard, seed=None))
        reads = ray.get(
            decode.pull_resharded.remote(name, infos, REMOTE_BLOCK_IDS, LOCAL_BLOCK_IDS)
        )
        assert [state for *_, state in reads] == ["DONE"] * len(reads)
        assert len(reads) == reads_per_rank[i]
        pool = ray.get(decode.blocks.remote(name))
        l0, l1 = layer_range(shard["pp_rank"], dst_pp, MODEL_LAYERS)
        h0, h1 = kv_head_range(shard["tp_rank"], dst_tp, MODEL_KV_HEADS)
        want = expected[REMOTE_BLOCK_IDS][:, h0:h1, l0:l1]
        assert torch.equal(pool[LOCAL_BLOCK_IDS], want), f"decode rank {i}"
        untouched = sorted(set(range(NUM_BLOCKS)) - set(LOCAL_BLOCK_IDS))
        assert not pool[untouched].any()
        ray.get(decode.close.remote(name))
    # Re-sharded READs carry no notification: the puller sends one when all have landed.
    assert ray.get(prefill.wait_notifications.remote(infos[0].agent_name, 0.2)) == []
    ray.get([prefill.close.remote(info.agent_name) for info in infos])


def test_whole_block_pull_refuses_other_shards(ranks):
    prefill, decode = ranks
    info = ray.get(prefill.open_shard.remote("shard-src", _shards(2, 1)[0], seed=1))
    ray.get(decode.open_shard.remote("shard-dst", _shards(1, 1)[0], seed=None))
    ray.get(decode.add_remote.remote("shard-dst", info))
    with pytest.raises(ValueError, match="read_pieces"):
        ray.get(decode.pull.remote("shard-dst", "shard-src", [1], [1], b""))
    ray.get([prefill.close.remote("shard-src"), decode.close.remote("shard-dst")])
