"""How the router calls an instance: the same worker methods either on a Ray actor or on a
worker object in this process. Both raise the worker's own exceptions (Ray re-raises them as
subclasses of the original) and `InstanceLost` when the instance is gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


class InstanceLost(RuntimeError):
    """The instance died or stopped answering; its requests must be recovered elsewhere."""


class LocalClient:
    """A worker in this process (tests, `Router.create_local`)."""

    def __init__(self, worker: Any):
        self.worker = worker

    @property
    def handle(self) -> Any:
        """What other workers receive to call this one (the worker itself here)."""
        return self.worker

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        result = getattr(self.worker, method)(*args)
        if asyncio.iscoroutine(result):
            result = await asyncio.wait_for(result, timeout)
        return result

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        gen = getattr(self.worker, method)(*args)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()

    async def kill(self) -> None:
        await self.worker.shutdown()


class RayClient:
    """A worker running as a Ray actor."""

    def __init__(self, actor: Any):
        import ray

        self._ray = ray
        self.actor = actor
        self._lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.WorkerCrashedError,
        )

    @property
    def handle(self) -> Any:
        return self.actor

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        try:
            return await asyncio.wait_for(ref, timeout)
        except self._lost as e:
            raise InstanceLost(str(e)) from e
        except TimeoutError as e:
            self._ray.cancel(ref)
            raise InstanceLost(f"{method} did not answer within {timeout} s") from e
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref)
            raise

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        gen = getattr(self.actor, method).options(num_returns="streaming").remote(*args)
        done = False
        try:
            async for ref in gen:
                yield await ref
            done = True
        except self._lost as e:
            done = True
            raise InstanceLost(str(e)) from e
        finally:
            if not done:  # the consumer stopped early: cancel the actor's generator task
                with contextlib.suppress(Exception):  # already gone, or Ray shutting down
                    self._ray.cancel(gen)
