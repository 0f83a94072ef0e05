"""Prefill instance: runs prompts, samples each request's first token, and keeps its KV
blocks pinned under a lease until a decode instance has pulled them (or the lease ends).

    decode ── Prefill(spec) ──▶ engine (prefill role) ── first token, blocks pinned
           ◀── PrefillResult(KVHandle) ─ sender.offer(): lease granted
    decode ── Renew(request id) ──▶ lease extended         (decode then READs over NIXL)
    NIXL notification ──▶ housekeeping thread ──▶ sender.poll() frees the blocks
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from cluster import tracing
from cluster.engine.config import EngineConfig
from cluster.kv_transfer.connector import KVSender
from cluster.kv_transfer.layerwise import LayerAnnouncer
from cluster.workers import protocol
from cluster.workers.base import EngineWorker, TransferSettings, chunk_from_output, engine_timing
from cluster.workers.protocol import PrefillResult, RequestSpec

_POLL_INTERVAL_S = 0.005  # notifications of finished pulls
_EXPIRE_INTERVAL_S = 0.1  # lease expiry
_REPUBLISH_INTERVAL_S = 5.0


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        transfer: TransferSettings | None = None,
        registry=None,
        llm=None,
    ):
        super().__init__(instance_id, engine_config, llm)
        transfer = transfer or TransferSettings()
        metrics = self._start_kv_transfer(registry, layerwise=transfer.layerwise)
        self.sender = KVSender(
            self.llm,
            self.agent,
            lease_s=transfer.lease_s,
            grace_s=transfer.grace_s,
            metrics=metrics,
        )
        self.sender.rank_infos = self.rank_infos
        self.announcer = LayerAnnouncer(self.llm, self.agent) if transfer.layerwise else None
        if self.kv_registry is not None:
            self._publish()
        self._every(_POLL_INTERVAL_S, self._poll_notifications)
        self._every(_EXPIRE_INTERVAL_S, lambda: self.engine.call(self.sender.poll, []))
        if self.kv_registry is not None:  # a registry that restarted empty learns us again
            self._every(_REPUBLISH_INTERVAL_S, self._publish)

    def _poll_notifications(self) -> None:
        """Pulls that finished free their blocks; the engine lock only when there are some.
        With no lease out there is nothing to free: no NIXL call (an idle instance costs
        next to no CPU; a notification for a lease granted since waits one more tick)."""
        if not self.sender.leases:
            return
        notifs = self.agent.get_notifications()
        if notifs:
            self.engine.call(self.sender.poll, notifs)

    def _publish(self) -> None:
        try:
            for info in self.rank_infos:  # every rank's agent: decode ranks read from each
                self.kv_registry.publish(info)
        except Exception:  # noqa: BLE001 - registry restarting: try again next round
            pass

    def handlers(self) -> dict:
        return {
            **super().handlers(),
            protocol.Prefill: lambda m: self.prefill(m.spec, m.layerwise_to),
            protocol.Renew: lambda m: self.renew(m.request_id),
            protocol.Drop: lambda m: self.drop(m.request_id),
            protocol.Abandon: lambda m: self.abandon(m.request_id),
            protocol.AgentInfoQuery: lambda _: self.agent_info(),
        }

    async def prefill(self, spec: RequestSpec, layerwise_to=None) -> PrefillResult:
        """Run the prompt. The result has the KV handle with the blocks leased (granted
        `granted_after_s` after this call arrived: the caller's view of the lease starts from
        there, not from before a queue), or the only chunk when the first token already ends
        the request (nothing to pull). `layerwise_to`: the decode agent's KVAgentInfo, to
        announce each finished layer to (kv_transfer/layerwise.py); needs transfer.layerwise
        on this pool."""
        received = time.monotonic()
        span = tracing.start("prefill", spec.trace, instance=self.instance_id,
                             prompt_tokens=len(spec.prompt_token_ids))  # fmt: skip
        try:
            result, times = await self._run(spec, layerwise_to, received)
            if times is not None:
                arrival, scheduled, first_token = times
                span.child_at("queue", arrival, scheduled)
                span.child_at("compute", scheduled, first_token)
            span.set(**msgspec.structs.asdict(result.timing))
            return result
        except BaseException as e:
            span.fail(e)
            raise
        finally:
            span.end()

    async def _run(self, spec: RequestSpec, layerwise_to, received: float):
        await self.llm.faults.ahit("prefill.compute", spec.request_id)
        self._count_prompt(len(spec.prompt_token_ids))
        if layerwise_to is not None and self.announcer is not None:
            name = await asyncio.to_thread(self.agent.add_remote, layerwise_to)
            self.announcer.watch(spec.request_id, name)
        try:
            return await self._prefill(spec, received)
        finally:
            if self.announcer is not None:
                self.announcer.unwatch(spec.request_id)

    async def _prefill(self, spec: RequestSpec, received: float):
        stream = self.engine.generate(
            spec.prompt_token_ids, spec.params, spec.request_id, **spec.engine_kwargs()
        )
        async for out in stream:
            if not out.finished:
                continue
            timing = engine_timing(out)
            self._count(out, first=True)
            if out.finish_reason != "prefilled":
                return PrefillResult(timing, chunk=chunk_from_output(out, timing)), None
            # No await between the engine pinning the blocks and the lease: a cancelled
            # call either aborted the request above (blocks freed) or got its lease here.
            handle = self.sender.offer(out)
            m = out.metrics
            times = (m.arrival_time, m.first_scheduled_time, m.first_token_time)
            granted_after_s = time.monotonic() - received
            result = PrefillResult(timing, handle=handle, granted_after_s=granted_after_s,
                                   prompt_logprobs=out.prompt_logprobs)  # fmt: skip
            return result, times
        raise RuntimeError(f"prefill of {spec.request_id!r} ended without a final output")

    async def renew(self, request_id: str) -> float | None:
        return await asyncio.to_thread(self.engine.call, self.sender.renew, request_id)

    async def drop(self, request_id: str) -> None:
        """The router gave up on a prefilled request before decode pulled it: free now."""
        await asyncio.to_thread(self.engine.call, self.sender.drop, request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request (the router's Abort, a client gone). Computing: its prefill() call
        raises RequestAborted. Prefilled and leased: its blocks stay until the puller's
        notification or the lease's end, never sooner, since a decode instance may be
        reading them right now (it gives up its pull itself)."""
        if request_id in self.sender.leases:
            return True
        return await asyncio.to_thread(self.engine.abort, request_id)

    async def abandon(self, request_id: str) -> None:
        """The decode instance that drives this request's handoff gives up on it before
        pulling: stop it, or free its leased blocks now (nobody else reads them)."""
        await self.drop(request_id)
        await asyncio.to_thread(self.engine.abort, request_id)

    async def agent_info(self):
        return self.sender.info()

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.kv_registry is not None:
            try:
                for info in self.rank_infos:
                    self.kv_registry.remove(info.agent_name)
            except Exception:  # noqa: BLE001 - the registry may be gone first at teardown
                pass
        self.agent.close()
