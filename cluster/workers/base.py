"""What every worker (prefill, decode, colocated) shares: an AsyncLLMEngine in one role, its
data-plane server (dataplane.py), its load report for the router, its Prometheus metrics.

A worker is a plain class with async methods: Ray runs it as an async actor (one event loop,
the engine's step loop on its own thread; the data-plane server on that loop), and
`launch.start_local` runs the same class in process. Requests reach it as protocol.py
messages over its server; Ray (or a direct call in one process) only starts it, asks
ready() and metrics, and stops it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import ray
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cluster import tracing
from cluster.engine.async_engine import AsyncLLMEngine
from cluster.engine.config import EngineConfig
from cluster.engine.kv_events import AllBlocksCleared, BlockStored, KVEventBatch, KVEventLog
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.replicated import LeaderEngine
from cluster.kv_transfer.agent import NixlKVAgent
from cluster.kv_transfer.metrics import KVTransferMetrics
from cluster.workers import protocol
from cluster.workers.dataplane import Server
from cluster.workers.protocol import Chunk, EngineTiming, InstanceInfo, Load
from cluster.workers.ranks import agent_kwargs, start_followers
from cluster.workers.registry import RayKVRegistry

_HEARTBEAT_INTERVAL_S = 10.0  # an idle parallel instance's leader checks on its ranks
_KV_EVENTS_INTERVAL_S = 0.01  # prefix-cache events go to subscribers at most this often
_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(slots=True, eq=False)
class _Subscriber:
    """One kv_events() stream: (seq, event) pairs not sent yet, and its wake-up."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list = field(default_factory=list)


@dataclass(slots=True)
class TransferSettings:
    lease_s: float = 30.0  # how long prefill pins a request's blocks for its puller
    grace_s: float = 1.0  # extra time before an expired lease's blocks are reused
    deadline_s: float = 10.0  # a pull that takes longer fails (TransferTimeout)
    # A handoff waits this long for KV room on its decode instance (at most max_kv_waiters
    # at once), then the router answers 429 / RESOURCE_EXHAUSTED: backpressure, not an error.
    kv_wait_s: float = 10.0
    max_kv_waiters: int = 256
    # Pull each layer's KV as soon as the prefill has computed it (Splitwise), instead of
    # the whole request after the prefill. Both pools must enable it.
    layerwise: bool = False


def chunk_from_output(out: RequestOutput, timing: EngineTiming | None = None) -> Chunk:
    """The new part of an engine output (RequestOutput carries every token so far)."""
    n = len(out.new_token_ids)
    return Chunk(
        token_ids=list(out.new_token_ids),
        text=out.delta_text,
        finished=out.finished,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        logprobs=out.logprobs[-n:] if out.logprobs is not None and n else None,
        top_logprobs=out.top_logprobs[-n:] if out.top_logprobs is not None and n else None,
        num_cached_tokens=out.num_cached_tokens,
        timing=timing,
        prompt_logprobs=out.prompt_logprobs,
    )


def engine_timing(out: RequestOutput) -> EngineTiming:
    """Durations on this engine's clock (cross-host safe): queue and prompt compute."""
    m = out.metrics
    timing = EngineTiming(num_cached_tokens=out.num_cached_tokens)
    if m is not None and m.first_scheduled_time is not None and m.first_token_time is not None:
        timing.engine_queue_s = m.first_scheduled_time - m.arrival_time
        timing.prefill_s = m.first_token_time - m.first_scheduled_time
    return timing


class EngineWorker:
    """An engine in one role behind async methods; subclasses add the KV transfer side."""

    role = "colocated"

    def __init__(self, instance_id: str, engine_config: EngineConfig, llm: LLMEngine | None = None):
        """`llm`: an idle engine to take over in this role (an elastic instance's flip,
        workers/elastic.py: the weights, KV pool and prefix cache stay); else a new one."""
        if engine_config.role != self.role:
            raise ValueError(f"{type(self).__name__} needs role {self.role!r}")
        self.instance_id = instance_id
        tracing.init_from_env(f"pd-cluster-{self.role}")  # (Ray actors: set by start_ray)
        self.rank_followers: list = []
        if llm is not None:
            llm.reconfigure(engine_config)
            self.llm = llm
        elif engine_config.world_size > 1:  # rank 0 here, ranks 1.. as actors (ranks.py)
            engine_config, self.rank_followers = start_followers(engine_config, instance_id)
            self.llm = LeaderEngine(engine_config)
            for follower in self.rank_followers:
                follower.start.remote()
        else:
            self.llm = LLMEngine(engine_config)
        # An engine that cannot go on (a step failed outside any one request, a rank died)
        # takes the instance down: exit, so that the router sees this instance lost (its
        # failure policy decides) and Ray restarts it, with new ranks. In-process workers
        # (tests, create_local) have no one to restart them: theirs stays failed.
        on_failure = _exit_instance if _in_ray_actor() else None
        self.engine = AsyncLLMEngine(self.llm, on_failure=on_failure)
        self.engine.observe(self._load)
        self.node = socket.gethostname()
        self.registry = CollectorRegistry()
        labels = ("role", "instance")
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens computed by this instance.",
            labels,
            registry=self.registry,
        ).labels(self.role, instance_id)
        self._generation_tokens = Counter(
            "vllm:generation_tokens",
            "Tokens generated by this instance.",
            labels,
            registry=self.registry,
        ).labels(self.role, instance_id)
        self._queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time requests waited in this instance's engine before first being scheduled.",
            labels,
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        ).labels(self.role, instance_id)
        self.registry.register(_EngineGauges(self))
        self._closed = threading.Event()
        self._housekeeping: list[threading.Thread] = []
        self.server: Server | None = None  # the data plane (started by ready())
        self._kv_subscribers: set[_Subscriber] = set()  # kv_events() streams open
        self._kv_flush: asyncio.TimerHandle | None = None  # the next send of KV events
        self._kv_flushed = 0.0  # (loop time) the last one
        if self.rank_followers:
            # Often enough that idle followers, waiting in a broadcast, never time out.
            every = min(_HEARTBEAT_INTERVAL_S, engine_config.dist_timeout_s / 3)
            self._every(every, self._heartbeat)

    # -- called by the router ---------------------------------------------------------------

    async def ready(self) -> InstanceInfo:
        """Static facts, once the engine is up (the router waits on this). The first call
        starts the data-plane server on this worker's event loop."""
        if self.server is None:
            self.server = Server(self.handlers(), host=_data_plane_host())
            self.server.start()
        llm, mc = self.llm, self.llm.model_config
        layout = getattr(getattr(self, "agent", None), "layout", None)
        return InstanceInfo(
            instance_id=self.instance_id,
            role=self.role,
            node=self.node,
            address=self.server.address,
            pid=os.getpid(),
            model_path=mc.path,
            architecture=mc.architecture,
            max_model_len=llm.max_model_len,
            vocab_size=mc.vocab_size,
            dtype=str(llm.runner.dtype).removeprefix("torch."),
            num_layers=mc.num_layers,
            block_size=llm.block_manager.block_size,
            num_blocks=llm.block_manager.num_blocks,
            eos_token_ids=tuple(llm.eos_token_ids),
            kv_layout=layout,
        )

    def handlers(self) -> dict:
        """What this worker answers on the data plane: message type -> handler."""
        return {
            protocol.LoadQuery: lambda _: self.load(),
            protocol.Abort: lambda m: self.abort(m.request_id),
            protocol.SubscribeKVEvents: lambda _: self.kv_events(),
        }

    async def kv_events(self) -> AsyncIterator[KVEventBatch]:
        """This engine's prefix-cache events (engine/kv_events.py) for as long as the caller
        reads: first a snapshot of the whole cache, then batches as blocks are stored and
        evicted. Registered before the snapshot is taken, so no event falls between."""
        bm = self.llm.block_manager
        if bm.events is None:
            loop = asyncio.get_running_loop()
            bm.events = KVEventLog(on_ready=lambda: _call_soon(loop, self._kv_events_ready))
        subscriber = _Subscriber()
        self._kv_subscribers.add(subscriber)
        try:
            hashes, after = await self.engine.acall(
                lambda: (bm.cached_hashes(), bm.events.last_seq)
            )
            yield KVEventBatch(0, [AllBlocksCleared(), BlockStored(hashes)], snapshot=True)
            sent = itertools.count(1)
            while True:
                await subscriber.wake.wait()
                subscriber.wake.clear()
                events = [e for n, e in subscriber.pending if n > after]
                subscriber.pending.clear()
                if events:
                    yield KVEventBatch(next(sent), events)
        finally:
            self._kv_subscribers.discard(subscriber)

    def _kv_events_ready(self) -> None:
        """The engine recorded events since the last flush: send them, at most once every
        _KV_EVENTS_INTERVAL_S (a busy engine's events go out in batches; an idle one's
        loop is never woken for them)."""
        if self._kv_flush is None and self.llm.block_manager.events is not None:
            loop = asyncio.get_running_loop()
            delay = self._kv_flushed + _KV_EVENTS_INTERVAL_S - loop.time()
            self._kv_flush = loop.call_later(max(delay, 0.0), self._flush_kv_events)

    def _flush_kv_events(self) -> None:
        """Move the engine's events to every subscriber (none: they are dropped)."""
        self._kv_flush = None
        self._kv_flushed = asyncio.get_running_loop().time()
        events = self.llm.block_manager.events.drain()  # (shutdown cancels a flush)
        if not events:
            return
        for subscriber in self._kv_subscribers:
            subscriber.pending.extend(events)
            subscriber.wake.set()

    async def load(self) -> Load:
        """What the router balances on: as of the engine's last change (AsyncLLMEngine.observe),
        so it is answered at once even while a long step runs."""
        return msgspec.structs.replace(self.engine.observed)

    def _load(self) -> Load:
        scheduler = self.llm.scheduler
        pending = sum(
            r.num_tokens - r.num_computed_tokens
            for r in (*scheduler.waiting, *scheduler.running)
            if r.num_computed_tokens < r.num_prompt_tokens
        )
        bm = self.llm.block_manager
        return Load(
            num_running=len(scheduler.running) + len(scheduler.remote),
            num_waiting=len(scheduler.waiting),
            pending_prompt_tokens=pending,
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            time=time.time(),
            num_pinned=self.llm.num_pinned,
        )

    async def abort(self, request_id: str) -> bool:
        return await asyncio.to_thread(self.engine.abort, request_id)

    def inject_fault(
        self, point: str, action: str, match: str = "", count: int = 1, skip: int = 0
    ) -> None:
        """Arm a fault point here (cluster/faults.py); refused unless the engine config has
        fault_injection on. Tests and `cluster bench chaos` only."""
        self.llm.faults.arm(point, action, match, count, skip)

    def fault_hits(self, point: str) -> int:
        return self.llm.faults.hits(point)

    def pid(self) -> int:
        """This instance's process id (chaos: SIGKILL / SIGSTOP it from the same host)."""
        return os.getpid()

    def metrics(self) -> list:
        """This instance's metric families (the router merges every instance's)."""
        return list(self.registry.collect())

    async def check_integrity(self) -> tuple[int, int]:
        """(free blocks, all blocks) after the block manager checked itself (tests)."""

        def check() -> tuple[int, int]:
            self.llm.check_integrity()
            return self.llm.num_free_blocks, self.llm.block_manager.num_blocks

        if not self.rank_followers:
            return await asyncio.to_thread(self.engine.call, check)

        def check_all() -> tuple[tuple[int, int], list]:
            # Every rank's replica must agree block for block once it has seen all we sent;
            # the lock keeps us from stepping meanwhile.
            mine, sent = check(), self.llm.heartbeat()
            refs = [f.check_integrity.remote(sent) for f in self.rank_followers]
            return mine, ray.get(refs, timeout=60)

        mine, theirs = await asyncio.to_thread(self.engine.call, check_all)
        if any(tuple(t) != mine for t in theirs):
            raise AssertionError(f"ranks disagree on free blocks: {mine} vs {theirs}")
        return mine

    async def shutdown(self) -> None:
        self._closed.set()
        if self._kv_flush is not None:
            self._kv_flush.cancel()
        self.llm.block_manager.events = None  # (a next role's worker starts its own)
        if self.server is not None:
            self.server.close()
        await asyncio.to_thread(self.engine.shutdown)
        if self.rank_followers:
            try:
                self.llm.stop_followers()
            except Exception:  # noqa: BLE001 - a rank already gone: kill the rest anyway
                pass
            for follower in self.rank_followers:
                ray.kill(follower, no_restart=True)

    # -- for subclasses ---------------------------------------------------------------------

    def _start_kv_transfer(self, registry, layerwise: bool = False):
        """The NIXL agent over this engine's KV pool and the agent registry ("ray": this Ray
        cluster's registry actor, made here since a client holds the ray module); returns the
        transfer metrics, registered with this worker's."""
        if layerwise and self.rank_followers:
            raise ValueError(
                "layer-wise KV pulls (transfer.layerwise) are not built for tensor/pipeline-"
                "parallel instances; turn layerwise off or use TP = PP = 1"
            )
        self.agent = NixlKVAgent(self.instance_id, self.llm.runner.kv_cache, layerwise=layerwise,
                                 **agent_kwargs(self.llm))  # fmt: skip
        # Every rank's agent, rank 0 first: the KV moves rank to rank (ranks.py).
        self.rank_infos = [self.agent.info()]
        if self.rank_followers:
            self.rank_infos += ray.get([f.agent_info.remote() for f in self.rank_followers])
        if registry == "ray":
            registry = RayKVRegistry()
        self.kv_registry = registry
        return KVTransferMetrics(self.role, self.instance_id, registry=self.registry)

    def _heartbeat(self) -> None:
        try:
            self.engine.call(self.llm.heartbeat)
        except Exception as e:  # noqa: BLE001 - a rank is gone (or the engine failed)
            if not self._closed.is_set():
                _exit_instance(e)
            raise RuntimeError("stopped") from e

    def _count(self, out: RequestOutput, first: bool) -> None:
        if first and out.metrics is not None and out.metrics.queue_time_s is not None:
            self._queue_time.observe(out.metrics.queue_time_s)
        if self.role != "prefill":
            self._generation_tokens.inc(len(out.new_token_ids))

    def _count_prompt(self, num_tokens: int) -> None:
        self._prompt_tokens.inc(num_tokens)

    def _every(self, interval_s: float, fn) -> threading.Thread:
        """Run fn() every interval_s on a daemon thread until shutdown (housekeeping)."""

        def loop() -> None:
            while not self._closed.wait(interval_s):
                try:
                    fn()
                except RuntimeError:  # engine shut down or failed: nothing left to keep
                    return

        thread = threading.Thread(target=loop, name=f"{self.role}-housekeeping", daemon=True)
        thread.start()
        self._housekeeping.append(thread)
        _LIVE.add(self)
        return thread

    def _stop_housekeeping(self, timeout_s: float) -> None:
        self._closed.set()
        for thread in self._housekeeping:
            thread.join(timeout_s)


# Workers whose housekeeping threads may still run. At exit they are stopped and joined
# before the interpreter finalizes: a daemon thread caught inside a NIXL call then would
# retake the GIL during finalization and abort the whole process (seen at the end of a test
# run whose in-process deployments were left up).
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all_housekeeping() -> None:
    for worker in list(_LIVE):
        worker._stop_housekeeping(timeout_s=2.0)


def _call_soon(loop: asyncio.AbstractEventLoop, fn) -> None:
    """fn() on `loop` from another thread; nothing once the loop is closed (shut down)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


def _data_plane_host() -> str:
    """Where this worker's data-plane socket listens: its node's address in a Ray cluster
    (what Ray itself listens on), loopback in one process."""
    if not _in_ray_actor():
        return "127.0.0.1"
    return ray.util.get_node_ip_address()


def _in_ray_actor() -> bool:
    if not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def _exit_instance(error: BaseException) -> None:
    """The engine failed (a step raised outside any one request, a rank died, a collective
    broke): leave at once, before any stream hears a generic error, so that callers see the
    actor die and Ray restarts it."""
    logging.getLogger(__name__).error("engine failure, exiting for a restart: %s", error)
    os._exit(70)


def _emulation_families(summary: dict, labels: list[str], values: list[str]):
    """The emulated runner against its own target: steps, modelled and achieved step time
    (real seconds, so scaled by time_scale), and quantiles of achieved / modelled."""
    for key, doc in (
        ("num_steps", "Emulated engine steps."),
        ("modelled_s", "Sum of modelled step times x time_scale (real seconds)."),
        ("achieved_s", "Sum of achieved step times (real seconds)."),
    ):
        family = GaugeMetricFamily(f"pdcluster:emulated_{key}", doc, labels=labels)
        family.add_metric(values, summary[key])
        yield family
    family = GaugeMetricFamily(
        "pdcluster:emulated_step_ratio",
        "Quantiles of achieved / modelled step time of the emulated runner.",
        labels=[*labels, "quantile"],
    )
    for q in ("p50", "p99"):
        if summary[f"ratio_{q}"] is not None:
            family.add_metric([*values, q], summary[f"ratio_{q}"])
    yield family


class _EngineGauges:
    """Gauges read from the engine at scrape time (no lock: a scrape may be one step stale)."""

    def __init__(self, worker: EngineWorker):
        self.worker = worker

    def collect(self):
        w = self.worker
        scheduler, bm = w.llm.scheduler, w.llm.block_manager
        labels = ["role", "instance"]
        values = [w.role, w.instance_id]
        for name, doc, value in (
            (
                "vllm:num_requests_running",
                "Requests running (or receiving KV) in this instance.",
                len(scheduler.running) + len(scheduler.remote),
            ),
            (
                "vllm:num_requests_waiting",
                "Requests waiting in this instance.",
                len(scheduler.waiting),
            ),
            (
                "vllm:kv_cache_usage_perc",
                "Fraction of this instance's KV blocks in use (1 = full).",
                1.0 - bm.num_free_blocks / bm.num_blocks,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            yield family
        queries, hits = scheduler.num_prefix_query_tokens, scheduler.num_prefix_hit_tokens
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
             "(decode: also prompts whose KV arrives from a prefill instance).", queries),
            ("vllm:prefix_cache_hits", "Of those, tokens found cached (decode: not pulled).",
             hits),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            yield family
        family = GaugeMetricFamily(
            "pdcluster:prefix_cache_hit_ratio",
            "Prefix cache hits / queries since this instance started (tokens).",
            labels=labels,
        )
        family.add_metric(values, hits / queries if queries else 0.0)
        yield family
        stats = getattr(w.llm.runner, "stats", None)  # an emulated runner (engine/emulation.py)
        if stats is not None:
            yield from _emulation_families(stats.summary(), labels, values)
