"""KVLayout (sizes, compatibility rule, hash) and block-run merging: pure, no NIXL."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cluster.kv_transfer import KVAgentInfo, KVLayout, LayoutMismatchError
from cluster.kv_transfer.descriptors import count_runs, run_descs

SHAPE = (10, 4, 3, 2, 16, 8)  # blocks, kv heads, layers, K/V, block_size, head_dim


def layout(**changes) -> KVLayout:
    fields = dict(
        num_layers=3, num_kv_heads=4, head_dim=8, block_size=16, dtype="bfloat16",
        device_type="cpu",
    )  # fmt: skip
    return KVLayout(**(fields | changes))


def test_from_tensor_and_sizes():
    kv_cache = torch.empty(SHAPE, dtype=torch.bfloat16)
    assert KVLayout.from_tensor(kv_cache) == layout()
    assert layout().layer_bytes == 2 * 16 * 4 * 8 * 2
    assert layout().block_bytes == kv_cache[0].numel() * kv_cache.element_size()


def test_from_tensor_refuses_other_shapes():
    with pytest.raises(ValueError, match="num_layers, 2"):
        KVLayout.from_tensor(torch.empty(10, 3, 16, 4, 8))
    with pytest.raises(ValueError, match="contiguous"):
        KVLayout.from_tensor(torch.empty(SHAPE).transpose(4, 5))


@pytest.mark.parametrize(
    "bad",
    [{"block_size": 0}, {"dtype": "fp32"}, {"device_type": "tpu"}, {"tp_rank": 1},
     {"memory_layout": "layer_major"}],
)  # fmt: skip
def test_validation(bad):
    with pytest.raises(ValueError):
        layout(**bad)


def test_check_compatible_names_every_differing_field():
    local = layout()
    local.check_compatible(layout(device_type="cuda"))  # UCX moves DRAM <-> VRAM
    with pytest.raises(LayoutMismatchError) as err:
        local.check_compatible(layout(dtype="float32", block_size=32))
    assert "dtype: local='bfloat16' remote='float32'" in str(err.value)
    assert "block_size: local=16 remote=32" in str(err.value)
    # Other TP/PP shards of the same model are compatible (re-sharded), not the same shard.
    half = layout(num_kv_heads=2, tp_size=2, tp_rank=1)
    local.check_compatible(half)
    assert not local.same_shard(half) and half.same_shard(layout(num_kv_heads=2, tp_size=2,
                                                                 tp_rank=1))  # fmt: skip
    with pytest.raises(LayoutMismatchError, match="model_layers: local=3 remote=6"):
        local.check_compatible(layout(pp_size=2))


def test_compat_hash():
    assert layout().compat_hash == layout(device_type="cuda").compat_hash
    assert layout(num_kv_heads=2, tp_size=2).compat_hash == layout().compat_hash
    assert layout(num_layers=1, pp_size=3, pp_rank=2).compat_hash == layout().compat_hash
    for change in ({"dtype": "float32"}, {"block_size": 8}, {"num_kv_heads": 8}, {"head_dim": 16}):
        assert layout(**change).compat_hash != layout().compat_hash


def test_shard_ranges_and_validation():
    with pytest.raises(ValueError, match="hold 3 layers"):  # 5 layers: stages of 2 and 3
        layout(num_layers=2, pp_size=2, pp_rank=1, model_layers=5)
    assert layout(num_layers=3, pp_size=2, pp_rank=1, model_layers=5).layer_range == (2, 5)
    replicated = layout(num_kv_heads=1, tp_size=8, tp_rank=5, model_kv_heads=4)
    assert replicated.head_range == (2, 3)


def test_plan_reads_pairs_each_owner_with_the_holders():
    from cluster.kv_transfer.reshard import Piece, merge_runs, plan_reads

    def shard(tp, tr, pp=1, pr=0):
        heads = max(4 // tp, 1)
        return layout(num_layers=4 // pp, num_kv_heads=heads, tp_size=tp, tp_rank=tr,
                      pp_size=pp, pp_rank=pr, model_layers=4, model_kv_heads=4)  # fmt: skip

    tp2 = [shard(2, 0), shard(2, 1)]
    assert plan_reads(shard(1, 0), tp2) == {
        0: [Piece(0, (0, 4), (0, 2))],
        1: [Piece(1, (0, 4), (2, 4))],
    }
    pp2 = [shard(1, 0, 2, 0), shard(1, 0, 2, 1)]
    assert plan_reads(shard(2, 1), pp2) == {
        0: [Piece(0, (0, 2), (2, 4))],
        1: [Piece(1, (2, 4), (2, 4))],
    }
    # Heads replicated over 8 source ranks: the 8 decode ranks spread over the copies.
    tp8 = [shard(8, r) for r in range(8)]
    picks = [next(iter(plan_reads(shard(8, r), tp8))) for r in range(8)]
    assert picks == list(range(8))
    with pytest.raises(ValueError, match="do not hold every layer"):
        plan_reads(shard(1, 0), [pp2[0]])
    with pytest.raises(LayoutMismatchError):
        plan_reads(shard(1, 0), [layout(dtype="float32")])
    src, dst, n = merge_runs(np.array([0, 8, 32]), np.array([100, 108, 116]), np.array([8, 8, 8]))
    assert src.tolist() == [0, 32] and dst.tolist() == [100, 116] and n.tolist() == [16, 8]


def test_agent_info_pickles():
    info = KVAgentInfo("prefill-0", b"md", 0x1000, 10, layout())
    assert pickle.loads(pickle.dumps(info)) == info
    assert info.mem_type == "DRAM"


@pytest.mark.parametrize(
    ("src", "dst", "num_runs"),
    [
        ([3], [0], 1),
        ([5, 6, 7, 1, 9], [0, 1, 2, 8, 4], 3),  # 5..7 -> 0..2, 1 -> 8, 9 -> 4
        ([1, 2, 3], [4, 6, 7], 2),  # dst breaks the run
        ([3, 2, 1], [0, 1, 2], 3),  # descending ids never merge
        ([], [], 0),
    ],
)
def test_count_runs(src, dst, num_runs):
    assert count_runs(np.asarray(src, np.int32), np.asarray(dst, np.int32)) == num_runs


def test_run_descs_rows():
    descs = run_descs(0x1000, 256, 0, [0, 5], [3, 1])
    assert descs.tolist() == [[0x1000, 768, 0], [0x1000 + 5 * 256, 256, 0]]
