"""The router's handle on one instance: two planes.

- control (`call`): the worker's own methods, on a Ray actor (RayClient) or on a worker object
  in this process (LocalClient): ready, metrics, check_integrity, inject_fault, shutdown.
- data (`request`, `stream`): protocol.py messages over one Peer to the worker's Server.

Both raise the worker's own exceptions, and `InstanceLost` when the instance is gone: its
actor died, its connection broke, or it did not answer in time. A lost instance's next
`connect()` asks the control plane for its (restarted) address and connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import ray

from cluster.workers.dataplane import Peer, PeerLost
from cluster.workers.protocol import InstanceInfo

# The instance died or stopped answering (its actor, or its data-plane connection): its
# requests must be recovered elsewhere. One class for both, so that a stream raises it
# straight from the Peer, with no wrapper on the token path.
InstanceLost = PeerLost


class InstanceClient:
    def __init__(self) -> None:
        self.info: InstanceInfo | None = None
        self.peer: Peer | None = None
        self.on_lost = None  # called with the error when the data-plane connection breaks
        # An elastic instance that changed role: (role, instance id) it must be. Ray restarts
        # a crashed one in its first role; connect() flips it back (workers/elastic.py).
        self.becomes: tuple[str, str] | None = None

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        raise NotImplementedError

    async def connect(self, timeout: float | None = None) -> InstanceInfo:
        """(Re)learn the instance's facts from the control plane and open a data-plane
        connection to it."""
        info = await self.call("ready", timeout=timeout)
        if self.becomes is not None and info.instance_id != self.becomes[1]:
            info = await self.call("become", *self.becomes, timeout=timeout)
        if self.peer is None or self.peer.lost is not None or self.peer.address != info.address:
            if self.peer is not None:
                self.peer.close()
            self.peer = Peer(info.address, on_lost=self._lost)
        self.info = info
        return info

    def _lost(self, error: PeerLost) -> None:
        if self.on_lost is not None:
            self.on_lost(error)

    @property
    def connected(self) -> bool:
        return self.peer is not None and self.peer.lost is None

    async def request(self, msg, reply_type: Any = Any, timeout: float | None = None) -> Any:
        """One data-plane message, its reply."""
        if self.peer is None:
            raise InstanceLost("not connected")
        try:
            return await self.peer.call(msg, reply_type, timeout)
        except TimeoutError as e:
            raise InstanceLost(f"{type(msg).__name__} not answered within {timeout} s") from e

    def stream(self, msg, item_type: Any = Any) -> AsyncIterator[Any]:
        """A data-plane stream; closing it early cancels it on the instance."""
        if self.peer is None:
            return _failed(InstanceLost("not connected"))
        return self.peer.stream(msg, item_type)  # (a lost peer's stream fails when read)

    def disconnect(self, error: BaseException) -> None:
        """The router gave up on the instance: whatever waits on it fails now; the next
        connect() makes a new connection."""
        if self.peer is not None and self.peer.lost is None:
            self.peer.close(InstanceLost(f"{self.peer.address} marked lost: {error}"))

    def close(self) -> None:
        self.on_lost = None  # (closing is not losing)
        if self.peer is not None:
            self.peer.close()


class LocalClient(InstanceClient):
    """A worker in this process (tests, `Router.create_local`)."""

    def __init__(self, worker: Any):
        super().__init__()
        self.worker = worker

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        result = getattr(self.worker, method)(*args)
        if asyncio.iscoroutine(result):
            result = await asyncio.wait_for(result, timeout)
        return result

    async def kill(self) -> None:
        self.close()
        await self.worker.shutdown()


class RayClient(InstanceClient):
    """A worker running as a Ray actor."""

    def __init__(self, actor: Any):
        super().__init__()
        self._ray = ray
        self.actor = actor
        self._actor_gone = (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.WorkerCrashedError,
        )

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        try:
            return await asyncio.wait_for(ref, timeout)
        except self._actor_gone as e:
            raise InstanceLost(str(e)) from e
        except TimeoutError as e:
            self._ray.cancel(ref)
            raise InstanceLost(f"{method} did not answer within {timeout} s") from e
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref)
            raise


async def _failed(error: BaseException) -> AsyncIterator[Any]:
    """A stream that fails when first read (as a broken connection's would)."""
    raise error
    yield  # (an async generator)
