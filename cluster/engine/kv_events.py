"""KV cache events: what an engine's prefix cache gained and lost, in vLLM's KV-events
vocabulary (BlockStored / BlockRemoved / AllBlocksCleared), for the router's cluster-wide
prefix index (router/prefix_index.py).

A hash is the block manager's chained block hash: h_i names the whole prefix up to block i,
cache salt included (block_manager.py). A router that hashes a prompt the same way learns
which instance holds how much of it, and tenants with different salts never share an entry.
Unlike vLLM's BlockStored, no token ids travel: a chained hash already names its prefix.

    engine thread: block manager records (seq, event) ─▶ KVEventLog (a deque: thread-safe);
                   an event into an empty log calls on_ready (wakes the worker)
    worker loop:   drains it (at most every few ms) ─▶ each subscriber's stream (KVEventBatch)
    a new subscriber first gets a snapshot (AllBlocksCleared + BlockStored of every cached
    block) taken under the engine lock with the log's seq at that moment; it then skips
    the events at or below that seq, so nothing is missed or counted twice.
"""

from __future__ import annotations

import itertools
from collections import deque

import msgspec


class BlockStored(msgspec.Struct, tag=True, frozen=True, array_like=True):
    """Blocks now in the prefix cache (consecutive blocks of one request, parent first)."""

    block_hashes: list[bytes]
    parent_block_hash: bytes | None = None


class BlockRemoved(msgspec.Struct, tag=True, frozen=True, array_like=True):
    """Blocks evicted from the prefix cache (their KV is gone)."""

    block_hashes: list[bytes]


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True, array_like=True):
    """The whole prefix cache is gone (reset, or a snapshot follows)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events since the previous batch of one subscription. `snapshot`: the first batch,
    the whole cache as it was when the subscription began."""

    seq: int  # batches sent on this subscription, from 0
    events: list[KVEvent]
    snapshot: bool = False


class KVEventLog:
    """Events the engine thread appends and one consumer (the worker) drains; each event
    carries a sequence number so a snapshot can say where it stands. `on_ready()` is called
    on the appending thread by an event into an empty log: the consumer is woken only when
    there is something to send, never polls an idle engine."""

    def __init__(self, maxlen: int = 1 << 20, on_ready=None):
        self._events: deque[tuple[int, KVEvent]] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self.last_seq = 0  # the latest event's seq (read under the engine lock)
        self._on_ready = on_ready

    def append(self, event: KVEvent) -> None:
        # An event into an empty log wakes the consumer; one into a non-empty log comes out
        # with the events before it (a drain under way takes it too, or it finds the log
        # empty and wakes the consumer again).
        wake = not self._events and self._on_ready is not None
        self.last_seq = next(self._seq)
        self._events.append((self.last_seq, event))
        if wake:
            self._on_ready()

    def drain(self) -> list[tuple[int, KVEvent]]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out
