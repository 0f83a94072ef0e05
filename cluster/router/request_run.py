"""One request's life in the router: its attempts under its failure policy, the streams
they follow on the instances, and the chunks that go back to the client.

    RequestRun.stream ─ attempt 1 ─ colocated:     Generate(spec)                 ═▶ colocated
                                  ─ disaggregated: Generate(spec, prefill address) ═▶ decode
                                    (the decode drives the handoff with the prefill)
                      ─ instance lost, KV transfer failed: Recoverable; the policy decides:
                        fail (RequestFailed), retry (the lost phase again elsewhere: prompt
                        and the tokens streamed so far), recompute (a decode instance runs
                        it whole)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from cluster import logs, tracing
from cluster.engine.async_engine import RequestAborted, RequestError
from cluster.engine.llm_engine import Resume
from cluster.kv_transfer.connector import NoCapacity, PrefillUnavailable, TransferError
from cluster.router.instances import Instance, Live
from cluster.router.types import (
    GenerateInput,
    InvalidRequest,
    Overloaded,
    RequestFailed,
    StreamChunk,
    Timing,
    Unavailable,
    Usage,
)
from cluster.workers.clients import InstanceLost
from cluster.workers.protocol import Chunk, Generate, RequestSpec

if TYPE_CHECKING:  # (a type only: the router makes runs, a run calls back into its router)
    from cluster.router.router import Router

logger = logging.getLogger(__name__)
OVERLOAD_RETRY_AFTER_S = 1


class Recoverable(Exception):
    """A run lost an instance or its KV; the failure policy decides what comes next.
    `instance_lost`: an instance died under it (counted towards the poison-request limit);
    `no_room`: the decode instance had no KV room (backpressure, not a failure)."""

    def __init__(self, message: str, instance_lost: bool = False, no_room: bool = False):
        super().__init__(message)
        self.instance_lost = instance_lost
        self.no_room = no_room


# A request in flight on this many instances that died is not run again: a request that
# kills engines must not walk through the pool (its own instances were restarted by Ray).
MAX_INSTANCES_LOST = 2
OVERLOAD_RETRY_AFTER_S = 1


class RequestRun:
    """One request through the router, across however many attempts the policy allows."""

    def __init__(self, router: Router, inp: GenerateInput, live: Live, prompt_ids: list[int],
                 policy: str, arrival: float, queued_s: float, span=None,
                 pin: Instance | None = None):  # fmt: skip
        self.router: Router = router
        # n > 1: the instance whose cache holds this prompt's KV (the first choice's): the
        # first attempt runs there, its prompt's full blocks a prefix-cache hit
        self.pin = pin
        self.span: tracing.Span = span or tracing.NOOP  # the request's
        self.attempt_span: tracing.Span = tracing.NOOP
        self.inp: GenerateInput = inp
        self.live: Live = live
        self.prompt_ids: list[int] = prompt_ids
        self.policy: str = policy
        self.arrival = arrival
        self.timing = Timing(queue_s=queued_s)
        self.emitted: list[int] = []  # output tokens already streamed to the client
        self.num_sent_chars = 0  # characters of their text streamed
        self.num_cached_tokens = 0
        self.last_token_time: float | None = None
        self.sent_prompt_logprobs = False  # a later attempt's are not sent again

    async def stream(self) -> AsyncIterator[StreamChunk]:
        """The attempts' chunks; an error that ends the request is counted and logged."""
        try:
            async for chunk in self._attempts():
                yield chunk
        except (RequestFailed, Unavailable) as e:
            self.attempt_span.fail(e)
            reason = getattr(e, "reason", "unavailable")
            self.router.metrics.failed(reason)
            self.router.window.failed()
            logs.event(
                "request_failed", logging.WARNING, request_id=self.live.request_id,
                tenant=None, status="error", reason=reason, error=str(e),
                num_failovers=self.timing.num_recomputes,
                completion_tokens=len(self.emitted),
            )  # fmt: skip
            raise
        finally:
            self.attempt_span.end()

    async def _attempts(self) -> AsyncIterator[StreamChunk]:
        router = self.router
        recompute = False
        lost: set[str] = set()  # instances that failed this request (or had no room)
        num_lost = 0
        for attempt in range(router.settings.max_attempts):
            if self.live.aborted:  # Abort() while queued or between attempts
                yield self._final_abort()
                return
            self.attempt_span.end()
            self.attempt_span = self.span.child(f"attempt {attempt + 1}", attempt=attempt + 1)
            try:
                pin, self.pin = self.pin, None  # (only the first attempt)
                if pin is not None and pin.healthy and pin.instance_id not in lost:
                    chunks = self._local(pin, lost, 0, self._blocks_needed())
                elif router.settings.mode == "colocated":
                    chunks = self._whole("colocated", lost)
                elif recompute:
                    chunks = self._whole("decode", lost)
                else:
                    chunks = self._disaggregated(lost)
                async with contextlib.aclosing(chunks):  # closed now, not when collected
                    async for chunk in chunks:
                        yield chunk
                        if chunk.finished:
                            return
                raise Recoverable("the instance's stream ended without a final chunk")
            except RequestAborted:
                if self.live.aborted:  # Abort(): end the stream cleanly, vLLM-style
                    yield self._final_abort()
                    return
                raise RequestFailed("the request was aborted on an instance", "aborted") from None
            except Recoverable as e:
                self.attempt_span.fail(e)
                if self.live.aborted:
                    yield self._final_abort()
                    return
                logs.event(
                    "failover", request_id=self.live.request_id, attempt=attempt + 1,
                    reason=str(e), action="wait for room" if e.no_room else self.policy,
                )  # fmt: skip
                if e.no_room:
                    self._raise_if_no_room(lost)
                    continue  # another decode instance has room: no prefill ran yet
                num_lost += e.instance_lost
                self._raise_if_done(attempt, num_lost)
                self.timing.num_recomputes += 1
                recompute = self.policy == "recompute" or not any(
                    i.healthy for i in router.pool("prefill")
                )
        raise RequestFailed(
            f"the request failed in all {router.settings.max_attempts} attempts; retry it",
            "attempts",
        )

    def _raise_if_done(self, attempt: int, num_lost: int) -> None:
        """The failure policy's verdict after a failed run (errors say what the client can
        do, never which host or actor failed: that is in the log)."""
        settings = self.router.settings
        if self.policy == "fail":
            raise RequestFailed(
                "an instance serving this request failed and its failure policy is 'fail': "
                "retry it, or send failure_policy 'retry'",
                "policy",
            )
        if num_lost >= MAX_INSTANCES_LOST:
            raise RequestFailed(
                f"{num_lost} instances failed while serving this request; it is not run "
                "again (a request that takes instances down must not reach others)",
                "poison",
            )
        if attempt + 1 == settings.max_attempts:
            raise RequestFailed(
                f"the request failed {settings.max_attempts} times (failure policy "
                f"{self.policy!r}); retry it later",
                "attempts",
            )

    def _raise_if_no_room(self, full: set[str]) -> None:
        """Backpressure: Overloaded unless a decode instance not yet tried has KV room."""
        router = self.router
        blocks = self._blocks_needed()
        others = [
            i
            for i in router.pool("decode")
            if i.healthy and i.instance_id not in full and i.free_blocks >= blocks
        ]
        if not others:
            router._rejected()
            raise Overloaded(
                "the decode instances have no KV cache room for this request now: retry "
                f"after {OVERLOAD_RETRY_AFTER_S} s",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )

    # -- the three ways to run ------------------------------------------------------------

    def _blocks_needed(self) -> int:
        """KV blocks a decode instance reserves for this request now: prompt, output so far,
        the next token."""
        num_tokens = len(self.prompt_ids) + len(self.emitted) + 1
        return -(-num_tokens // self.router.model_info.block_size)

    def _continuation(self) -> Resume | None:
        """What continues after the tokens already streamed: they are output again on the
        next instance, so text held back for a stop string or a partial character, and a
        seeded request's random stream, carry on as if nothing had failed."""
        if not self.emitted:
            return None
        return Resume(tuple(self.emitted), self.num_sent_chars)

    def _hashes(self) -> list[bytes]:
        """The block hashes of what the next attempt's prompt is (policy kv; else none)."""
        return self.router.prompt_hashes(self.prompt_ids + self.emitted, self.inp.cache_salt)

    async def _whole(self, role: str, lost: set[str]) -> AsyncIterator[StreamChunk]:
        """Prompt and output on one instance of `role` (colocated, or a decode instance
        recomputing what was lost)."""
        blocks = self._blocks_needed()
        instance, cached = await self.router.pick(role, lost, blocks, self._hashes())
        async with contextlib.aclosing(self._local(instance, lost, cached, blocks)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _local(self, instance: Instance, lost: set[str], cached_blocks: int,
                     blocks: int) -> AsyncIterator[StreamChunk]:  # fmt: skip
        """The prompt runs on `instance` itself; its uncached tokens count as queued there
        until the first chunk. (Each nested stream is closed as soon as its consumer stops,
        not when collected: its bookkeeping of the instance's load ends with it.)"""
        pending = len(self.prompt_ids) + len(self.emitted)
        pending -= cached_blocks * self.router.model_info.block_size
        instance.pending_prompt_tokens += pending
        instance.num_recent_blocks += blocks
        try:
            async with contextlib.aclosing(self._follow(instance, lost)) as chunks:
                async for chunk in chunks:
                    instance.pending_prompt_tokens -= pending
                    pending = 0
                    yield chunk
        finally:
            instance.pending_prompt_tokens -= pending

    async def _disaggregated(self, lost: set[str]) -> AsyncIterator[StreamChunk]:
        """Pick the pair; the decode instance drives the handoff (it calls the prefill
        instance, pulls the KV, streams): one router → decode stream, one decode → prefill
        call, and the prefill call is also the lease's first renewal. Under policy kv, a
        prompt whose first token comes sooner from the decode instance itself runs there
        instead (local_prefill.py)."""
        router = self.router
        num_tokens = len(self.prompt_ids) + len(self.emitted)
        hashes = self._hashes()
        blocks = self._blocks_needed()
        decode, decode_cached = await router.pick("decode", lost, blocks, hashes)
        prefill, prefill_cached = await router.pick("prefill", lost, hashes=hashes)
        pending = num_tokens - prefill_cached * router.model_info.block_size
        if self._prefill_locally(decode, num_tokens, decode_cached, blocks,
                                 prefill.pending_prompt_tokens + pending):  # fmt: skip
            self.timing.local_prefill = True
            router.metrics.local_prefill(True)
            local = self._local(decode, lost, decode_cached, blocks)
            async with contextlib.aclosing(local) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if router.index is not None:
            router.metrics.local_prefill(False)
        decode.num_recent_blocks += blocks
        rid = router.attempt_id(self.live.request_id)
        self.live.instances.append((prefill, rid))
        self.timing.prefill_instance = prefill.instance_id
        prefill.pending_prompt_tokens += pending
        try:
            stream = self._follow(decode, lost, rid, prefill=prefill)
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    prefill.pending_prompt_tokens -= pending
                    pending = 0
                    yield chunk
        except Recoverable as e:
            # (the decode instance gave the prefill's blocks back itself, if it could)
            if isinstance(e.__cause__, PrefillUnavailable):
                router.mark_lost(prefill, e.__cause__)
            if not e.no_room:
                lost.add(prefill.instance_id)  # prefer another prefill instance next time
            raise
        finally:
            prefill.pending_prompt_tokens -= pending

    def _prefill_locally(self, decode: Instance, num_tokens: int, cached_blocks: int,
                         blocks: int, remote_tokens: int) -> bool:  # fmt: skip
        """Conditional disaggregation (local_prefill.py): the first token comes no later from
        the decode instance itself (the part of the prompt it lacks, after the prompts it
        already prefills) than from the best prefill instance (`remote_tokens`: its queue
        and the part it lacks, then the handoff), and the decode instance has KV room."""
        router = self.router
        uncached = num_tokens - cached_blocks * router.model_info.block_size
        queue = decode.pending_prompt_tokens
        if not router.local_prefill.local(uncached, queue, remote_tokens, decode.instance_id):
            return False
        room = decode.free_blocks - decode.num_recent_blocks >= blocks
        return room and not decode.kv_queue_full

    async def _follow(self, instance: Instance, lost: set[str], rid: str | None = None,
                      prefill: Instance | None = None) -> AsyncIterator[StreamChunk]:  # fmt: skip
        """Stream one instance's chunks for this request; instance loss → Recoverable. An
        instance marked lost while we wait on it (its connection broke, it stopped answering
        the load poll: hung, stopped, partitioned) ends the wait at once: nothing waits on
        it to come back. `prefill`: the instance whose prefill the decode instance drives
        (the first chunk depends on it too)."""
        router = self.router
        rid = rid or router.attempt_id(self.live.request_id)
        self.live.instances.append((instance, rid))
        instance.num_streams += 1
        active = self._blocks_needed()
        instance.num_active_blocks += active
        if prefill is None:  # the prompt runs here too
            self.timing.prefill_instance = instance.instance_id
        self.timing.decode_instance = instance.instance_id
        self.attempt_span.set(
            instance=instance.instance_id, role=instance.role, instance_request_id=rid
        )
        spec = RequestSpec(
            rid, self.prompt_ids, self.inp.params, self.inp.priority, self.inp.cache_salt,
            self._continuation(), self.attempt_span.carrier(),
        )  # fmt: skip
        address = prefill.info.address if prefill is not None else None
        stream = instance.client.stream(Generate(spec, address), Chunk)
        got_any = False
        try:
            while True:
                watched = (instance,) if got_any or prefill is None else (instance, prefill)
                try:
                    chunk = await self._next(stream, watched, lost)
                except InstanceLost as e:
                    router.mark_lost(instance, e)
                    lost.add(instance.instance_id)
                    raise Recoverable(
                        f"{instance.role} instance {instance.instance_id} lost",
                        instance_lost=True,
                    ) from e
                except TimeoutError as e:  # (raised by _next)
                    raise Recoverable(
                        f"{instance.instance_id} sent nothing for "
                        f"{router.settings.call_timeout_s:.0f} s"
                    ) from e
                except NoCapacity as e:
                    lost.add(instance.instance_id)
                    raise Recoverable(f"{instance.instance_id}: {e}", no_room=True) from e
                except TransferError as e:
                    raise Recoverable(
                        f"KV transfer failed: {type(e).__name__}: {e}",
                        instance_lost=isinstance(e, PrefillUnavailable),
                    ) from e
                except RequestError as e:  # its own processing failed on the engine
                    logger.warning("request %s failed on %s: %s", rid, instance.instance_id, e)
                    raise RequestFailed(
                        "the engine could not process this request; it was stopped alone "
                        "(the server log has the details)",
                        "engine",
                    ) from None
                except (ValueError, TypeError) as e:
                    if got_any:
                        logger.warning("request %s: %s", rid, e)
                        raise RequestFailed(
                            "the instance refused the request mid-stream", "refused"
                        ) from e
                    raise InvalidRequest(str(e)) from None
                if chunk is None:
                    return
                if not got_any and chunk.timing is not None:
                    self._add_timing(chunk.timing)
                got_any = True
                yield self._chunk(chunk)
        finally:
            instance.num_streams -= 1
            instance.num_active_blocks -= active
            await stream.aclose()

    def _add_timing(self, t) -> None:
        """The first chunk's worker-side timing (protocol.EngineTiming)."""
        computed = len(self.prompt_ids) + len(self.emitted) - t.num_cached_tokens
        if t.prefill_s is not None:
            self.timing.queue_s += t.engine_queue_s or 0.0
            self.timing.prefill_s = t.prefill_s
        if t.transfer_s is not None:
            self.timing.transfer_s = t.transfer_s
            self.timing.kv_bytes, self.timing.kv_reads = t.kv_bytes, t.kv_reads
            self.timing.kv_descriptors, self.timing.kv_read_s = t.kv_descriptors, t.kv_read_s
            self.timing.kv_hit_tokens = t.kv_hit_tokens
            self.router.local_prefill.observe(t, computed)
        elif self.timing.local_prefill and t.prefill_s is not None:
            decode = self.timing.decode_instance
            self.router.local_prefill.observe_local(decode, t.prefill_s, computed)

    async def _next(self, stream, watched: tuple[Instance, ...], lost: set[str]):
        """The stream's next chunk, unless call_timeout_s passes (TimeoutError) or a watched
        instance is marked lost first (Recoverable). The stream's own instance needs no
        watching: marking it lost closes its connection, which ends the stream."""
        router = self.router
        if len(watched) == 1:
            async with asyncio.timeout(router.settings.call_timeout_s):
                return await anext(stream, None)
        nxt = asyncio.ensure_future(anext(stream, None))
        signals = [i.lost for i in watched]
        done, _ = await asyncio.wait(
            (nxt, *signals), timeout=router.settings.call_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )  # fmt: skip
        if nxt in done:
            return nxt.result()
        nxt.cancel()
        with contextlib.suppress(BaseException):
            await nxt
        gone = [i for i in watched if not i.healthy]
        if not gone:
            raise TimeoutError
        for i in gone:
            lost.add(i.instance_id)
        raise Recoverable(f"{gone[0].instance_id} stopped answering", instance_lost=True)

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, chunk: Chunk) -> StreamChunk:
        now = time.monotonic()
        metrics = self.router.metrics
        if not self.emitted and chunk.token_ids:
            self.timing.ttft_s = now - self.arrival
            rest = self.timing.ttft_s - self.timing.queue_s - self.timing.prefill_s
            self.timing.first_decode_s = max(0.0, rest - self.timing.transfer_s)
            metrics.first_token(self.timing)
            self.router.window.split(self.timing.ttft_s, max(0.0, rest))
        elif chunk.token_ids and self.last_token_time is not None:
            metrics.inter_token(now - self.last_token_time, len(chunk.token_ids))
        if chunk.token_ids:
            self.last_token_time = now
        self.emitted += chunk.token_ids
        self.num_sent_chars += len(chunk.text)
        self.num_cached_tokens = max(self.num_cached_tokens, chunk.num_cached_tokens)
        out = StreamChunk(
            request_id=self.live.request_id,
            token_ids=list(chunk.token_ids),
            text=chunk.text,
            logprobs=chunk.logprobs,
            top_logprobs=chunk.top_logprobs,
            finished=chunk.finished,
            finish_reason=chunk.finish_reason if chunk.finished else None,
            stop_reason=chunk.stop_reason,
        )
        if chunk.prompt_logprobs is not None and not self.sent_prompt_logprobs:
            out.prompt_logprobs = chunk.prompt_logprobs
            self.sent_prompt_logprobs = True
        if chunk.finished:
            self._finish(out)
        return out

    def _finish(self, out: StreamChunk) -> None:
        self.timing.e2e_s = time.monotonic() - self.arrival
        out.usage = Usage(len(self.prompt_ids), len(self.emitted), self.num_cached_tokens)
        out.timing = self.timing
        self.live.instances.clear()  # nothing left to abort anywhere
        self.router.metrics.finished(out.finish_reason or "stop", self.timing, out.usage)
        n, t = len(self.emitted), self.timing
        tpot_s = (t.e2e_s - t.ttft_s) / (n - 1) if n > 1 else None
        self.router.window.finished(n, tpot_s)
        if tpot_s is not None and t.decode_instance:
            self.router.local_prefill.observe_decode(t.decode_instance, tpot_s, n - 1)
        if not logs.ACCESS.isEnabledFor(logging.INFO):
            return  # no access log: build nothing on the hot path
        t, ms = self.timing, 1000.0
        logs.event(
            "request", request_id=self.live.request_id, tenant=self.live.tenant, status="ok",
            finish_reason=out.finish_reason, prompt_tokens=out.usage.prompt_tokens,
            completion_tokens=out.usage.completion_tokens,
            cached_tokens=out.usage.cached_tokens, queue_ms=t.queue_s * ms,
            prefill_ms=t.prefill_s * ms, transfer_ms=t.transfer_s * ms,
            first_decode_ms=t.first_decode_s * ms, ttft_ms=t.ttft_s * ms, e2e_ms=t.e2e_s * ms,
            kv_bytes=t.kv_bytes, kv_reads=t.kv_reads, kv_descriptors=t.kv_descriptors,
            kv_read_ms=t.kv_read_s * ms, prefill_instance=t.prefill_instance,
            decode_instance=t.decode_instance, num_failovers=t.num_recomputes,
        )  # fmt: skip

    def _final_abort(self) -> StreamChunk:
        out = StreamChunk(self.live.request_id, [], "", finished=True, finish_reason="abort")
        self._finish(out)
        return out
