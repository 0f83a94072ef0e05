"""Which instance serves a request: the routing policy (`router: {policy: load|kv}`).

load (the default, and the baseline `cluster bench routing` compares against):
    prefill    the fewest prompt tokens sent and not yet answered (its queue drains first)
    decode /   one with KV room for the request, then the fewest open streams, then the
    colocated  most free blocks

kv (cache-aware, after Dynamo's KV router; `overlap` from router/prefix_index.py), costs in
KV blocks, the lowest wins:
    prefill    overlap_weight x blocks of the prompt it lacks + blocks queued on it
    decode     KV room first; then decode_overlap_weight x blocks it would pull
               + blocks its open streams need (the router's own count: exact at once,
               where a polled figure would lag behind requests routed or finished since)
    colocated  KV room first; then overlap_weight x blocks it lacks + blocks queued on it
               + blocks its open streams need
  The first term is the work a hit saves; the rest is the load the request waits behind.

Ties are broken at random, so equal instances share the load.
"""

from __future__ import annotations

import random

from cluster.router.instances import Instance


def pick(
    pool: list[Instance],
    role: str,
    exclude: set[str],
    need_blocks: int,
    overlap: dict[str, int] | None = None,
    num_prompt_blocks: int = 0,
    weights: tuple[float, float] = (1.0, 1.0),
    block_size: int = 16,
) -> Instance | None:
    """The instance of `pool` to use now, or None when none is healthy (and not draining:
    elastic pools, cluster/elastic/). `exclude`: instances
    that already failed this request (used only when nothing else is healthy). `overlap`
    (kv policy): per instance, the prompt's leading blocks it holds; `num_prompt_blocks`:
    the prompt's full blocks; `weights`: (overlap_weight, decode_overlap_weight)."""
    healthy = [i for i in pool if i.healthy and not i.draining]
    candidates = [i for i in healthy if i.instance_id not in exclude] or healthy
    if not candidates:
        return None
    random.shuffle(candidates)
    if overlap is None:
        if role == "prefill":
            return min(candidates, key=lambda i: i.pending_prompt_tokens)
        return min(
            candidates, key=lambda i: (i.free_blocks < need_blocks, i.num_streams, -i.free_blocks)
        )
    w_compute, w_pull = weights

    def lacks(i: Instance) -> int:
        return num_prompt_blocks - overlap.get(i.instance_id, 0)

    def queued(i: Instance) -> float:
        return i.pending_prompt_tokens / block_size

    def in_use(i: Instance) -> int:
        return i.num_active_blocks

    def no_room(i: Instance) -> bool:
        # Cached blocks count as free until a request takes them back, so a hit does not
        # lower what must be free: need_blocks whole (when another request holds the hit
        # blocks, this is strict by the overlap; the engine decides for good).
        return i.free_blocks - i.num_recent_blocks < need_blocks

    if role == "prefill":
        return min(candidates, key=lambda i: w_compute * lacks(i) + queued(i))
    if role == "decode":
        return min(candidates, key=lambda i: (no_room(i), w_pull * lacks(i) + in_use(i)))
    return min(candidates, key=lambda i: (no_room(i), w_compute * lacks(i) + queued(i) + in_use(i)))
