"""Decode (and colocated) instance: streams a request's tokens. In the decode role the
prompt's KV comes from a prefill instance over NIXL; in the colocated role (and when the
router recomputes a request whose prefill was lost) the prompt runs here.

    router ── generate(request, handle) ──▶ reserve blocks  (engine lock)
                                            READ over NIXL   (no lock: other requests keep
                                                              decoding meanwhile)
                                            commit first token, then stream
           ◀══ Chunk, Chunk, ... ══════════
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator

from cluster.engine.async_engine import RequestAborted
from cluster.engine.config import EngineConfig
from cluster.engine.sampling_params import SamplingParams
from cluster.kv_transfer.connector import (
    KVHandle,
    KVReceiver,
    PrefillUnavailable,
    RemoteTransferError,
    TransferTimeout,
)
from cluster.kv_transfer.layerwise import LayerPuller
from cluster.worker_common import Chunk, EngineWorker, TransferSettings, engine_timing

_REAP_INTERVAL_S = 0.1  # READs NIXL could not cancel: retry releasing them
_RENEW_TIMEOUT_S = 5.0
_LAYER_POLL_INTERVAL_S = 0.0005  # announcements of finished layers (layer-wise pulls)


class ColocatedWorker(EngineWorker):
    """The baseline: one engine runs prompt and output (chunked prefill, decodes first)."""

    role = "colocated"

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Run the prompt here and stream the output; the first chunk carries timing."""
        self._count_prompt(len(prompt_token_ids))
        first = True
        stream = self.engine.generate(
            prompt_token_ids, params, request_id, priority=priority, cache_salt=cache_salt
        )
        async for out in stream:
            self._count(out, first)
            yield Chunk.from_output(out, engine_timing(out) if first else None)
            first = False


class DecodeWorker(ColocatedWorker):
    role = "decode"

    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        transfer: TransferSettings | None = None,
        registry=None,
    ):
        super().__init__(instance_id, engine_config)
        self.transfer = transfer or TransferSettings()
        metrics = self._start_kv_transfer(registry, layerwise=self.transfer.layerwise)
        self.receiver = KVReceiver(self.llm, self.agent, metrics=metrics)
        self._reading: set[str] = set()  # requests whose READ is in flight
        self._rank_infos: dict[str, list] = {}  # prefill agent -> its ranks' agent infos
        self._abort_after_read: set[str] = set()
        self._every(_REAP_INTERVAL_S, self._reap)
        self.puller = None
        if self.transfer.layerwise:
            self.puller = LayerPuller(self.agent, metrics)
            self._prefill_infos: dict = {}
            self._every(_LAYER_POLL_INTERVAL_S, self._poll_layers)

    def _poll_layers(self) -> None:
        notifs = self.agent.get_notifications()
        if notifs:
            self.puller.on_notifications(notifs)

    def _reap(self) -> None:
        if self.receiver._stuck:
            self.engine.call(self.receiver.reap)

    async def generate_disaggregated(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """The whole handoff, driven from here: run the prompt on `prefill` (a Ray actor
        handle, or a PrefillWorker in this process), pull its KV, stream the output.

        The prefill call doubles as the first lease renewal: its lease is granted after we
        read our clock, so it ends no earlier than then + lease_s. PrefillUnavailable (the
        prefill instance is gone) or another TransferError ends the stream before any chunk.
        """
        if self.puller is not None:
            stream = self._generate_layerwise(
                request_id, prompt_token_ids, params, prefill, priority, cache_salt
            )
            async for chunk in stream:
                yield chunk
            return
        asked = time.monotonic()
        result = await self._prefill_call(
            prefill, request_id, prompt_token_ids, params, priority, cache_salt
        )
        if "chunk" in result:  # the first token ended the request: nothing to pull
            yield result["chunk"]
            return
        handle = result["handle"]
        stream = self.generate_from(
            request_id,
            prompt_token_ids,
            params,
            handle,
            prefill,
            priority,
            cache_salt,
            lease=(asked, handle.lease_s),
            timing={**result["timing"], "prefill_call_s": time.monotonic() - asked},
        )
        async for chunk in stream:
            yield chunk

    async def generate_from(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        handle: KVHandle,
        prefill,
        priority: int = 0,
        cache_salt: str | None = None,
        lease: tuple[float, float | None] | None = None,
        timing: dict[str, float] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Pull the prompt's KV named by `handle` from `prefill` and stream the output.
        `lease` = (monotonic time, seconds the lease was known to last from then); without
        it the lease is renewed first. A TransferError (a subclass says why) ends the stream
        before any chunk; every block reserved here is freed by then."""
        start = time.monotonic()
        await self._connect(handle)
        # Without a known lease, renew it while the blocks are reserved.
        renewal = None if lease else asyncio.ensure_future(_renew(prefill, handle.request_id))
        try:
            block_ids = await asyncio.to_thread(
                self.engine.call,
                lambda: self.receiver.reserve(
                    handle,
                    request_id,
                    prompt_token_ids,
                    params,
                    priority=priority,
                    cache_salt=cache_salt,
                ),
            )
        except BaseException:
            if renewal is not None:
                renewal.cancel()
            raise
        try:
            asked, remaining = lease if renewal is None else await renewal
        except BaseException:  # cancelled: the reserved blocks go back now
            self.engine.abort(request_id)
            raise

        def renewed(_: str) -> float | None:  # the READ's lease view: from `asked` on
            return None if remaining is None else remaining - (time.monotonic() - asked)

        self._reading.add(request_id)
        try:
            await self._read(handle, request_id, block_ids, renewed)
        finally:
            self._reading.discard(request_id)
        await self._raise_if_aborted(request_id)
        transfer_s = time.monotonic() - start
        async for chunk in self._stream(request_id, handle, timing, transfer_s):
            yield chunk

    async def _raise_if_aborted(self, request_id: str) -> None:
        """An abort that came while the READ was in flight takes effect now."""
        if request_id in self._abort_after_read:
            self._abort_after_read.discard(request_id)
            await asyncio.to_thread(self.engine.abort, request_id)
            raise RequestAborted(f"request {request_id!r} was aborted")

    async def _stream(self, request_id, handle: KVHandle, timing, transfer_s: float):
        """The KV is in place: commit the prefill's first token, then stream."""

        def commit():
            return self.llm.commit_remote(request_id, handle.first_token_id, handle.first_logprob)

        first = True
        async for out in self.engine.follow(request_id, commit):
            self._count(out, first=False)
            yield Chunk.from_output(
                out, {**(timing or {}), "transfer_s": transfer_s} if first else None
            )
            first = False

    # -- layer-wise pulls (transfer.layerwise; kv_transfer/layerwise.py) ---------------------

    async def _generate_layerwise(
        self, request_id, prompt_token_ids, params, prefill, priority, cache_salt
    ) -> AsyncIterator[Chunk]:
        """Reserve our blocks, have the prefill announce each finished layer and read it at
        once, then finish the pull when the prefill returns its handle."""
        asked = time.monotonic()
        info = await self._prefill_info(prefill)
        block_ids = await asyncio.to_thread(
            self.engine.call,
            lambda: self.receiver.reserve_for(
                info.layout.compat_hash, info.agent_name, request_id, prompt_token_ids, params,
                priority=priority, cache_salt=cache_salt,
            ),
        )  # fmt: skip
        self.puller.expect(request_id, block_ids)
        self._reading.add(request_id)
        try:
            result = await self._prefill_call(
                prefill, request_id, prompt_token_ids, params, priority, cache_salt
            )
            if "chunk" in result:  # the first token ended it: nothing to pull
                await self._end_layerwise(request_id)
                yield result["chunk"]
                return
            handle, ready = result["handle"], time.monotonic()
            await self._finish_layerwise(request_id, handle, asked)
        except BaseException:
            self._abort_after_read.discard(request_id)
            await self._end_layerwise(request_id)
            raise
        finally:
            self._reading.discard(request_id)
        await self._raise_if_aborted(request_id)
        timing = {**result["timing"], "prefill_call_s": ready - asked}
        async for chunk in self._stream(request_id, handle, timing, time.monotonic() - ready):
            yield chunk

    async def _prefill_info(self, prefill):
        """The prefill agent's KVAgentInfo, asked once per prefill instance and connected."""
        key = getattr(prefill, "_actor_id", None) or id(prefill)
        info = self._prefill_infos.get(key)
        if info is None:
            try:
                info = await _call(prefill, "agent_info")
            except Exception as e:  # noqa: BLE001 - died, unreachable: that instance is lost
                raise PrefillUnavailable(f"prefill call failed: {type(e).__name__}: {e}") from e
            await asyncio.to_thread(self.receiver.connect, info)
            self._prefill_infos[key] = info
        return info

    async def _prefill_call(self, prefill, request_id, prompt, params, priority, cache_salt):
        """Run the prompt on `prefill` (announcing layers to us when pulling layer-wise).
        PrefillUnavailable when that instance is lost; a cancelled call aborts it there."""
        to = self.agent.info() if self.puller is not None else None
        call = _call(prefill, "prefill", request_id, prompt, params, priority, cache_salt, to)
        try:
            return await call
        except asyncio.CancelledError:
            _spawn(_call(prefill, "abort", request_id))  # the prompt may still be running
            raise
        except (ValueError, TypeError, RequestAborted):
            raise
        except Exception as e:  # noqa: BLE001 - died, unreachable: that instance is lost
            if self.puller is not None:
                self._prefill_infos.clear()  # it may come back with a new agent
            raise PrefillUnavailable(f"prefill call failed: {type(e).__name__}: {e}") from e

    async def _finish_layerwise(self, request_id: str, handle: KVHandle, asked: float) -> None:
        """Read what was not announced yet and wait for every layer, within the lease (it
        started after `asked`) and the deadline; then let the prefill free its blocks."""
        if self.receiver.needs_info(handle):  # the prefill restarted: its KV is gone
            self._prefill_infos.clear()
            raise RemoteTransferError(f"KV agent {handle.agent_name!r} restarted")
        until = time.monotonic() + self.transfer.deadline_s
        if handle.lease_s is not None:
            until = min(until, asked + handle.lease_s)
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
        with contextlib.suppress(Exception):
            await asyncio.to_thread(
                self.agent.send_notification, handle.agent_name, handle.request_id.encode()
            )

    async def _end_layerwise(self, request_id: str) -> None:
        """The pull will not complete: stop its READs, then free our blocks (unless a READ
        would not let go: then reap() frees them later)."""
        released = await asyncio.to_thread(self.puller.cancel, request_id)
        if not released:
            self.receiver.keep_stuck(request_id, self.puller.take_stuck(request_id))
        elif not self.receiver.is_stuck(request_id):
            await asyncio.to_thread(self.engine.abort, request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request. One whose READ is in flight is aborted when the READ ends: its
        blocks must not be reused while NIXL may still write them."""
        if request_id in self._reading:
            self._abort_after_read.add(request_id)
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

    async def _read(self, handle, request_id, block_ids, renew) -> None:
        """The READ on a thread. If our caller is cancelled meanwhile, the READ still ends
        within its deadline; then the request is aborted, so its blocks are never leaked."""
        infos = self._rank_infos.get(handle.agent_name)
        if infos is not None and self._sharded(infos[0], handle):
            pull = functools.partial(
                self.receiver.read_sharded, handle, infos, request_id, block_ids, renew,
                self.transfer.deadline_s, self.rank_followers,
            )  # fmt: skip
        else:
            pull = functools.partial(
                self.receiver.read, handle, request_id, block_ids, renew, self.transfer.deadline_s
            )
        read = asyncio.ensure_future(asyncio.to_thread(pull))
        try:
            await asyncio.shield(read)
        except BaseException:
            with contextlib.suppress(BaseException):
                await read
            if not self.receiver.is_stuck(request_id):
                await asyncio.to_thread(self.engine.abort, request_id)
            raise

    async def shutdown(self) -> None:
        await super().shutdown()
        self.agent.close()


_TASKS: set[asyncio.Task] = set()


def _spawn(coro) -> None:
    task = asyncio.ensure_future(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _call(worker, method: str, *args):
    """worker.method(*args) on a Ray actor handle or a worker object in this process."""
    from cluster.prefill_worker.worker import PrefillWorker

    if isinstance(worker, PrefillWorker):
        result = getattr(worker, method)(*args)
        return await result if inspect.isawaitable(result) else result
    return await getattr(worker, method).remote(*args)


async def _renew(prefill, request_id: str) -> tuple[float, float | None]:
    """(when we asked, remaining lease seconds or None when the holder has none or is gone).
    `prefill` is a Ray actor handle, or a PrefillWorker in this process."""
    asked = time.monotonic()
    try:
        remaining = await asyncio.wait_for(_call(prefill, "renew", request_id), _RENEW_TIMEOUT_S)
        return asked, remaining
    except Exception:  # noqa: BLE001 - dead, unreachable or slow holder: no lease
        return asked, None
