"""An instance of an elastic pool: a worker that can change role, prefill <-> decode, in its
own process, keeping its weights, KV pool and prefix cache (the autoscaler's flip,
cluster/elastic/).

    ElasticWorker("prefill-3-ab12cd", {prefill: config, decode: config}, transfer, registry)
        ready(), metrics(), ...     the current role's worker (prefill.py / decode.py)
        become("decode", "decode-7-ab12cd")
            refused unless drained: no request waiting, running, receiving KV or leased
            the old role's data-plane server, NIXL agent and housekeeping stop
            the engine takes the new role's settings (LLMEngine.reconfigure)
            a worker of the new role, a new instance id, agent and address, takes it over

A new instance id for the new role: the router, the KV registry and the metrics see a new
instance, and no decode instance can mistake the new agent for the old one's KV. Ray
restarts a crashed actor with its first arguments, in its first role: the router's client
(cluster/elastic/pools.py) flips it back when it reconnects.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.engine.config import EngineConfig
from cluster.workers.base import EngineWorker, TransferSettings
from cluster.workers.decode import DecodeWorker
from cluster.workers.prefill import PrefillWorker
from cluster.workers.protocol import InstanceInfo

_ROLES = {"prefill": PrefillWorker, "decode": DecodeWorker}


class ElasticWorker:
    def __init__(self, instance_id: str, configs: dict[str, EngineConfig],
                 transfer: TransferSettings, registry) -> None:  # fmt: skip
        role = instance_id.partition("-")[0]
        if role not in _ROLES or set(configs) != set(_ROLES):
            raise ValueError("an elastic instance is a prefill or decode instance of both configs")
        self._configs, self._transfer, self._registry = configs, transfer, registry
        self.worker: EngineWorker = _ROLES[role](instance_id, configs[role], transfer, registry)

    async def become(self, role: str, instance_id: str) -> InstanceInfo:
        """Serve as `instance_id` in `role` from now on (see the module docstring)."""
        old = self.worker
        if old.instance_id == instance_id and old.role == role:
            return await old.ready()
        if role not in _ROLES:
            raise ValueError(f"an elastic instance is prefill or decode, not {role!r}")
        busy = self.busy()
        if busy:
            raise ValueError(f"{old.instance_id} is not drained ({busy}): it cannot change role")
        await old.shutdown()
        self.worker = await asyncio.to_thread(
            _ROLES[role], instance_id, self._configs[role], self._transfer, self._registry,
            llm=old.llm,
        )  # fmt: skip
        return await self.worker.ready()

    def busy(self) -> str:
        """What keeps this instance from changing role now ('' when nothing)."""
        w = self.worker
        if w.rank_followers:
            return "a tensor/pipeline-parallel instance changes role by restarting"
        llm = w.llm
        parts = []
        if llm.has_unfinished():
            parts.append(f"{llm.scheduler.num_unfinished} requests")
        if llm.num_pinned:
            parts.append(f"{llm.num_pinned} leased for a pull")
        if getattr(w, "_handoffs", None):
            parts.append(f"{len(w._handoffs)} handoffs")
        receiver = getattr(w, "receiver", None)
        if receiver is not None and receiver._stuck:
            parts.append("READs not released yet")
        return ", ".join(parts)

    # -- the current role's control surface (workers/base.py) ------------------------------

    async def ready(self) -> InstanceInfo:
        return await self.worker.ready()

    def metrics(self) -> list:
        return self.worker.metrics()

    async def check_integrity(self) -> tuple[int, int]:
        return await self.worker.check_integrity()

    def inject_fault(self, *args: Any, **kwargs: Any) -> None:
        self.worker.inject_fault(*args, **kwargs)

    def fault_hits(self, point: str) -> int:
        return self.worker.fault_hits(point)

    def pid(self) -> int:
        return self.worker.pid()

    async def shutdown(self) -> None:
        await self.worker.shutdown()
