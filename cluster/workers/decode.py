"""Decode (and colocated) instance: streams a request's tokens. In the decode role the
prompt's KV comes from a prefill instance over NIXL; in the colocated role (and when the
router recomputes a request whose prefill was lost) the prompt runs here.

    router ── Generate(spec, prefill address) ──▶ wait for KV room
                                            Prefill(spec) to the prefill worker
                                            reserve blocks  (engine lock)
                                            READ over NIXL   (no lock: other requests keep
                                                              decoding meanwhile)
                                            commit first token, then stream
           ◀══ Chunk, Chunk, ... ══════════
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from cluster import tracing
from cluster.background import spawn
from cluster.engine.async_engine import RequestAborted, RequestError
from cluster.engine.config import EngineConfig
from cluster.engine.emulation import EmulatedModelRunner
from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.connector import (
    KVHandle,
    KVReceiver,
    NoCapacity,
    PrefillUnavailable,
    PullStats,
    RemoteTransferError,
    TransferTimeout,
)
from cluster.kv_transfer.layerwise import LayerPuller
from cluster.workers import protocol
from cluster.workers.base import EngineWorker, TransferSettings, chunk_from_output, engine_timing
from cluster.workers.dataplane import Peer
from cluster.workers.protocol import Chunk, EngineTiming, PrefillResult, RequestSpec
from cluster.workers.ranks import RankGroup

_REAP_INTERVAL_S = 0.1  # READs NIXL could not cancel: retry releasing them
_ORPHAN_INTERVAL_S = 1.0  # reservations no handoff drives (a backstop: there should be none)
_ROOM_POLL_S = 0.005  # a handoff waiting for KV room looks again this often
_RENEW_TIMEOUT_S = 5.0
_LAYER_POLL_INTERVAL_S = 0.0005  # announcements of finished layers (layer-wise pulls)


@dataclass(slots=True)
class _Handoff:
    """A disaggregated request here between its start and its first token."""

    aborted: bool = False  # abort() came: stop at the next step
    span: tracing.Span = tracing.NOOP  # the handoff's trace span (tracing.py)


def _check(handoff: _Handoff, request_id: str) -> None:
    if handoff.aborted:
        raise RequestAborted(f"request {request_id!r} was aborted")


class ColocatedWorker(EngineWorker):
    """The baseline: one engine runs prompt and output (chunked prefill, decodes first)."""

    role = "colocated"

    def handlers(self) -> dict:
        return {**super().handlers(), protocol.Generate: self._on_generate}

    def _on_generate(self, msg: protocol.Generate) -> AsyncIterator[Chunk]:
        if msg.prefill is not None:
            raise ValueError("a colocated instance runs the prompt itself: send no prefill")
        return self.generate(msg.spec)

    async def generate(self, spec: RequestSpec) -> AsyncIterator[Chunk]:
        """Run the prompt here and stream the output; the first chunk carries timing.
        `spec.resume`: continue a run that failed elsewhere (llm_engine.Resume)."""
        self._count_prompt(len(spec.prompt_token_ids))
        first = True
        span = tracing.start("generate", spec.trace, instance=self.instance_id, role=self.role)
        stream = self.engine.generate(
            spec.prompt_token_ids, spec.params, spec.request_id, **spec.engine_kwargs()
        )
        try:
            async for out in stream:
                self._count(out, first)
                if out.finished:
                    span.set(output_tokens=len(out.token_ids), finish_reason=out.finish_reason)
                yield chunk_from_output(out, engine_timing(out) if first else None)
                first = False
        except BaseException as e:
            span.fail(e)
            raise
        finally:
            span.end()


class DecodeWorker(ColocatedWorker):
    role = "decode"

    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        transfer: TransferSettings | None = None,
        registry=None,
        llm=None,
    ):
        super().__init__(instance_id, engine_config, llm)
        self.transfer = transfer or TransferSettings()
        metrics = self._start_kv_transfer(registry, layerwise=self.transfer.layerwise)
        self.receiver = KVReceiver(self.llm, self.agent, metrics=metrics)
        self._handoffs: dict[str, _Handoff] = {}  # requests between start and first token
        self._num_kv_waiting = 0  # handoffs waiting for KV room (bounded: max_kv_waiters)
        self._rank_infos: dict[str, list] = {}  # prefill agent -> its ranks' agent infos
        self._every(_REAP_INTERVAL_S, self._reap)
        self._every(_ORPHAN_INTERVAL_S, self._reap_orphans)
        self._rank_group = RankGroup(self.rank_followers) if self.rank_followers else None
        self._peers: dict[str, Peer] = {}  # prefill instances' data-plane connections
        self.puller = None
        if self.transfer.layerwise:
            self.puller = LayerPuller(self.agent, metrics)
            self._prefill_infos: dict[str, KVAgentInfo] = {}  # by prefill address
            self._every(_LAYER_POLL_INTERVAL_S, self._poll_layers)

    def _poll_layers(self) -> None:
        notifs = self.agent.get_notifications()
        if notifs:
            self.puller.on_notifications(notifs)

    def _reap(self) -> None:
        if self.receiver._stuck:
            self.engine.call(self.receiver.reap)

    def _reap_orphans(self) -> None:
        """WAITING_FOR_KV has a TTL: blocks reserved for a request no handoff here drives
        (nothing should leave one; this is the backstop) are freed after it."""
        ttl = self.transfer.lease_s + self.transfer.deadline_s + self.transfer.kv_wait_s

        def reap() -> None:
            now = time.time()
            for request_id, request in list(self.llm.scheduler.remote.items()):
                orphan = request_id not in self._handoffs and not self.receiver.is_stuck(request_id)
                if orphan and now - request.times.arrival > ttl:
                    self.llm.abort(request_id)

        if self.llm.scheduler.remote:
            self.engine.call(reap)

    async def load(self) -> protocol.Load:
        load = await super().load()
        load.num_kv_waiting = self._num_kv_waiting
        load.max_kv_waiters = self.transfer.max_kv_waiters
        return load

    def handlers(self) -> dict:
        return {**super().handlers(), protocol.GenerateFrom: lambda m: self.generate_from(
            m.spec, m.handle, self._peer(m.prefill))}  # fmt: skip

    def _on_generate(self, msg: protocol.Generate) -> AsyncIterator[Chunk]:
        if msg.prefill is None:  # the router recomputes a request whose prefill was lost
            return self.generate(msg.spec)
        return self.generate_disaggregated(msg.spec, self._peer(msg.prefill))

    def _peer(self, address: str) -> Peer:
        """The data-plane connection to a prefill instance (one per address; a lost one is
        replaced on next use: the instance restarted, or came back)."""
        peer = self._peers.get(address)
        if peer is None or peer.lost is not None:
            if peer is not None:
                peer.close()
            peer = self._peers[address] = Peer(address)
        return peer

    async def generate_disaggregated(
        self, spec: RequestSpec, prefill: Peer
    ) -> AsyncIterator[Chunk]:
        """The whole handoff, driven from here: wait for KV room, run the prompt on the
        prefill instance at the other end of `prefill`, pull its KV, stream.

        The lease view starts when the prefill granted it (the call reports how long after
        it arrived), so a prompt that queued longer than lease_s still hands off.
        PrefillUnavailable (that instance is gone), NoCapacity (no KV room within kv_wait_s)
        or another TransferError ends the stream before any chunk, with nothing held here.
        """
        if self.puller is not None:
            async for chunk in self._generate_layerwise(spec, prefill):
                yield chunk
            return
        request_id = spec.request_id
        handoff = self._begin(request_id)
        handoff.span = tracing.start("handoff", spec.trace, instance=self.instance_id)
        if spec.params.structured_outputs is not None:  # compiles while the prefill runs
            spawn(_quietly(self.engine.compile_grammar(spec.params)))
        try:
            await self.llm.faults.ahit("decode.before_prefill", request_id)
            waiting = handoff.span.child("wait_for_room")
            await self._wait_for_room(handoff, request_id, spec.num_tokens)
            waiting.end()
            asked = time.monotonic()
            call = handoff.span.child("prefill_call")
            result = await self._prefill_call(
                prefill, msgspec.structs.replace(spec, trace=call.carrier())
            )
            call.end()
        except BaseException as e:
            self._handoffs.pop(request_id, None)
            handoff.span.fail(e)
            handoff.span.end()
            raise
        if result.chunk is not None:  # the first token ended the request: nothing to pull
            self._handoffs.pop(request_id, None)
            handoff.span.end()
            yield result.chunk
            return
        timing = msgspec.structs.replace(result.timing, prefill_call_s=time.monotonic() - asked)
        lease = (asked + result.granted_after_s, result.handle.lease_s)
        stream = self._pull_and_stream(handoff, spec, result.handle, prefill, lease, timing,
                                       result.prompt_logprobs)  # fmt: skip
        async for chunk in stream:
            yield chunk

    async def generate_from(self, spec: RequestSpec, handle: KVHandle, prefill: Peer
                            ) -> AsyncIterator[Chunk]:  # fmt: skip
        """Pull the prompt's KV named by a handle someone else got from the prefill instance
        at `prefill` (its lease is renewed first) and stream the output. A TransferError (a
        subclass says why) ends the stream before any chunk; every block reserved here is
        freed by then."""
        handoff = self._begin(spec.request_id)
        stream = self._pull_and_stream(handoff, spec, handle, prefill, None, EngineTiming())
        async for chunk in stream:
            yield chunk

    # -- the handoff, step by step --------------------------------------------------------
    #
    #   begin ─ wait for room ─ prefill call ─ connect ─ reserve ─ READ ─ commit ─ stream
    #   an abort flags the handoff; each step checks the flag; whatever is held when the
    #   handoff stops (reserved blocks, the prefill's lease) is given back in _abandon.

    def _begin(self, request_id: str) -> _Handoff:
        if request_id in self._handoffs:
            raise ValueError(f"request id {request_id!r} is already in use")
        handoff = self._handoffs[request_id] = _Handoff()
        return handoff

    async def _pull_and_stream(self, handoff: _Handoff, spec: RequestSpec, handle: KVHandle,
                               prefill: Peer, lease, timing: EngineTiming,
                               prompt_logprobs=None):  # fmt: skip
        request_id = spec.request_id
        start = time.monotonic()
        try:
            await self.llm.faults.ahit("decode.after_handle", request_id)
            await self._connect(handle)
            if lease is None:
                lease = await _renew(prefill, handle.request_id)
            _check(handoff, request_id)
            reserving = handoff.span.child("reserve", num_blocks=len(handle.block_ids))
            block_ids = await self._reserve(handoff, handle, spec)
            reserving.end()
            await self.llm.faults.ahit("decode.before_read", request_id)
            _check(handoff, request_id)
            asked, remaining = lease

            def renewed(_: str) -> float | None:  # the READ's lease view
                return None if remaining is None else remaining - (time.monotonic() - asked)

            hit_tokens = self._hit_tokens(handle.block_ids, block_ids)
            reading = handoff.span.child("read", remote_agent=handle.agent_name, link="nixl")
            read_start = time.monotonic()
            stats = await self._read(handle, request_id, block_ids, renewed)
            await self._emulated_link(spec.num_tokens - hit_tokens, read_start)
            reading.set(**stats.timing())
            reading.end()
        except BaseException as e:
            handoff.span.fail(e)
            handoff.span.end()
            await self._abandon(handoff, request_id, handle, prefill)
            raise
        transfer_s = time.monotonic() - start
        timing = msgspec.structs.replace(timing, **stats.timing(), kv_hit_tokens=hit_tokens)
        async for chunk in self._stream(request_id, handle, timing, transfer_s, prompt_logprobs):
            yield chunk

    def _hit_tokens(self, remote_block_ids, local_block_ids) -> int:
        """Prompt tokens this instance had cached (the blocks it did not pull)."""
        return (len(remote_block_ids) - len(local_block_ids)) * self.llm.block_manager.block_size

    async def _emulated_link(self, num_tokens: int, since: float) -> None:
        """An emulated instance pulled a stand-in of the KV: wait out the rest of what the
        model's real KV bytes would take on the deployment's link (engine/emulation.py)."""
        runner = self.llm.runner
        if isinstance(runner, EmulatedModelRunner):
            modelled = runner.transfer_delay_s(num_tokens) * runner.time_scale
            left = modelled - (time.monotonic() - since)
            if left > 0:
                await asyncio.sleep(left)

    async def _wait_for_room(self, handoff: _Handoff, request_id: str, num_tokens: int) -> None:
        """Backpressure before any prefill runs: wait (bounded in time and in waiters) until
        this instance has the blocks and a seat; NoCapacity if it does not in kv_wait_s."""
        if self._has_room(num_tokens):
            return
        if self._num_kv_waiting >= self.transfer.max_kv_waiters:
            self.receiver.metrics.failed(NoCapacity.reason)
            raise NoCapacity("decode instance's KV queue is full")
        self._num_kv_waiting += 1
        try:
            deadline = time.monotonic() + self.transfer.kv_wait_s
            while not self._has_room(num_tokens):
                if time.monotonic() > deadline:
                    self.receiver.metrics.failed(NoCapacity.reason)
                    raise NoCapacity(
                        f"decode instance had no KV room for {self.transfer.kv_wait_s:.0f} s"
                    )
                await asyncio.sleep(_ROOM_POLL_S)
                _check(handoff, request_id)
        finally:
            self._num_kv_waiting -= 1

    def _has_room(self, num_tokens: int) -> bool:
        """A lock-free look (a step may change it: reserve() decides for good)."""
        scheduler, bm = self.llm.scheduler, self.llm.block_manager
        seats = len(scheduler.running) + len(scheduler.remote) < scheduler.max_num_running
        return seats and bm.num_free_blocks >= bm.num_blocks_needed(num_tokens)

    async def _reserve(self, handoff: _Handoff, handle: KVHandle, spec: RequestSpec) -> list[int]:
        """The local blocks the READ fills, waiting for room (within kv_wait_s) if a step took
        it since the prefill was called. A cancel mid-reservation still leaves nothing held:
        the thread's reservation is awaited, then _abandon frees it."""
        request_id = spec.request_id
        await self.engine.compile_grammar(spec.params)  # (cached) not under the engine lock

        def reserve() -> list[int]:
            self.llm.faults.hit("decode.reserve", request_id)
            return self.receiver.reserve(handle, spec.request_id, spec.prompt_token_ids,
                                         spec.params, **spec.engine_kwargs())  # fmt: skip

        deadline = time.monotonic() + self.transfer.kv_wait_s
        while True:
            try:
                return await self._reserve_once(reserve)
            except NoCapacity:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(_ROOM_POLL_S)
            _check(handoff, request_id)

    async def _reserve_once(self, reserve) -> list[int]:
        """reserve() under the engine lock: at once when the engine is idle, else on a
        thread. A caller cancelled meanwhile still waits for the thread (it reserves
        regardless), so whoever frees the request's blocks next runs after it."""
        done, block_ids = self.engine.try_call(reserve)
        if done:
            return block_ids
        work = asyncio.ensure_future(asyncio.to_thread(self.engine.call, reserve))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await work
            raise

    async def _abandon(self, handoff: _Handoff, request_id: str, handle, prefill) -> None:
        """The handoff stops before its first token: free our blocks (unless a READ that
        would not release still writes them: reap() frees those), and let the prefill free
        its own now if our READ never ran (we are the only puller of that lease). Runs to
        the end even if the caller is cancelled meanwhile (a second cancel: the router gave
        up while the handoff was already failing)."""
        await _to_the_end(self._give_back(request_id, handle, prefill))

    async def _give_back(self, request_id: str, handle, prefill) -> None:
        self._handoffs.pop(request_id, None)
        if not self.receiver.is_stuck(request_id):
            with contextlib.suppress(RuntimeError):  # the engine is down: nothing to free
                await asyncio.to_thread(self.engine.abort, request_id)
        if handle is not None and not self.receiver.is_stuck(request_id):
            spawn(_call_quietly(prefill, protocol.Drop(handle.request_id)))

    async def _stream(self, request_id: str, handle: KVHandle, timing: EngineTiming,
                      transfer_s: float, prompt_logprobs=None):  # fmt: skip
        """The KV is in place: commit the prefill's first token, then stream (the first
        chunk carries the prompt logprobs the prefill computed). An abort that came while
        the READ was in flight takes effect here (the READ is done: its blocks may be freed
        now)."""

        def commit():
            handoff = self._handoffs.pop(request_id, None)
            if handoff is not None and handoff.aborted:
                self.llm.abort(request_id)
                raise RequestAborted(f"request {request_id!r} was aborted")
            request = self.llm.scheduler.remote.get(request_id)
            if request is None:  # reaped or aborted meanwhile
                raise RequestAborted(f"request {request_id!r} was aborted")
            # The prefill's prefix-cache hit is this request's (every later output carries
            # it: a slow reader may get the first output merged into a later one).
            request.num_cached_tokens = timing.num_cached_tokens
            return self.llm.commit_remote(request_id, handle.first_token_id, handle.first_logprob)

        first = True
        handoff = self._handoffs.get(request_id)
        parent = handoff.span if handoff is not None else tracing.NOOP
        span = parent.child("decode")
        committing = span.child("commit")
        try:
            async for out in self.engine.follow(request_id, commit):
                if first:
                    await self.llm.faults.ahit("decode.after_commit", request_id)
                    committing.end()
                self._count(out, first=False)
                if out.finished:
                    span.set(output_tokens=len(out.token_ids), finish_reason=out.finish_reason)
                chunk = chunk_from_output(
                    out, msgspec.structs.replace(timing, transfer_s=transfer_s) if first else None
                )
                if first and prompt_logprobs is not None:
                    chunk.prompt_logprobs = prompt_logprobs
                yield chunk
                first = False
        except BaseException as e:
            span.fail(e)
            raise
        finally:
            committing.end()
            span.end()
            parent.end()

    # -- layer-wise pulls (transfer.layerwise; kv_transfer/layerwise.py) ---------------------

    async def _generate_layerwise(self, spec: RequestSpec, prefill: Peer
                                  ) -> AsyncIterator[Chunk]:  # fmt: skip
        """Reserve our blocks, have the prefill announce each finished layer and read it at
        once, then finish the pull when the prefill returns its handle."""
        request_id = spec.request_id
        handoff = self._begin(request_id)
        try:
            info = await self._prefill_info(prefill)
            await self._wait_for_room(handoff, request_id, spec.num_tokens)
            await self.engine.compile_grammar(spec.params)  # not under the engine lock
            try:
                block_ids = await self._reserve_once(lambda: self.receiver.reserve_for(
                    info.layout.compat_hash, info.agent_name, request_id, spec.prompt_token_ids,
                    spec.params, **spec.engine_kwargs()))  # fmt: skip
            except asyncio.CancelledError:
                await _to_the_end(asyncio.to_thread(self.engine.abort, request_id))
                raise
        except BaseException:
            self._handoffs.pop(request_id, None)
            raise
        self.puller.expect(request_id, block_ids)
        try:
            asked = time.monotonic()
            result = await self._prefill_call(prefill, spec)
            if result.chunk is not None:  # the first token ended it: nothing to pull
                self._handoffs.pop(request_id, None)
                await self._end_layerwise(request_id)
                yield result.chunk
                return
            handle, ready = result.handle, time.monotonic()
            await self._finish_layerwise(request_id, handle, asked + result.granted_after_s)
        except BaseException:
            self._handoffs.pop(request_id, None)
            await self._end_layerwise(request_id)
            raise
        hit_tokens = self._hit_tokens(handle.block_ids, block_ids)
        timing = msgspec.structs.replace(
            result.timing, prefill_call_s=ready - asked, kv_hit_tokens=hit_tokens
        )
        stream = self._stream(request_id, handle, timing, time.monotonic() - ready,
                              result.prompt_logprobs)  # fmt: skip
        async for chunk in stream:
            yield chunk

    async def _prefill_info(self, prefill: Peer) -> KVAgentInfo:
        """The prefill agent's KVAgentInfo, asked once per prefill instance and connected."""
        info = self._prefill_infos.get(prefill.address)
        if info is None:
            try:
                info = await prefill.call(protocol.AgentInfoQuery(), KVAgentInfo, _RENEW_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - died, unreachable: that instance is lost
                raise PrefillUnavailable(f"prefill call failed: {type(e).__name__}: {e}") from e
            await asyncio.to_thread(self.receiver.connect, info)
            self._prefill_infos[prefill.address] = info
        return info

    async def _prefill_call(self, prefill: Peer, spec: RequestSpec) -> PrefillResult:
        """Run the prompt on the prefill instance (announcing layers to us when pulling
        layer-wise). PrefillUnavailable when that instance is lost; a cancelled call aborts
        it there."""
        to = self.agent.info() if self.puller is not None else None
        try:
            return await prefill.call(protocol.Prefill(spec, to), PrefillResult)
        except asyncio.CancelledError:
            # The prompt may still run, or its blocks wait for us under a lease: we are its
            # only puller, so the prefill may free them at once.
            spawn(_call_quietly(prefill, protocol.Abandon(spec.request_id)))
            raise
        except (ValueError, TypeError, RequestAborted, RequestError):
            raise  # about this request, not the instance
        except Exception as e:  # noqa: BLE001 - died, unreachable: that instance is lost
            if self.puller is not None:
                self._prefill_infos.clear()  # it may come back with a new agent
            raise PrefillUnavailable(f"prefill call failed: {type(e).__name__}: {e}") from e

    async def _finish_layerwise(self, request_id: str, handle: KVHandle, granted: float) -> None:
        """Read what was not announced yet and wait for every layer, within the lease (it
        was granted after `granted`) and the deadline; then let the prefill free its
        blocks."""
        if self.receiver.needs_info(handle):  # the prefill restarted: its KV is gone
            self._prefill_infos.clear()
            raise RemoteTransferError(f"KV agent {handle.agent_name!r} restarted")
        until = time.monotonic() + self.transfer.deadline_s
        if handle.lease_s is not None:
            until = min(until, granted + handle.lease_s)
        state = await asyncio.to_thread(
            self.puller.finish, request_id, handle.agent_name, list(handle.block_ids), until
        )
        if state == "STUCK":  # reap() frees the blocks once NIXL lets go
            self.receiver.keep_stuck(request_id, self.puller.take_stuck(request_id))
            raise RemoteTransferError(f"a READ from {handle.agent_name!r} could not be released")
        if state == "TIMEOUT":
            raise TransferTimeout(f"layer READs from {handle.agent_name!r} not done in time")
        if state != "DONE":
            raise RemoteTransferError(f"layer READs from {handle.agent_name!r} failed")
        # The prefill frees its blocks on this, as after a whole pull's notification.
        if self.llm.faults.hit("kv.notify", request_id):
            return  # a lost notification: the prefill frees on lease expiry
        with contextlib.suppress(Exception):
            await asyncio.to_thread(
                self.agent.send_notification, handle.agent_name, handle.request_id.encode()
            )

    async def _end_layerwise(self, request_id: str) -> None:
        """The pull will not complete: stop its READs, then free our blocks (unless a READ
        would not let go: then reap() frees them later). Runs to the end even if the caller
        is cancelled meanwhile."""
        await _to_the_end(self._stop_layerwise(request_id))

    async def _stop_layerwise(self, request_id: str) -> None:
        released = await asyncio.to_thread(self.puller.cancel, request_id)
        if not released:
            self.receiver.keep_stuck(request_id, self.puller.take_stuck(request_id))
        elif not self.receiver.is_stuck(request_id):
            await asyncio.to_thread(self.engine.abort, request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request. One in its handoff stops at the handoff's next step, which frees
        what it holds: blocks a READ may still write are never freed under it."""
        handoff = self._handoffs.get(request_id)
        if handoff is not None:
            handoff.aborted = True
            return True
        return await super().abort(request_id)

    async def _connect(self, handle: KVHandle) -> None:
        """Load the prefill agent's metadata once per agent epoch (from the registry); for a
        parallel prefill instance, every rank's."""
        if not self.receiver.needs_info(handle):
            return
        if self.kv_registry is None:
            raise RemoteTransferError("no KV registry to find prefill agents in")
        try:
            info = await asyncio.to_thread(self.kv_registry.lookup, handle.agent_name)
            others = [
                await asyncio.to_thread(self.kv_registry.lookup, name)
                for name in handle.rank_agents[1:]
            ]
            await asyncio.to_thread(self.receiver.connect, info)  # any shard of the model
            self._rank_infos[handle.agent_name] = [info, *others]
        except Exception as e:  # noqa: BLE001 - registry gone, metadata refused: one error
            raise RemoteTransferError(f"cannot reach KV agent {handle.agent_name!r}: {e}") from e
        if self.receiver.needs_info(handle):
            raise RemoteTransferError(f"KV agent {handle.agent_name!r} restarted: its KV is gone")

    def _sharded(self, info, handle: KVHandle) -> bool:
        """Whether a pull must be re-sharded (or split over ranks) rather than whole blocks
        rank 0 to rank 0."""
        return bool(handle.rank_agents or self.rank_followers) or not self.agent.layout.same_shard(
            info.layout
        )

    async def _read(self, handle, request_id, block_ids, renew) -> PullStats:
        """The READ on a thread. If our caller is cancelled meanwhile, the READ still ends
        within its deadline before this returns (the caller then frees the blocks)."""
        infos = self._rank_infos.get(handle.agent_name)
        if infos is not None and self._sharded(infos[0], handle):
            pull = functools.partial(
                self.receiver.read_sharded, handle, infos, request_id, block_ids, renew,
                self.transfer.deadline_s, self._rank_group,
            )  # fmt: skip
        else:
            pull = functools.partial(
                self.receiver.read, handle, request_id, block_ids, renew, self.transfer.deadline_s
            )
        read = asyncio.ensure_future(asyncio.to_thread(pull))
        try:
            return await asyncio.shield(read)
        except BaseException:
            with contextlib.suppress(BaseException):
                await read
            raise

    async def shutdown(self) -> None:
        await super().shutdown()
        for peer in self._peers.values():
            peer.close()
        self.agent.close()


async def _to_the_end(cleanup) -> None:
    """Await `cleanup` (a coroutine that gives back blocks or leases); if our caller is
    cancelled meanwhile, the cleanup still finishes, on its own task: what a handoff holds
    is freed exactly once, however it ends."""
    await asyncio.shield(spawn(cleanup))


async def _quietly(work) -> None:
    """Await `work`, whose failure someone else reports (a warm-up)."""
    with contextlib.suppress(Exception):
        await work


async def _call_quietly(prefill: Peer, msg) -> None:
    with contextlib.suppress(Exception):  # the instance is gone: so are its blocks
        await prefill.call(msg, timeout=_RENEW_TIMEOUT_S)


async def _renew(prefill: Peer, request_id: str) -> tuple[float, float | None]:
    """(when we asked, remaining lease seconds or None when the holder has none or is
    gone)."""
    asked = time.monotonic()
    try:
        remaining = await prefill.call(protocol.Renew(request_id), float | None, _RENEW_TIMEOUT_S)
        return asked, remaining
    except Exception:  # noqa: BLE001 - dead, unreachable or slow holder: no lease
        return asked, None
