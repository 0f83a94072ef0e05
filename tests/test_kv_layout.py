"""KVLayout (sizes, compatibility rule, hash) and block-run merging: pure, no NIXL."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cluster.kv_transfer import KVAgentInfo, KVLayout, LayoutMismatchError
from cluster.kv_transfer.descriptors import count_runs, run_descs

SHAPE = (10, 3, 2, 16, 4, 8)  # blocks, layers, K/V, block_size, kv heads, head_dim


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
        KVLayout.from_tensor(torch.empty(SHAPE).transpose(3, 4))


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
    with pytest.raises(LayoutMismatchError, match="tp_rank: local=0 remote=1"):
        layout(tp_size=2).check_compatible(layout(tp_size=2, tp_rank=1))


def test_compat_hash():
    assert layout().compat_hash == layout(device_type="cuda").compat_hash
    assert layout(tp_size=2).compat_hash == layout(tp_size=2, tp_rank=1).compat_hash
    for change in ({"dtype": "float32"}, {"block_size": 8}, {"tp_size": 2}, {"head_dim": 16}):
        assert layout(**change).compat_hash != layout().compat_hash


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
