"""KV re-sharding: what a rank of one instance reads from the ranks of another whose tensor or
pipeline layout differs (prefill TP=2 -> decode TP=1, prefill PP=2 -> decode TP=2, ...).

A decode rank owns some layers and some KV heads (layout.py); each prefill rank holds some
too. For every prefill rank whose layers and heads overlap ours, the overlap is one READ:

    decode TP=1 (heads 0-1, layers 0-3)      prefill TP=2
        heads 0, layers 0-3   <── READ ──    rank 0 (head 0)
        heads 1, layers 0-3   <── READ ──    rank 1 (head 1)

    decode TP=2 rank 1 (head 1, layers 0-3)  prefill PP=2
        head 1, layers 0-1    <── READ ──    stage 0 (heads 0-1, layers 0-1)
        head 1, layers 2-3    <── READ ──    stage 1 (heads 0-1, layers 2-3)

When several prefill ranks hold the same head (KV heads replicated because kv heads < TP),
decode ranks spread over the copies. Nothing goes through a single process: every decode
rank posts its own READs, and the bytes move holder -> owner once.

With the head-major block layout (layout.py), layers [l0, l1) of one head of a block are one
contiguous range on both sides: a piece is one descriptor per block and head, and runs
contiguous on both sides merge (all of both pools' layers: a whole head range of the block,
one descriptor; consecutive blocks: one run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cluster.kv_transfer.layout import KVLayout


@dataclass(frozen=True, slots=True)
class Piece:
    """Layers [layers) and KV heads [heads) (model-wide indices) that one source holds and the
    destination owns."""

    source: int  # index into the sources passed to plan_reads
    layers: tuple[int, int]
    heads: tuple[int, int]


def plan_reads(dst: KVLayout, sources: Sequence[KVLayout]) -> dict[int, list[Piece]]:
    """source index -> the pieces `dst` reads from it; every (layer, head) `dst` owns comes
    from exactly one source. Raises ValueError when the sources do not cover it."""
    for src in sources:
        dst.check_compatible(src)
    plan: dict[int, list[Piece]] = {}
    dl0, dl1 = dst.layer_range
    stages = sorted({src.layer_range for src in sources})
    covered = 0
    for sl0, sl1 in stages:
        l0, l1 = max(dl0, sl0), min(dl1, sl1)
        if l0 >= l1:
            continue
        covered += l1 - l0
        holders = [i for i, s in enumerate(sources) if s.layer_range == (sl0, sl1)]
        run: Piece | None = None
        for head in range(*dst.head_range):
            have = [i for i in holders if _holds(sources[i].head_range, head)]
            if not have:
                raise ValueError(f"no source holds KV head {head} of layers [{l0}, {l1})")
            pick = have[dst.tp_rank % len(have)]  # spread over replicated copies
            if run is not None and run.source == pick and run.heads[1] == head:
                run = Piece(pick, (l0, l1), (run.heads[0], head + 1))
                continue
            if run is not None:
                plan.setdefault(run.source, []).append(run)
            run = Piece(pick, (l0, l1), (head, head + 1))
        if run is not None:
            plan.setdefault(run.source, []).append(run)
    if covered != dl1 - dl0:
        raise ValueError(f"the sources do not hold every layer of [{dl0}, {dl1})")
    return plan


def _holds(head_range: tuple[int, int], head: int) -> bool:
    return head_range[0] <= head < head_range[1]


def piece_descs(
    pieces: Sequence[Piece],
    src: KVLayout,
    dst: KVLayout,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source offsets, destination offsets, lengths) in bytes from each pool's base, one
    row per contiguous range, runs contiguous on both sides merged."""
    src_ids = np.asarray(src_block_ids, dtype=np.int64)
    dst_ids = np.asarray(dst_block_ids, dtype=np.int64)
    layer = 2 * src.tile_bytes  # one layer's K and V of one head: equal on both sides
    parts = []
    for p in pieces:
        heads = np.arange(*p.heads, dtype=np.int64)
        so = (
            src_ids[:, None] * src.block_bytes
            + (heads - src.head_range[0])[None, :] * src.head_stride
            + (p.layers[0] - src.layer_range[0]) * layer
        )
        do = (
            dst_ids[:, None] * dst.block_bytes
            + (heads - dst.head_range[0])[None, :] * dst.head_stride
            + (p.layers[0] - dst.layer_range[0]) * layer
        )
        length = (p.layers[1] - p.layers[0]) * layer
        parts.append((so.ravel(), do.ravel(), np.full(so.size, length, dtype=np.int64)))
    so = np.concatenate([p[0] for p in parts])
    do = np.concatenate([p[1] for p in parts])
    ln = np.concatenate([p[2] for p in parts])
    return merge_runs(so, do, ln)


def merge_runs(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray):
    """Merge consecutive rows whose ranges continue each other on both sides."""
    if len(src) == 0:
        return src, dst, lengths
    joins = (src[1:] == src[:-1] + lengths[:-1]) & (dst[1:] == dst[:-1] + lengths[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    return src[starts], dst[starts], np.add.reduceat(lengths, starts)
