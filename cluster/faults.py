"""Named fault points: the seams where tests and `cluster bench chaos` make a real fault happen
at a precise step of the serving path (a request's processing raising inside the engine step,
an engine dying mid-forward, a handoff stalled at one await point so a cancel lands there, a
NIXL notification lost, a prefill slower than its lease).

Off unless the engine config says `fault_injection: true`: a production deployment has no way
to arm one. Armed through a worker's `inject_fault(point, action, match, count)`:

    point     where (FAULT_POINTS)
    action    raise        the code at the point raises FaultInjected
              exit         the process exits at once (os._exit), as a crash would
              sleep:S      the point waits S seconds (async points: a cancel lands inside)
              drop         the point skips its effect (kv.notify: the notification is lost)
    match     only requests whose id contains this ("" matches any)
    count     how many hits fire before the fault disarms itself (0: forever)
    skip      how many matching hits pass untouched first (e.g. die after N tokens)

A fault is a stand-in only for what cannot be produced for real on demand; it says so where
it fires (the error text names the point).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FAULT_POINTS = {
    "engine.request": "processing one request's sampled token inside step() (only it fails)",
    "engine.forward": "the batched forward pass inside step() (the engine cannot go on)",
    "prefill.compute": "a prefill call, before the prompt reaches the engine (a sleep: a queue)",
    "decode.before_prefill": "the decode's handoff, before it calls the prefill",
    "decode.after_handle": "the decode's handoff, the KV handle in hand, before reserving",
    "decode.reserve": "inside the decode's block reservation (engine lock held)",
    "decode.before_read": "blocks reserved, before the READ is posted",
    "decode.read": "the READ posted and in flight",
    "decode.after_commit": "the first token committed, before it is streamed",
    "kv.notify": "the notification that lets the prefill free a pulled request's blocks",
}
ACTIONS = ("raise", "exit", "sleep", "drop")


class FaultInjected(RuntimeError):
    """Raised by an armed `raise` fault."""


@dataclass(slots=True)
class _Fault:
    action: str
    seconds: float
    match: str
    count: int  # hits left; 0: forever
    skip: int = 0  # matching hits to let pass first


class Faults:
    """The armed faults of one process. `hit` / `ahit` at a point; both are no-ops (one dict
    lookup) when nothing is armed there."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._armed: dict[str, _Fault] = {}
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def arm(self, point: str, action: str, match: str = "", count: int = 1, skip: int = 0) -> None:
        if not self.enabled:
            raise ValueError("fault injection is off: start the engine with fault_injection")
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {sorted(FAULT_POINTS)}")
        name, _, arg = action.partition(":")
        if name not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; known: {ACTIONS} (sleep:S)")
        seconds = float(arg) if name == "sleep" else 0.0
        with self._lock:
            self._armed[point] = _Fault(name, seconds, match, count, skip)

    def disarm(self, point: str | None = None) -> None:
        with self._lock:
            if point is None:
                self._armed.clear()
            else:
                self._armed.pop(point, None)

    def hits(self, point: str) -> int:
        """How many times an armed fault fired at `point` (tests wait on this)."""
        return self._hits.get(point, 0)

    def _take(self, point: str, request_id: str) -> _Fault | None:
        if not self._armed:
            return None
        with self._lock:
            fault = self._armed.get(point)
            if fault is None or fault.match not in request_id:
                return None
            if fault.skip:
                fault.skip -= 1
                return None
            if fault.count:
                fault.count -= 1
                if fault.count == 0:
                    del self._armed[point]
            self._hits[point] = self._hits.get(point, 0) + 1
        logger.warning("fault injected at %s (%s) for %r", point, fault.action, request_id)
        return fault

    def hit(self, point: str, request_id: str = "") -> bool:
        """At a point in synchronous code. True when the point must skip its effect (drop)."""
        fault = self._take(point, request_id)
        if fault is None:
            return False
        if fault.action == "sleep":
            time.sleep(fault.seconds)
            return False
        return _fire(fault, point)

    async def ahit(self, point: str, request_id: str = "") -> bool:
        """At a point in a coroutine: a sleep there is an await a cancel can land in."""
        fault = self._take(point, request_id)
        if fault is None:
            return False
        if fault.action == "sleep":
            await asyncio.sleep(fault.seconds)
            return False
        return _fire(fault, point)


def _fire(fault: _Fault, point: str) -> bool:
    if fault.action == "raise":
        raise FaultInjected(f"fault injected at {point}")
    if fault.action == "exit":
        logging.getLogger(__name__).error("fault injected at %s: exiting", point)
        os._exit(71)
    return True  # drop
