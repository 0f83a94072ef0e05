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
)
from cluster.worker_common import Chunk, EngineWorker, TransferSettings, engine_timing

_REAP_INTERVAL_S = 0.1  # READs NIXL could not cancel: retry releasing them
_RENEW_TIMEOUT_S = 5.0


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
        metrics = self._start_kv_transfer(registry)
        self.receiver = KVReceiver(self.llm, self.agent, metrics=metrics)
        self._reading: set[str] = set()  # requests whose READ is in flight
        self._abort_after_read: set[str] = set()
        self._every(_REAP_INTERVAL_S, self._reap)

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
        asked = time.monotonic()
        call = _call(prefill, "prefill", request_id, prompt_token_ids, params, priority, cache_salt)
        try:
            result = await call
        except asyncio.CancelledError:
            _spawn(_call(prefill, "abort", request_id))  # the prompt may still be running
            raise
        except (ValueError, TypeError, RequestAborted):
            raise
        except Exception as e:  # noqa: BLE001 - died, unreachable: that instance is lost
            raise PrefillUnavailable(f"prefill call failed: {type(e).__name__}: {e}") from e
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
        if request_id in self._abort_after_read:
            self._abort_after_read.discard(request_id)
            await asyncio.to_thread(self.engine.abort, request_id)
            raise RequestAborted(f"request {request_id!r} was aborted")
        transfer_s = time.monotonic() - start

        def commit():
            return self.llm.commit_remote(request_id, handle.first_token_id, handle.first_logprob)

        first = True
        async for out in self.engine.follow(request_id, commit):
            self._count(out, first=False)
            yield Chunk.from_output(
                out, {**(timing or {}), "transfer_s": transfer_s} if first else None
            )
            first = False

    async def abort(self, request_id: str) -> bool:
        """Stop a request. One whose READ is in flight is aborted when the READ ends: its
        blocks must not be reused while NIXL may still write them."""
        if request_id in self._reading:
            self._abort_after_read.add(request_id)
            return True
        return await super().abort(request_id)

    async def _connect(self, handle: KVHandle) -> None:
        """Load the prefill agent's metadata once per agent epoch (from the registry)."""
        if not self.receiver.needs_info(handle):
            return
        if self.kv_registry is None:
            raise RemoteTransferError("no KV registry to find prefill agents in")
        try:
            info = await asyncio.to_thread(self.kv_registry.lookup, handle.agent_name)
            await asyncio.to_thread(self.receiver.connect, info)
        except Exception as e:  # noqa: BLE001 - registry gone, metadata refused: one error
            raise RemoteTransferError(f"cannot reach KV agent {handle.agent_name!r}: {e}") from e
        if self.receiver.needs_info(handle):
            raise RemoteTransferError(f"KV agent {handle.agent_name!r} restarted: its KV is gone")

    async def _read(self, handle, request_id, block_ids, renew) -> None:
        """The READ on a thread. If our caller is cancelled meanwhile, the READ still ends
        within its deadline; then the request is aborted, so its blocks are never leaked."""
        read = asyncio.ensure_future(
            asyncio.to_thread(
                self.receiver.read, handle, request_id, block_ids, renew, self.transfer.deadline_s
            )
        )
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
        return await getattr(worker, method)(*args)
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
