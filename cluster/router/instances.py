"""What the router knows of each instance, and of each request in flight."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cluster.workers.clients import InstanceClient
from cluster.workers.protocol import InstanceInfo, Load


@dataclass(slots=True)
class Instance:
    """One engine as the router sees it."""

    instance_id: str
    role: str  # prefill | decode | colocated
    client: InstanceClient  # connected: its info is the instance's latest ready()
    healthy: bool = True
    draining: bool = False  # elastic pools: no new requests; removed once idle
    lost_reason: str = ""  # why it was last marked lost (logs, `cluster status`)
    load: Load | None = None
    pending_prompt_tokens: int = 0  # prefill: prompt tokens sent, not yet answered
    num_streams: int = 0  # decode/colocated: streams open through the router
    num_active_blocks: int = 0  # decode/colocated: KV blocks those streams need (as routed)
    num_recent_blocks: int = 0  # KV blocks of requests routed here since the last load poll
    _lost: asyncio.Future | None = None

    @property
    def lost(self) -> asyncio.Future:
        """Done once this instance is marked lost (streams waiting on it give up); a new one
        while it is healthy again."""
        if self._lost is None or (self._lost.done() and self.healthy):
            self._lost = asyncio.get_running_loop().create_future()
        if not self.healthy and not self._lost.done():
            self._lost.set_result(None)
        return self._lost

    @property
    def info(self) -> InstanceInfo:
        return self.client.info

    @property
    def free_blocks(self) -> int:
        return self.info.num_blocks if self.load is None else self.load.num_free_kv_blocks

    @property
    def kv_queue_full(self) -> bool:
        """A decode instance whose handoffs already wait for KV room, as many as it takes."""
        load = self.load
        return load is not None and load.max_kv_waiters > 0 and (
            load.num_kv_waiting >= load.max_kv_waiters)  # fmt: skip


@dataclass(slots=True)
class Live:
    """A request in flight: where it is now, so Abort and cancellation can reach it."""

    request_id: str  # as the client named it (unique within its tenant)
    tenant: str | None = None
    instances: list[tuple[Instance, str]] = field(default_factory=list)  # (where, its id)
    aborted: bool = False
    children: list[Live] = field(default_factory=list)  # n > 1: one per choice
