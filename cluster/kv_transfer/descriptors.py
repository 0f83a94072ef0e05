"""Block descriptors: turn one pull (remote block ids -> local block ids) into the fewest NIXL
transfer descriptors, (address, length, device id) rows.

A block is one contiguous byte range of its pool (see layout.py), so blocks that are
consecutive on BOTH sides form one contiguous range on each side and move as one descriptor:

    remote ids  [7, 8, 9, 2, 3]        runs  7..9 -> 0..2   (3 blocks)
    local ids   [0, 1, 2, 5, 9]              2    -> 5      (1 block)
                                             3    -> 9      (1 block; local not consecutive)

Every descriptor costs a fixed amount in NIXL and UCX (a work request, a completion), and the
block allocator hands out long runs more often than not, so merging cuts that cost to the
number of runs. The agent prepares one descriptor per block per side once and lets NIXL do
the merging; `count_runs` says how many descriptors a pull became.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def count_runs(src_block_ids: np.ndarray, dst_block_ids: np.ndarray) -> int:
    """How many descriptors a pull takes once runs consecutive on both sides are merged (what
    NIXL does with prepared lists)."""
    if len(src_block_ids) == 0:
        return 0
    breaks = (np.diff(src_block_ids) != 1) | (np.diff(dst_block_ids) != 1)
    return 1 + int(np.count_nonzero(breaks))


def run_descs(
    base_addr: int,
    block_bytes: int,
    device_id: int,
    first_block_ids: Sequence[int],
    num_blocks: Sequence[int],
) -> np.ndarray:
    """An Nx3 uint64 array of (address, length, device id), one row per run, as NIXL's
    get_xfer_descs takes it."""
    firsts = np.asarray(first_block_ids, dtype=np.uint64)
    lengths = np.asarray(num_blocks, dtype=np.uint64)
    descs = np.empty((len(firsts), 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base_addr) + firsts * np.uint64(block_bytes)
    descs[:, 1] = lengths * np.uint64(block_bytes)
    descs[:, 2] = device_id
    return descs


def check_block_ids(block_ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Every id must name a block of a pool of num_blocks blocks; a stray id would read or
    write some other request's KV, which NIXL would happily do inside the registered range."""
    bad = [i for i in block_ids if not 0 <= i < num_blocks]
    if bad:
        raise ValueError(f"{side} block ids {bad[:8]} outside [0, {num_blocks})")
