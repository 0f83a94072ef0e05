"""Lease table: how long a holder (prefill rank) keeps a finished request's KV blocks pinned
for a puller (decode rank) that may never come. Pure Python; the clock is injected.

Each request's blocks are freed exactly once, by whichever comes first:

    complete(request_id)   the puller's READ notification arrived: its data has landed
    expire()               nobody renewed for ttl_s + grace_s: the puller is gone or late

Why no READ ever sees reused blocks, with no clock sync between the two hosts:

    holder clock    renew handled at h ---------- h + ttl ---- h + ttl + grace: expire() frees
                              ^ (later in real time than t0)
    puller clock    t0 -> renew RPC -> returns remaining = ttl
                    view expiry e = t0 + remaining  (<= h + ttl in real time)

1. The puller reads its clock (t0) BEFORE sending renew, so its view of the expiry, e, comes
   no later (in real time) than the holder's own h + ttl: h happens after t0.
2. The puller starts a READ only if e - now > its transfer deadline, and treats a READ that
   it sees finish after e as failed: its copy is discarded, never decoded from.
3. The holder frees only at h + ttl + grace, measured from when IT last renewed, which is
   later than e; grace absorbs the two clocks' rate drift over one ttl (ppm) and scheduling.
So every READ the puller trusts finished while the blocks were still pinned. A READ that
runs late may copy reused blocks, but only into destination blocks the puller has already
written off; those it frees once NIXL has released the READ (agent.release).

A renew after the ttl lapsed returns None (the puller gives up), and a notification arriving
after expiry is ignored: complete() returns None for a request it no longer holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Lease:
    block_ids: list[int]
    ttl_s: float
    expires_at: float  # holder clock; blocks are freed at expires_at + grace_s


class LeaseTable:
    def __init__(self, grace_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.grace_s = grace_s
        self.clock = clock
        self.leases: dict[str, Lease] = {}
        self.num_granted = 0
        self.num_completed = 0
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self.leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.leases

    def grant(self, request_id: str, block_ids: Sequence[int], ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if request_id in self.leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        self.leases[request_id] = Lease(list(block_ids), ttl_s, self.clock() + ttl_s)
        self.num_granted += 1

    def renew(self, request_id: str) -> float | None:
        """Seconds the lease now has left (its ttl), or None if it lapsed or never was."""
        lease = self.leases.get(request_id)
        now = self.clock()
        if lease is None or now >= lease.expires_at:
            return None
        lease.expires_at = now + lease.ttl_s
        return lease.ttl_s

    def complete(self, request_id: str) -> list[int] | None:
        """The pull finished: drop the lease and return the block ids to free, or None when
        the request is unknown (already expired or completed) and there is nothing to free."""
        lease = self.leases.pop(request_id, None)
        if lease is None:
            return None
        self.num_completed += 1
        return lease.block_ids

    def expire(self) -> list[str]:
        """Drop and return every request whose lease ran out more than grace_s ago; the
        caller frees their blocks. A request is returned at most once."""
        now = self.clock()
        expired = [
            rid for rid, lease in self.leases.items() if now >= lease.expires_at + self.grace_s
        ]
        for rid in expired:
            del self.leases[rid]
        self.num_expired += len(expired)
        return expired

    def check_integrity(self) -> None:
        """Every grant ended exactly one way or is still held. (A block id may sit in two
        leases: prefix caching shares blocks between requests, the engine ref-counts them.)"""
        ended = self.num_completed + self.num_expired
        assert self.num_granted == len(self.leases) + ended, "lease counters disagree"
