"""Which instance serves a request: the pairing policy.

prefill: the fewest prompt tokens sent and not yet answered (its queue drains first).
decode / colocated: one with KV room for the request, then the fewest open streams, then the
most free blocks. Ties are broken at random, so equal instances share the load.
"""

from __future__ import annotations

import random

from cluster.router.instances import Instance


def pick(pool: list[Instance], role: str, exclude: set[str], need_blocks: int) -> Instance | None:
    """The instance of `pool` to use now, or None when none is healthy. `exclude`: instances
    that already failed this request (used only when nothing else is healthy)."""
    healthy = [i for i in pool if i.healthy]
    candidates = [i for i in healthy if i.instance_id not in exclude] or healthy
    if not candidates:
        return None
    random.shuffle(candidates)
    if role == "prefill":
        return min(candidates, key=lambda i: i.pending_prompt_tokens)
    return min(
        candidates, key=lambda i: (i.free_blocks < need_blocks, i.num_streams, -i.free_blocks)
    )
