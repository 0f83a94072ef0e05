"""The autoscaler's hands: start an instance, drain and stop one, flip one's role, on the
router's pools through launch.py's launcher (Ray actors, or objects in this process).

    add(role, hardware)      start (on that device type) ─ connect ─ the router routes to it
    remove(role, hardware)   the least busy one (of that type, if any): drain ─ stop
    flip(role, hardware)     one of the other role (of that type, if any): drain ─
                             become(role) ─ connect ─ routed again (its type stays)

Draining: the router routes nothing new to the instance; it is drained once no request in
flight needs it, by the router's count (streams open, prompt tokens sent) and by its own
load (nothing waiting or running, no KV leased to a puller that has not pulled, no handoff
waiting for room). So a prefill instance is released only after every lease it
granted was pulled or expired. Past drain_timeout_s, the requests still on it move: it is
marked lost, and each request's failure policy (retry by default) runs it elsewhere.

The last serving instance of a role is never drained (ValueError). Device-seconds held are
counted from an instance's start to its stop, draining and starting included, per device type
(mixed pools: each instance's, by its client, which a flip keeps); with each type's price
($/device-hour), so is the cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from cluster.router.instances import Instance
from cluster.router.router import Router
from cluster.workers.protocol import Load, LoadQuery

logger = logging.getLogger(__name__)
_IDLE_POLL_S = 0.1
_QUERY_TIMEOUT_S = 5.0
_MOVE_WAIT_S = 60.0  # after the drain timeout: for the moved requests to leave


class ElasticPools:
    def __init__(self, router: Router, launcher, gpus: dict[str, int],
                 drain_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic,
                 hardware: dict[str, str | None] | None = None,
                 prices: dict[str | None, float] | None = None):  # fmt: skip
        """`hardware`: each role's type for an instance added without one, and for those
        running now; `prices`: $/device-hour by type (the cost is known when every type
        held has one)."""
        self.router, self.launcher, self.gpus = router, launcher, gpus
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.hardware = hardware or dict.fromkeys(gpus)
        self.prices = prices or {}
        # instances coming (started, or flipping in), by role and device type
        self.starting_by_type = {role: Counter() for role in gpus}
        self.num_moved = 0  # requests moved off an instance whose drain timed out
        self._types = {i.client: self.hardware.get(i.role) for i in router.instances}
        self._held: Counter = Counter()  # devices now, by type
        self._device_s: Counter = Counter()  # device-seconds until _since, by type
        self._since = clock()
        for i in router.instances:
            self._held[self._types[i.client]] += gpus[i.role]

    # -- what there is ----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Instances of each pool that serve or will: healthy and not draining, starting
        included. A lost one is capacity that is not there (a pool whose only instance is
        lost counts 0, and the controller's floor of one per role replaces it at once); if
        it comes back, the pool's slack removes one later."""
        return {
            role: self.starting[role]
            + sum(1 for i in self.router.pool(role) if i.healthy and not i.draining)
            for role in self.gpus
        }  # fmt: skip

    @property
    def starting(self) -> dict[str, int]:
        """Instances coming (started, or flipping in), by role."""
        return {role: c.total() for role, c in self.starting_by_type.items()}

    def counts_by_type(self) -> dict[str, dict[str | None, int]]:
        """counts(), split by device type."""
        out = {role: Counter(self.starting_by_type[role]) for role in self.gpus}
        for role in self.gpus:
            for i in self.router.pool(role):
                if i.healthy and not i.draining:
                    out[role][self.hardware_of(i)] += 1
        return {role: dict(c) for role, c in out.items()}

    def hardware_of(self, instance: Instance) -> str | None:
        """The device type `instance` runs on (its role's default when it came otherwise)."""
        return self._types.get(instance.client, self.hardware.get(instance.role))

    @property
    def devices(self) -> int:
        """Devices held now (starting and draining instances included)."""
        return sum(self._held.values())

    @property
    def device_seconds(self) -> float:
        """Device-seconds held since start (router seconds)."""
        return sum(self.device_seconds_by_type().values())

    def devices_by_type(self) -> dict[str | None, int]:
        return {t: n for t, n in self._held.items() if n}

    def device_seconds_by_type(self) -> dict[str | None, float]:
        elapsed = self.clock() - self._since
        types = set(self._device_s) | set(self._held)
        return {t: self._device_s[t] + self._held[t] * elapsed for t in types}

    @property
    def cost_known(self) -> bool:
        """Whether every type held, now or before, has a price."""
        return all(t in self.prices for t in set(self._held) | set(self._device_s))

    @property
    def cost_per_hour(self) -> float:
        """$/hour of the devices held now (NaN when a type's price is unknown)."""
        if not self.cost_known:
            return float("nan")
        return sum(n * self.prices[t] for t, n in self._held.items())

    @property
    def cost_seconds(self) -> float:
        """$/hour held, integrated over router seconds (/3600: dollars; NaN: see above)."""
        if not self.cost_known:
            return float("nan")
        return sum(s * self.prices[t] for t, s in self.device_seconds_by_type().items())

    def _hold(self, hardware: str | None, delta: int) -> None:
        now = self.clock()
        for t, n in self._held.items():
            self._device_s[t] += n * (now - self._since)
        self._held[hardware] += delta
        self._since = now

    # -- actions ----------------------------------------------------------------------------

    async def add(self, role: str, hardware: str | None = None) -> Instance:
        """Start an instance of `role` on `hardware` (default: the role's type)."""
        hardware = hardware if hardware is not None else self.hardware.get(role)
        self.starting_by_type[role][hardware] += 1
        self._hold(hardware, self.gpus[role])
        client = None
        try:
            _, client = await self.launcher.start(role, hardware)
            self._types[client] = hardware
            info = await client.connect()
            instance = Instance(info.instance_id, role, client)
            self.router.add_instance(instance)
        except BaseException:
            if client is not None:
                self._types.pop(client, None)
                await self.launcher.stop(client)
            self._hold(hardware, -self.gpus[role])
            raise
        finally:
            self.starting_by_type[role][hardware] -= 1
        logger.info("elastic: %s started%s", instance.instance_id, _on(hardware))
        return instance

    async def remove(self, role: str, instance: Instance | None = None,
                     hardware: str | None = None) -> str:  # fmt: skip
        """Drain `instance` (default: the least busy of `role`, of type `hardware` when it
        has one), then stop it; its id."""
        instance = self._take(role, instance, hardware)
        try:
            await self.drain(instance)
        except BaseException:
            instance.draining = False
            raise
        await self.router.remove_instance(instance)
        await self.launcher.stop(instance.client)
        kind = self.hardware_of(instance)
        self._types.pop(instance.client, None)
        self._hold(kind, -self.gpus[role])
        logger.info("elastic: %s drained and stopped%s", instance.instance_id, _on(kind))
        return instance.instance_id

    async def flip(self, role: str, instance: Instance | None = None,
                   hardware: str | None = None) -> Instance:  # fmt: skip
        """Move `instance` (default: the least busy of the other role, of type `hardware`
        when it has one) to `role`: drain it, change its role. With none to spare there (the
        other pool's only serving instance; its others still start), `role` grows by a new
        instance instead."""
        other = next(r for r in self.gpus if r != role)
        spare = [i for i in self.router.pool(other) if not i.draining]
        if instance is None and len(spare) <= 1 and self.starting[other]:
            logger.info("elastic: no %s instance to spare yet: adding a %s one", other, role)
            return await self.add(role, hardware)
        instance = self._take(other, instance, hardware)
        kind = self.hardware_of(instance)
        self.starting_by_type[role][kind] += 1
        try:
            try:
                await self.drain(instance)
            except BaseException:
                instance.draining = False
                raise
            client = instance.client
            new_id = self.launcher.new_id(role)
            await self.router.remove_instance(instance)
            await client.call("become", role, new_id, timeout=120.0)
            client.becomes = (role, new_id)
            await client.connect()
            flipped = Instance(new_id, role, client)
            self.router.add_instance(flipped)
        finally:
            self.starting_by_type[role][kind] -= 1
        self._hold(kind, self.gpus[role] - self.gpus[other])
        logger.info("elastic: %s is now %s%s", instance.instance_id, new_id, _on(kind))
        return flipped

    def _take(self, role: str, instance: Instance | None, hardware: str | None = None
              ) -> Instance:  # fmt: skip
        """The instance of `role` to drain (given, or a lost one, or the least busy; of type
        `hardware` when one serves), marked draining; ValueError when it is the last serving
        one of its role."""
        serving = [i for i in self.router.pool(role) if not i.draining]
        if instance is not None and instance not in serving:
            raise ValueError(f"{instance.instance_id} is no serving {role} instance")
        if len(serving) <= 1:
            raise ValueError(f"the last {role} instance cannot be drained: a pool keeps one")
        if instance is None:
            typed = [i for i in serving if self.hardware_of(i) == hardware]
            instance = min(typed if hardware is not None and typed else serving,
                           key=lambda i: (i.healthy, i.num_streams,
                                          i.pending_prompt_tokens))  # fmt: skip
        instance.draining = True
        return instance

    async def drain(self, instance: Instance) -> None:
        """Wait until nothing in flight touches `instance` (it is marked draining: nothing
        new comes); past drain_timeout_s, move what is left (see the module docstring)."""
        deadline = self.clock() + self.drain_timeout_s
        while not await self._idle(instance):
            if self.clock() > deadline:
                moved = self._in_flight(instance)
                logger.warning("elastic: drain of %s timed out: moving %d requests",
                               instance.instance_id, moved)  # fmt: skip
                self.num_moved += moved
                self.router.mark_lost(instance, TimeoutError("drained too slowly: moved"))
                await self._wait_router_idle(instance)
                return
            await asyncio.sleep(_IDLE_POLL_S)

    async def _idle(self, instance: Instance) -> bool:
        if instance.num_streams or instance.pending_prompt_tokens:
            return False
        try:
            load = await instance.client.request(LoadQuery(), Load, _QUERY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - lost: whatever it held is gone with it
            return not instance.healthy
        return not (load.num_running or load.num_waiting or load.num_pinned
                    or load.num_kv_waiting)  # fmt: skip

    def _in_flight(self, instance: Instance) -> int:
        """Requests in flight at the router that ran or run on `instance`."""
        lives = [*self.router._live.values()]
        lives += [child for live in lives for child in live.children]
        return sum(any(i is instance for i, _ in live.instances) for live in lives)

    async def _wait_router_idle(self, instance: Instance) -> None:
        deadline = self.clock() + _MOVE_WAIT_S
        while (instance.num_streams or instance.pending_prompt_tokens) and \
                self.clock() < deadline:  # fmt: skip
            await asyncio.sleep(_IDLE_POLL_S)


def _on(hardware: str | None) -> str:
    return "" if hardware is None else f" on {hardware}"
