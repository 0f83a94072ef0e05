"""Layer-by-layer KV pulls on the serving path (Splitwise): the decode instance reads layer i
of a request while the prefill instance computes layer i + 1.

    decode                                   prefill
    reserve local blocks, expect(rid) ──┐
    prefill(rid, layerwise_to=our info) ─┼──▶ announcer.watch(rid, decode agent)
                                        │    forward: after layer i of the step in which
    poll notifications ◀── "L|rid|i|ids" ┘    rid's prompt completes, notify the decode
    READ layer i of every block (read_layers), at once
    ◀── {"handle": KVHandle}  (blocks now under a lease)
    finish(): READ the layers not yet read, wait for all within the lease and deadline,
              then notify rid: the prefill frees its blocks, as after a whole pull

Safety: a layer is read only after the prefill wrote it; until the prefill returns, its
blocks belong to a running request and cannot be reused, and afterwards to its lease, whose
view bounds finish() as it bounds a whole pull. A missed or late announcement costs only
speed: finish() reads whatever was not read yet. On any failure every READ posted is released
(or the request is kept as stuck until it can be) before the caller frees the blocks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from cluster.kv_transfer.agent import KVTransferError


def announcement(request_id: str, layer: int, block_ids: list[int]) -> bytes:
    return f"L|{request_id}|{layer}|{','.join(map(str, block_ids))}".encode()


def parse_announcement(message: bytes) -> tuple[str, int, list[int]] | None:
    try:
        kind, request_id, layer, ids = message.decode().split("|")
        if kind != "L":
            return None
        return request_id, int(layer), [int(x) for x in ids.split(",")]
    except ValueError:
        return None


class LayerAnnouncer:
    """Prefill side: forward hooks on the model's decoder layers announce each finished layer
    of every watched request whose prompt completes in the step being run."""

    def __init__(self, engine, agent):
        self.engine, self.agent = engine, agent
        self._watched: dict[str, str] = {}  # request id -> decode agent name
        for i, layer in enumerate(engine.runner.model.layers.values()):
            layer.register_forward_hook(lambda *_, i=i: self._layer_done(i))

    def watch(self, request_id: str, agent_name: str) -> None:
        self._watched[request_id] = agent_name

    def unwatch(self, request_id: str) -> None:
        self._watched.pop(request_id, None)

    def _layer_done(self, layer: int) -> None:
        plan = self.engine.running_plan
        if not self._watched or plan is None:
            return
        for request in plan.requests:
            target = self._watched.get(request.request_id)
            if target is None:
                continue
            scheduled = plan.num_scheduled_tokens.get(request.request_id, 0)
            if request.num_computed_tokens + scheduled < request.num_prompt_tokens:
                continue  # a chunk of a longer prompt: its later chunks rewrite nothing, but
                # the prompt's KV is complete only after its last chunk's layer
            ids = self.engine.block_manager.block_ids(request.request_id)
            try:
                self.agent.send_notification(target, announcement(request.request_id, layer, ids))
            except (KVTransferError, KeyError):
                self.unwatch(request.request_id)  # the decode side will read it all at the end


@dataclass(slots=True)
class _Session:
    local_block_ids: list[int]
    remote_name: str = ""
    remote_block_ids: list[int] | None = None
    layers_posted: set[int] = field(default_factory=set)
    reads: list = field(default_factory=list)  # TransferHandles in flight or done
    closed: bool = False


class LayerPuller:
    """Decode side: reads announced layers at once; finish() completes and frees."""

    def __init__(self, agent, metrics, poll_interval_s: float = 0.0002):
        self.agent, self.metrics = agent, metrics
        self.num_layers = agent.layout.num_layers
        self.poll_interval_s = poll_interval_s
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.num_early_layers = 0  # layers read on their announcement
        self.num_late_layers = 0  # layers read by finish() (announcement missed or late)

    def expect(self, request_id: str, local_block_ids: list[int]) -> None:
        with self._lock:
            self._sessions[request_id] = _Session(list(local_block_ids))

    def on_notifications(self, notifs: list[tuple[str, bytes]]) -> None:
        """Called often (a housekeeping thread): READ every announced layer now."""
        for agent_name, message in notifs:
            parsed = parse_announcement(message)
            if parsed is None:
                continue
            request_id, layer, remote_ids = parsed
            with self._lock:
                session = self._sessions.get(request_id)
                if session is None or session.closed or layer in session.layers_posted:
                    continue
                num_local = len(session.local_block_ids)
                if len(remote_ids) < num_local:
                    continue  # finish() reads it whole
                # (the tail: blocks before it are in the decode side's prefix cache)
                session.remote_name = agent_name
                session.remote_block_ids = remote_ids[len(remote_ids) - num_local :]
                if self._post(session, [layer]):
                    self.num_early_layers += 1

    def _post(self, session: _Session, layers: list[int]) -> bool:
        try:
            read = self.agent.read_layers(session.remote_name, session.remote_block_ids,
                                          session.local_block_ids, layers, b"")  # fmt: skip
        except (KVTransferError, KeyError, ValueError):
            return False  # not posted: finish() retries these layers, reports a real failure
        session.layers_posted.update(layers)
        session.reads.append(read)
        return True

    def finish(self, request_id: str, agent_name: str, remote_block_ids: list[int],
               until: float) -> str:  # fmt: skip
        """Read what was not announced, wait for every READ until `until`; "DONE", "ERR",
        "TIMEOUT" or "STUCK" (a READ that NIXL would not release: keep the blocks)."""
        start = time.monotonic()
        with self._lock:
            session = self._sessions[request_id]
            num_local = len(session.local_block_ids)
            session.remote_name = agent_name
            session.remote_block_ids = list(remote_block_ids)[len(remote_block_ids) - num_local :]
            missing = [i for i in range(self.num_layers) if i not in session.layers_posted]
            fits = len(remote_block_ids) >= num_local
            if missing and fits and self._post(session, missing):
                self.num_late_layers += len(missing)
            complete = len(session.layers_posted) == self.num_layers
            session.closed = True
        state = self._wait(session, until) if complete else "ERR"
        num_bytes = sum(r.num_bytes for r in session.reads)
        num_descs = sum(r.num_descs for r in session.reads)
        if self._release(session):
            return "STUCK"  # the session stays for take_stuck()
        with self._lock:
            self._sessions.pop(request_id, None)
        if state == "DONE":
            self.metrics.transfer(num_bytes, num_descs, 0.0, time.monotonic() - start)
        else:
            self.metrics.failed("timeout" if state == "TIMEOUT" else "remote_error")
        return state

    def cancel(self, request_id: str, timeout_s: float = 10.0) -> bool:
        """Stop a session (the prefill failed or the request ended early): wait for its
        READs to end, release them. False: one would not release, keep the blocks."""
        with self._lock:
            session = self._sessions.get(request_id)
            if session is None:
                return True
            session.closed = True
        self._wait(session, time.monotonic() + timeout_s)
        stuck = self._release(session)
        if not stuck:
            with self._lock:
                self._sessions.pop(request_id, None)
        return not stuck

    def take_stuck(self, request_id: str) -> list:
        """The READs of a session that would not release (after finish() said STUCK or
        cancel() said False), for the receiver's reap(); the session ends here."""
        with self._lock:
            session = self._sessions.pop(request_id, None)
        return session.reads if session is not None else []

    def _wait(self, session: _Session, until: float) -> str:
        states = []
        for read in session.reads:
            while (state := self.agent.poll(read)) == "PROC":
                if time.monotonic() > until:
                    return "TIMEOUT"
                time.sleep(self.poll_interval_s)
            states.append(state)
        return "ERR" if "ERR" in states else "DONE"

    def _release(self, session: _Session) -> bool:
        """Release every READ; True if one would not (its blocks may still be written)."""
        kept = []
        for read in session.reads:
            try:
                self.agent.release(read)
            except KVTransferError:
                kept.append(read)
        session.reads = kept
        return bool(kept)
