"""The router: admits a request, pairs a prefill instance with a decode instance (or picks a
colocated one), drives the handoff, streams the tokens back, and recovers from instance
failures by the request's failure policy.

    generate(inp) ─ validate ─ admission (bounded: Overloaded past max_queued)
        disaggregated: Generate(spec, prefill address) ═▶ decode ─ Prefill(spec) ─▶ prefill
                       decode ◀─ PrefillResult(KVHandle); READ over NIXL; chunks ═▶ router
        colocated:     Generate(spec) ═▶ colocated ═▶ chunks
        failure:       fail       RequestFailed
                       retry      the lost phase again on a healthy instance: a new prefill
                                  (of prompt + tokens already streamed), then a new handoff
                       recompute  a decode instance runs prompt + tokens streamed itself
        abort / client gone: the request is aborted on every instance it touched

The router knows instances only through their clients (workers/clients.py): typed messages
on the data plane, control calls over Ray; `launch.py` builds them. Who serves a request is
policy.py's choice; what happens to it, request_run.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from cluster import tracing
from cluster.background import spawn
from cluster.elastic.window import Window
from cluster.engine.kv_events import KVEventBatch
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer import Tokenizer
from cluster.router import policy as pairing
from cluster.router import validation
from cluster.router.instances import Instance, Live
from cluster.router.local_prefill import LocalPrefill
from cluster.router.metrics import RouterMetrics
from cluster.router.prefix_index import PrefixIndex, prompt_hashes
from cluster.router.request_run import OVERLOAD_RETRY_AFTER_S, RequestRun
from cluster.router.settings import RouterSettings
from cluster.router.tenants import Tenant, TenantLimits, TenantOverloaded
from cluster.router.types import (
    GenerateInput,
    InvalidRequest,
    ModelInfo,
    Overloaded,
    StreamChunk,
    Unavailable,
)
from cluster.workers.protocol import Abort, Load, LoadQuery, SubscribeKVEvents

logger = logging.getLogger(__name__)
_POLL_TIMEOUT_S = 5.0  # a load poll, an abort, a reconnect
_INLINE_TOKENIZE_CHARS = 4096  # longer text prompts are tokenized on a thread
_RESUBSCRIBE_S = 0.2  # a broken KV-event stream is opened again this often
_METRICS_TTL_S = 1.0  # instances' metrics are fetched at most this often (an open endpoint)


async def _pump(index: int, chunks: AsyncIterator[StreamChunk], queue: asyncio.Queue) -> None:
    """One choice's chunks into the shared queue, indexed; then its index (it ended), or the
    error that ended it."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                chunk.index = index
                await queue.put(chunk)
        await queue.put(index)
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        await queue.put(e)


def _choice_params(params: SamplingParams, i: int, want_logprobs: bool) -> SamplingParams:
    """Choice i's sampling: its own random stream (seed + i, vLLM's rule), and logprobs
    when best_of must rank the choices."""
    changes = {}
    if params.seed is not None and i:
        changes["seed"] = (params.seed + i) % 2**63
    if want_logprobs:
        changes["logprobs"] = 0
    return dataclasses.replace(params, **changes) if changes else params


def _best(results: list[list[StreamChunk]], n: int, strip_logprobs: bool) -> list[StreamChunk]:
    """best_of: the n choices of highest cumulative logprob, as index 0..n-1."""

    def score(chunks: list[StreamChunk]) -> float:
        return sum(lp for c in chunks for lp in c.logprobs or ())

    ranked = sorted(range(len(results)), key=lambda i: score(results[i]), reverse=True)[:n]
    out = []
    for new_index, i in enumerate(sorted(ranked)):
        for chunk in results[i]:
            chunk.index = new_index
            if strip_logprobs:
                chunk.logprobs = chunk.top_logprobs = None
            out.append(chunk)
    return out


def _live_key(tenant: Tenant | None, request_id: str) -> tuple[str, str]:
    return (tenant.name if tenant is not None else "", request_id)


class Router:
    def __init__(
        self,
        instances: list[Instance],
        settings: RouterSettings,
        tokenizer: Tokenizer,
        on_shutdown=None,
    ):
        self.settings = settings
        self.instances = instances
        self.tokenizer = tokenizer
        self._on_shutdown = on_shutdown
        roles = {i.role for i in instances}
        needed = {"prefill", "decode"} if settings.mode == "disaggregated" else {"colocated"}
        if not needed <= roles:
            raise ValueError(f"{settings.mode} mode needs {sorted(needed)} instances")
        info = instances[0].info
        name = settings.served_model_name or Path(info.model_path).name
        self.model_info = ModelInfo(
            name=name,
            architecture=info.architecture,
            max_model_len=min(i.info.max_model_len for i in instances),
            vocab_size=info.vocab_size,
            dtype=info.dtype,
            num_layers=info.num_layers,
            block_size=info.block_size,
            eos_token_ids=tuple(info.eos_token_ids),
        )
        self.metrics = RouterMetrics()
        self.window = Window()  # what elastic pools observe (cluster/elastic/)
        self.launcher = None  # launch.py's, when instances can be started and stopped
        self._live: dict[tuple[str, str], Live] = {}  # (tenant, request id) -> its state
        self.tenant_limits = TenantLimits()
        self._instance_metrics: tuple[float, asyncio.Future] | None = None  # (when, families)
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._num_queued = 0
        self._attempt_ids = itertools.count()
        self._poller = asyncio.ensure_future(self._poll_loads())
        self._draining = False
        # policy kv: the cluster's cached prefixes, from every instance's KV events
        self.index = PrefixIndex() if settings.policy == "kv" else None
        self._subscriptions: dict[str, asyncio.Future] = {}  # instance id -> its follower
        for instance in instances:
            self._watch(instance)
        kv_disaggregated = settings.policy == "kv" and settings.mode == "disaggregated"
        local = settings.local_prefill_max_tokens if kv_disaggregated else 0
        self.local_prefill = LocalPrefill(local, settings.local_prefill_tpot_s)

    async def shutdown(self) -> None:
        for task in (self._poller, *self._subscriptions.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._on_shutdown is not None:
            await self._on_shutdown()

    # -- public API -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        if self._draining:
            return False
        return all(
            any(i.healthy and not i.draining for i in self.pool(role)) for role in self._roles
        )

    # -- elastic pools (cluster/elastic/): instances join and leave while it serves ---------

    def add_instance(self, instance: Instance) -> None:
        """Route to a new instance from now on (its client connected: info known)."""
        info = instance.info
        if info.block_size != self.model_info.block_size or info.model_path != self.instances[
                0].info.model_path:  # fmt: skip
            raise ValueError(f"{instance.instance_id} runs another model or block size")
        if instance.role not in self._roles:
            raise ValueError(f"a {self.settings.mode} router takes no {instance.role} instance")
        self.instances.append(instance)
        self._watch(instance)

    async def remove_instance(self, instance: Instance) -> None:
        """Stop knowing an instance (drained: nothing routed to it runs there any more)."""
        self.instances.remove(instance)
        task = self._subscriptions.pop(instance.instance_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.index is not None:
            self.index.drop(instance.instance_id)
        self.local_prefill.forget(instance.instance_id)
        instance.client.close()

    def _watch(self, instance: Instance) -> None:
        # a broken connection marks its instance lost at once
        instance.client.on_lost = functools.partial(self.mark_lost, instance)
        if self.index is not None:
            task = asyncio.ensure_future(self._follow_kv_events(instance))
            self._subscriptions[instance.instance_id] = task

    def liveness_problem(self) -> str | None:
        """Why this router cannot work any longer (None: it can): one of its background tasks
        ended, such as the load poller that notices instances coming back. A draining router,
        or one with no healthy instance in a pool, is alive (that is readiness: is_ready)."""
        for task in (self._poller, *self._subscriptions.values()):
            if task.done():
                error = "cancelled" if task.cancelled() else repr(task.exception())
                return f"the router's task {task.get_coro().__qualname__} ended: {error}"
        return None

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting (new requests get UNAVAILABLE / 503, readiness goes false) and wait
        up to timeout_s for the requests in flight to finish. Returns how many were still
        running at the deadline; the caller's shutdown then ends them with an error."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._live)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[StreamChunk]:
        """Stream a request's output. Raises InvalidRequest / Overloaded before the first
        chunk, Unavailable or RequestFailed when no instance can serve it."""
        arrival = time.monotonic()
        if self._draining:
            raise Unavailable("this server is draining (shutting down): send it elsewhere")
        prompt_ids, policy = await self._validate(inp)
        tenant = inp.tenant
        if tenant is not None:  # its priority cap and its own cache (tenants.py)
            inp.priority = tenant.priority(inp.priority)
            inp.cache_salt = tenant.salt(inp.cache_salt)
        token = self.window.arrived(len(prompt_ids))
        try:
            async for chunk in self._admitted(inp, prompt_ids, policy, arrival):
                if chunk.token_ids:
                    self.window.first_token(token)
                yield chunk
        finally:
            self.window.ended(token)

    async def _admitted(self, inp: GenerateInput, prompt_ids: list[int], policy: str,
                        arrival: float) -> AsyncIterator[StreamChunk]:  # fmt: skip
        tenant = inp.tenant
        self._shed()
        request_id = inp.request_id or uuid.uuid4().hex
        key = _live_key(tenant, request_id)  # ids are the tenant's own: Abort reaches no other
        if key in self._live:
            raise InvalidRequest(f"request id {request_id!r} is already in flight; use a new one")
        with self._tenant_admission(tenant):
            live = self._live[key] = Live(request_id, tenant.name if tenant else None)
            span = tracing.start(
                "request", inp.trace_context, request_id=request_id, mode=self.settings.mode,
                prompt_tokens=len(prompt_ids), failure_policy=policy,
            )  # fmt: skip
            admission = span.child("admission")
            try:
                async with self._admission():
                    admission.end()
                    queued_s = time.monotonic() - arrival
                    args = (inp, live, prompt_ids, policy, arrival, queued_s, span)
                    if inp.n == 1 and inp.best_of in (None, 1):
                        chunks = RequestRun(self, *args).stream()
                    else:
                        chunks = self._choices(*args)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            if chunk.timing is not None and tenant is not None \
                                    and not tenant.admin:  # fmt: skip
                                # where it ran is the operator's to know, not a tenant's
                                chunk.timing.prefill_instance = chunk.timing.decode_instance = ""
                            yield chunk
            except BaseException as e:
                span.fail(e)
                raise
            finally:
                admission.end()
                span.end()
                del self._live[key]
                if live.instances or live.children:  # stopped early: free it everywhere
                    spawn(self._abort_everywhere(live))

    async def _choices(self, inp: GenerateInput, live: Live, prompt_ids: list[int],
                       policy: str, arrival: float, queued_s: float,
                       span) -> AsyncIterator[StreamChunk]:  # fmt: skip
        """n > 1 / best_of: the first choice runs as any request (one prefill, one handoff);
        once its first token is out, its KV is in its instance's cache and the other choices
        start there, pinned: the prompt's full blocks are prefix-cache hits, shared, and only
        the last partial block is computed again per choice. Their chunks interleave, each
        with its index. best_of: all run, the n with the highest cumulative logprob are
        returned (after the last one ends)."""
        count = inp.best_of or inp.n
        want_logprobs = inp.best_of is not None and inp.params.logprobs is None
        params = [_choice_params(inp.params, i, want_logprobs) for i in range(count)]
        live.children = [Live(live.request_id, live.tenant) for _ in range(count)]
        queue: asyncio.Queue = asyncio.Queue()

        runs: list[RequestRun] = []

        def start(i: int, pin: Instance | None) -> asyncio.Future:
            child = dataclasses.replace(inp, params=params[i], n=1, best_of=None)
            runs.append(RequestRun(self, child, live.children[i], prompt_ids, policy, arrival,
                                   queued_s, span, pin=pin))  # fmt: skip
            return asyncio.ensure_future(_pump(i, runs[-1].stream(), queue))

        tasks = [start(0, None)]
        leader_instance: Instance | None = None
        num_done, started = 0, False
        results: list[list[StreamChunk]] = [[] for _ in range(count)]
        try:
            while num_done < len(tasks):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, int):  # choice `item` ended
                    num_done += 1
                    if item != 0 or started:
                        continue
                    item = None  # the first ended before its first token: start the rest
                elif not started and item.index == 0:  # where the first choice's KV is
                    leader_instance = self._instance(runs[0].timing.decode_instance)
                if not started and (item is None or item.index == 0):
                    started = True
                    tasks += [start(i, leader_instance) for i in range(1, count)]
                if item is None:
                    continue
                if inp.best_of is None:
                    yield item
                else:
                    results[item.index].append(item)
            if inp.best_of is not None:
                for chunk in _best(results, inp.n, strip_logprobs=want_logprobs):
                    yield chunk
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _instance(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances if i.instance_id == instance_id), None)

    @contextlib.contextmanager
    def _tenant_admission(self, tenant):
        try:
            with self.tenant_limits.admit(tenant):
                yield
        except TenantOverloaded as e:
            self.metrics.tenant_rejected(tenant.name, e.reason)
            raise

    def in_flight(self, request_id: str, tenant: Tenant | None = None) -> bool:
        return _live_key(tenant, request_id) in self._live

    async def abort(self, request_id: str, tenant: Tenant | None = None) -> bool:
        """Abort the caller's own request `request_id` (its tenant's, when there are tenants);
        False when it has none of that id in flight."""
        live = self._live.get(_live_key(tenant, request_id))
        if live is None:
            return False
        live.aborted = True
        for child in live.children:
            child.aborted = True
        await self._abort_everywhere(live)
        return True

    async def cluster_status(self) -> dict:
        pools = []
        for role in self._roles:
            instances = []
            for i in self.pool(role):
                load = i.load or Load(0, 0, 0, i.info.num_blocks, i.info.num_blocks, 0.0)
                instances.append(
                    {
                        "instance_id": i.instance_id,
                        "role": i.role,
                        "healthy": i.healthy,
                        "draining": i.draining,
                        "num_running": load.num_running,
                        "num_waiting": load.num_waiting,
                        "pending_prompt_tokens": load.pending_prompt_tokens,
                        "num_kv_blocks": load.num_kv_blocks,
                        "num_free_kv_blocks": load.num_free_kv_blocks,
                        "kv_cache_usage": 1.0 - load.num_free_kv_blocks / load.num_kv_blocks,
                        "node": i.info.node,
                    }
                )
            pools.append({"role": role, "instances": instances})
        return {
            "mode": self.settings.mode,
            "pools": pools,
            "num_requests_in_flight": len(self._live),
            "max_requests_in_flight": self.settings.max_in_flight,
            "max_queued_requests": self.settings.max_queued,
        }

    async def metrics_text(self) -> bytes:
        """Prometheus exposition: the router's metrics plus every reachable instance's. The
        instances' are fetched at most once per _METRICS_TTL_S, however many scrape (the
        endpoint is open: it must not let anyone fan out calls to every instance)."""
        now = time.monotonic()
        if self._instance_metrics is None or now - self._instance_metrics[0] > _METRICS_TTL_S:
            fetch = asyncio.ensure_future(self._fetch_instance_metrics())
            self._instance_metrics = (now, fetch)
        per_instance = await asyncio.shield(self._instance_metrics[1])
        health = [(i.role, i.instance_id, i.healthy, i.draining) for i in self.instances]
        return self.metrics.render(len(self._live), self._num_queued, per_instance, health)

    # -- internals --------------------------------------------------------------------------

    async def _fetch_instance_metrics(self) -> list[list]:
        async def families(i: Instance) -> list:
            try:
                return await i.client.call("metrics", timeout=2.0)
            except Exception:  # noqa: BLE001 - a dead instance has no metrics to give
                return []

        return await asyncio.gather(*(families(i) for i in self.instances))

    @property
    def _roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.settings.mode == "disaggregated" else ("colocated",)

    def pool(self, role: str) -> list[Instance]:
        """The instances of one role."""
        return [i for i in self.instances if i.role == role]

    async def _validate(self, inp: GenerateInput) -> tuple[list[int], str]:
        """validation.py's checks, then the prompt's token ids (a long text prompt is
        tokenized off the event loop, so it never stalls other streams)."""
        policy = validation.validate(inp, self.model_info, self.settings.failure_policy)
        if isinstance(inp.prompt, str):
            if len(inp.prompt) <= _INLINE_TOKENIZE_CHARS:
                ids = self.tokenizer.encode(inp.prompt)
            else:
                ids = await asyncio.to_thread(self.tokenizer.encode, inp.prompt)
        else:
            ids = list(inp.prompt)
        validation.check_prompt_ids(ids, inp.params, self.model_info)
        return ids, policy

    def _shed(self) -> None:
        """Overloaded (429) when the cluster cannot start this request soon: every decode
        instance's KV queue full, or every prefill instance's prompt backlog over the limit."""
        if self.settings.mode != "disaggregated":
            return
        decode = [i for i in self.pool("decode") if i.healthy]
        if decode and all(i.kv_queue_full for i in decode):
            self._rejected()
            raise Overloaded(
                "every decode instance's KV cache is full and its queue too: retry later",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        limit = self.settings.max_pending_prefill_tokens
        prefill = [i for i in self.pool("prefill") if i.healthy]
        if limit and prefill and all(i.pending_prompt_tokens > limit for i in prefill):
            self._rejected()
            raise Overloaded(
                f"every prefill instance has over {limit} prompt tokens queued: retry later",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )

    def _rejected(self) -> None:
        """Overloaded (429): counted, and a miss for the autoscaler."""
        self.metrics.rejected()
        self.window.failed()

    @contextlib.asynccontextmanager
    async def _admission(self):
        if self._slots.locked():
            if self._num_queued >= self.settings.max_queued:
                self._rejected()
                raise Overloaded(
                    f"the cluster is at capacity ({self.settings.max_in_flight} requests in "
                    f"flight, {self._num_queued} queued): retry later"
                )
        self._num_queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._num_queued -= 1
        try:
            yield
        finally:
            self._slots.release()

    def attempt_id(self, request_id: str) -> str:
        """Instance-side id of one run (a retried request must not reuse a live id)."""
        return f"{request_id}#{next(self._attempt_ids)}"

    def prompt_hashes(self, token_ids: list[int], cache_salt: str | None) -> list[bytes]:
        """The prompt's block hashes as engines compute them (policy kv; else none)."""
        if self.index is None:
            return []
        return prompt_hashes(token_ids, cache_salt, self.model_info.block_size)

    async def pick(self, role: str, exclude: set[str] = frozenset(), need_blocks: int = 0,
                   hashes: list[bytes] | None = None) -> tuple[Instance, int]:  # fmt: skip
        """The instance of `role` to use now (policy.py) and how many of the prompt's
        leading blocks (`hashes`, policy kv) it has cached; waits up to instance_wait_s for
        a healthy one."""
        deadline = time.monotonic() + self.settings.instance_wait_s
        settings = self.settings
        weights = (settings.overlap_weight, settings.decode_overlap_weight)
        while True:
            pool = self.pool(role)
            overlap = None
            if self.index is not None and hashes is not None:
                overlap = self.index.overlap(hashes, [i.instance_id for i in pool])
            instance = pairing.pick(
                pool, role, exclude, need_blocks, overlap, len(hashes or ()), weights,
                self.model_info.block_size,
            )  # fmt: skip
            if instance is not None:
                return instance, (overlap or {}).get(instance.instance_id, 0)
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"no healthy {role} instance (waited {self.settings.instance_wait_s:.0f} s)"
                )
            await asyncio.sleep(0.1)

    def mark_lost(self, instance: Instance, error: BaseException) -> None:
        """Stop routing to it; streams waiting on it fail over now (its connection is
        closed: the next poll reconnects, through Ray, once it answers again)."""
        if instance.healthy:
            logger.warning("instance %s lost: %s", instance.instance_id, error)
            instance.lost_reason = str(error)
        instance.healthy = False
        instance.client.disconnect(error)
        _ = instance.lost  # resolved now: streams waiting on this instance stop waiting
        if self.index is not None:  # what it cached may be gone: never route on it
            self.index.drop(instance.instance_id)

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(i) for i in self.instances))
            await asyncio.sleep(self.settings.load_poll_interval_s)

    async def _poll(self, instance: Instance) -> None:
        """Its load over the data plane; a lost instance is asked (control plane) where it
        is now: Ray restarts a dead one with a new address."""
        client = instance.client
        try:
            if not client.connected:
                await client.connect(timeout=_POLL_TIMEOUT_S)
            instance.load = await client.request(LoadQuery(), Load, _POLL_TIMEOUT_S)
            instance.num_recent_blocks = 0  # the new load counts them
        except Exception as e:  # noqa: BLE001 - any failure to answer is ill health
            self.mark_lost(instance, e)
            return
        if not instance.healthy:
            logger.warning("instance %s is back", instance.instance_id)
        instance.healthy = True

    async def _follow_kv_events(self, instance: Instance) -> None:
        """Keep the index up to date with one instance's cache: subscribe (a snapshot
        first), apply its batches; when the stream breaks (the instance is lost, restarted,
        or the router's connection dropped), forget what it held and subscribe again once
        it answers: its snapshot rebuilds its entries."""
        index = self.index
        while True:
            if instance.healthy and instance.client.connected:
                try:
                    stream = instance.client.stream(SubscribeKVEvents(), KVEventBatch)
                    async with contextlib.aclosing(stream):
                        async for batch in stream:
                            index.apply(instance.instance_id, batch)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any broken stream: start over
                    logger.debug("KV events of %s stopped: %s", instance.instance_id, e)
                index.drop(instance.instance_id)
            await asyncio.sleep(_RESUBSCRIBE_S)

    async def _abort_everywhere(self, live: Live) -> None:
        async def abort(instance: Instance, instance_request_id: str) -> None:
            with contextlib.suppress(Exception):
                await instance.client.request(Abort(instance_request_id), bool, _POLL_TIMEOUT_S)

        where = [*live.instances, *(x for child in live.children for x in child.instances)]
        await asyncio.gather(*(abort(i, rid) for i, rid in where))
