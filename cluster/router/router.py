"""The router: admits a request, pairs a prefill instance with a decode instance (or picks a
colocated one), drives the handoff, streams the tokens back, and recovers from instance
failures by the request's failure policy.

    generate(inp) ─ validate ─ admission (bounded: Overloaded past max_queued)
        disaggregated: prefill.prefill() ─▶ KVHandle ─▶ decode.generate_from(handle) ═▶ chunks
        colocated:     colocated.generate() ══════════════════════════════════════════▶ chunks
        failure:       fail       RequestFailed
                       retry      the lost phase again on a healthy instance: a new prefill
                                  (of prompt + tokens already streamed), then a new handoff
                       recompute  a decode instance runs prompt + tokens streamed itself
        abort / client gone: the request is aborted on every instance it touched

The router knows instances only through `clients.LocalClient` / `clients.RayClient` calls
of the workers' public methods; `deployment.py` builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import logs, tracing
from cluster.engine.async_engine import RequestAborted, RequestError
from cluster.engine.llm_engine import Resume
from cluster.engine.tokenizer import Tokenizer
from cluster.kv_transfer.connector import NoCapacity, PrefillUnavailable, TransferError
from cluster.router import validation
from cluster.router.clients import InstanceLost
from cluster.router.metrics import RouterMetrics
from cluster.router.types import (
    FAILURE_POLICIES,
    GenerateInput,
    InvalidRequest,
    ModelInfo,
    Overloaded,
    RequestFailed,
    StreamChunk,
    Timing,
    Unavailable,
    Usage,
)

logger = logging.getLogger(__name__)
_INLINE_TOKENIZE_CHARS = 4096  # longer text prompts are tokenized on a thread


@dataclass(slots=True)
class RouterSettings:
    mode: str = "disaggregated"  # or colocated
    served_model_name: str | None = None  # default: the model folder's name
    max_in_flight: int = 256  # requests being served at once (across all instances)
    max_queued: int = 1024  # requests waiting for a slot; beyond: Overloaded (429)
    failure_policy: str = "retry"
    max_attempts: int = 3  # runs of one request, the first included
    instance_wait_s: float = 30.0  # how long to wait for a healthy instance of a role
    call_timeout_s: float = 600.0  # one prefill call; one gap between streamed chunks
    load_poll_interval_s: float = 0.5
    # Shed load (429) when every prefill instance has more prompt tokens queued than this
    # (0: never); a request would only wait past any TTFT target.
    max_pending_prefill_tokens: int = 131072

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(
                f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}, "
                f"got {self.failure_policy!r}"
            )
        for name in ("max_in_flight", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.max_pending_prefill_tokens < 0:
            raise ValueError(
                f"max_pending_prefill_tokens must be >= 0, got {self.max_pending_prefill_tokens}"
            )


@dataclass(slots=True)
class Instance:
    """One engine as the router sees it."""

    instance_id: str
    role: str  # prefill | decode | colocated
    client: Any  # LocalClient | RayClient
    info: dict
    healthy: bool = True
    load: dict = field(default_factory=dict)
    pending_prompt_tokens: int = 0  # prefill: prompt tokens sent, not yet answered
    num_streams: int = 0  # decode/colocated: streams open through the router
    _lost: asyncio.Future | None = None

    @property
    def lost(self) -> asyncio.Future:
        """Done once this instance is marked lost (streams waiting on it give up); a new one
        while it is healthy again."""
        if self._lost is None or (self._lost.done() and self.healthy):
            self._lost = asyncio.get_running_loop().create_future()
        if not self.healthy and not self._lost.done():
            self._lost.set_result(None)
        return self._lost

    @property
    def free_blocks(self) -> int:
        return self.load.get("num_free_kv_blocks", self.info["num_blocks"])


@dataclass(slots=True)
class _Live:
    """A request in flight: where it is now, so Abort and cancellation can reach it."""

    request_id: str
    instances: list[tuple[Instance, str]] = field(default_factory=list)  # (where, its id)
    aborted: bool = False


class _Recoverable(Exception):
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


def _cause(error: BaseException) -> BaseException:
    """A worker's own exception: Ray wraps it (RayTaskError, whose str is a traceback)."""
    return getattr(error, "cause", None) or error


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
        name = settings.served_model_name or Path(info["model_path"]).name
        self.model_info = ModelInfo(
            name=name,
            architecture=info["architecture"],
            max_model_len=min(i.info["max_model_len"] for i in instances),
            vocab_size=info["vocab_size"],
            dtype=info["dtype"],
            num_layers=info["num_layers"],
            block_size=info["block_size"],
            eos_token_ids=tuple(info["eos_token_ids"]),
        )
        self.metrics = RouterMetrics()
        self._live: dict[str, _Live] = {}
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._num_queued = 0
        self._attempt_ids = itertools.count()
        self._background: set[asyncio.Task] = set()
        self._poller = asyncio.ensure_future(self._poll_loads())
        self._draining = False

    # -- construction -----------------------------------------------------------------------

    @classmethod
    async def create_local(
        cls, model_dir: str | None = None, mode: str = "colocated", **settings: Any
    ) -> Router:
        """Real engines in this process, no Ray: 1 colocated instance, or 1 prefill + 1
        decode (KV over NIXL between two agents of this process)."""
        from cluster.deployment import DeploymentConfig, start_local

        config = DeploymentConfig(model=model_dir, mode=mode)
        return await start_local(config, RouterSettings(mode=mode, **settings))

    async def shutdown(self) -> None:
        self._poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._poller
        if self._on_shutdown is not None:
            await self._on_shutdown()

    # -- public API -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        if self._draining:
            return False
        return all(any(i.healthy for i in self._pool(role)) for role in self._roles)

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
        self._shed()
        request_id = inp.request_id or uuid.uuid4().hex
        if request_id in self._live:
            raise InvalidRequest(f"request id {request_id!r} is already in flight; use a new one")
        live = self._live[request_id] = _Live(request_id)
        span = tracing.start(
            "request", inp.trace_context, request_id=request_id, mode=self.settings.mode,
            prompt_tokens=len(prompt_ids), failure_policy=policy,
        )  # fmt: skip
        admission = span.child("admission")
        try:
            async with self._admission():
                admission.end()
                queued_s = time.monotonic() - arrival
                run = _Run(self, inp, live, prompt_ids, policy, arrival, queued_s, span)
                async for chunk in run.stream():
                    yield chunk
        except BaseException as e:
            span.fail(e)
            raise
        finally:
            admission.end()
            span.end()
            del self._live[request_id]
            if live.instances:  # stopped early (client gone, error): free it everywhere
                self._spawn(self._abort_everywhere(live))

    async def abort(self, request_id: str) -> bool:
        live = self._live.get(request_id)
        if live is None:
            return False
        live.aborted = True
        await self._abort_everywhere(live)
        return True

    async def cluster_status(self) -> dict:
        pools = []
        for role in self._roles:
            instances = []
            for i in self._pool(role):
                load = i.load
                num_blocks = load.get("num_kv_blocks", i.info["num_blocks"])
                free = i.free_blocks
                instances.append(
                    {
                        "instance_id": i.instance_id,
                        "role": i.role,
                        "healthy": i.healthy,
                        "num_running": load.get("num_running", 0),
                        "num_waiting": load.get("num_waiting", 0),
                        "pending_prompt_tokens": load.get("pending_prompt_tokens", 0),
                        "num_kv_blocks": num_blocks,
                        "num_free_kv_blocks": free,
                        "kv_cache_usage": 1.0 - free / num_blocks,
                        "node": i.info.get("node", ""),
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
        """Prometheus exposition: the router's metrics plus every reachable instance's."""

        async def families(i: Instance) -> list:
            try:
                return await i.client.call("metrics", timeout=2.0)
            except Exception:  # noqa: BLE001 - a dead instance has no metrics to give
                return []

        per_instance = await asyncio.gather(*(families(i) for i in self.instances))
        return self.metrics.render(len(self._live), self._num_queued, per_instance)

    # -- internals --------------------------------------------------------------------------

    @property
    def _roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.settings.mode == "disaggregated" else ("colocated",)

    def _pool(self, role: str) -> list[Instance]:
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
        decode = [i for i in self._pool("decode") if i.healthy]
        if decode and all(
            i.load.get("num_kv_waiting", 0) >= i.load.get("max_kv_waiters", 1 << 62) for i in decode
        ):
            self.metrics.rejected()
            raise Overloaded(
                "every decode instance's KV cache is full and its queue too: retry later",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        limit = self.settings.max_pending_prefill_tokens
        prefill = [i for i in self._pool("prefill") if i.healthy]
        if limit and prefill and all(i.pending_prompt_tokens > limit for i in prefill):
            self.metrics.rejected()
            raise Overloaded(
                f"every prefill instance has over {limit} prompt tokens queued: retry later",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )

    @contextlib.asynccontextmanager
    async def _admission(self):
        if self._slots.locked():
            if self._num_queued >= self.settings.max_queued:
                self.metrics.rejected()
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

    async def pick(self, role: str, exclude: set[str] = frozenset(), need_blocks: int = 0):
        """The instance of `role` to use now; waits up to instance_wait_s for a healthy one."""
        deadline = time.monotonic() + self.settings.instance_wait_s
        while True:
            pool = [i for i in self._pool(role) if i.healthy and i.instance_id not in exclude]
            if not pool and exclude:  # excluded ones may be all there is: better than none
                pool = [i for i in self._pool(role) if i.healthy]
            if pool:
                random.shuffle(pool)  # ties: spread
                if role == "prefill":
                    return min(pool, key=lambda i: i.pending_prompt_tokens)
                return min(
                    pool, key=lambda i: (i.free_blocks < need_blocks, i.num_streams, -i.free_blocks)
                )
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"no healthy {role} instance (waited {self.settings.instance_wait_s:.0f} s)"
                )
            await asyncio.sleep(0.1)

    def mark_lost(self, instance: Instance, error: BaseException) -> None:
        if instance.healthy:
            logger.warning("instance %s lost: %s", instance.instance_id, error)
        instance.healthy = False
        _ = instance.lost  # resolved now: streams waiting on this instance stop waiting

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(i) for i in self.instances))
            await asyncio.sleep(self.settings.load_poll_interval_s)

    async def _poll(self, instance: Instance) -> None:
        try:
            instance.load = await instance.client.call("load", timeout=5.0)
        except Exception as e:  # noqa: BLE001 - any failure to answer is ill health
            self.mark_lost(instance, e)
            return
        if not instance.healthy:
            logger.warning("instance %s is back", instance.instance_id)
        instance.healthy = True

    async def _abort_everywhere(self, live: _Live) -> None:
        async def abort(instance: Instance, instance_request_id: str) -> None:
            with contextlib.suppress(Exception):
                await instance.client.call("abort", instance_request_id, timeout=5.0)

        await asyncio.gather(*(abort(i, rid) for i, rid in live.instances))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Run:
    """One request through the router, across however many attempts the policy allows."""

    def __init__(self, router, inp, live, prompt_ids, policy, arrival, queued_s, span=None):
        self.router: Router = router
        self.span: tracing.Span = span or tracing.NOOP  # the request's
        self.attempt_span: tracing.Span = tracing.NOOP
        self.inp: GenerateInput = inp
        self.live: _Live = live
        self.prompt_ids: list[int] = prompt_ids
        self.policy: str = policy
        self.arrival = arrival
        self.timing = Timing(queue_s=queued_s)
        self.emitted: list[int] = []  # output tokens already streamed to the client
        self.num_sent_chars = 0  # characters of their text streamed
        self.num_cached_tokens = 0
        self.last_token_time: float | None = None

    async def stream(self) -> AsyncIterator[StreamChunk]:
        """The attempts' chunks; an error that ends the request is counted and logged."""
        try:
            async for chunk in self._attempts():
                yield chunk
        except (RequestFailed, Unavailable) as e:
            self.attempt_span.fail(e)
            reason = getattr(e, "reason", "unavailable")
            self.router.metrics.failed(reason)
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
                if router.settings.mode == "colocated":
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
                raise _Recoverable("the instance's stream ended without a final chunk")
            except RequestAborted:
                if self.live.aborted:  # Abort(): end the stream cleanly, vLLM-style
                    yield self._final_abort()
                    return
                raise RequestFailed("the request was aborted on an instance", "aborted") from None
            except _Recoverable as e:
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
                    i.healthy for i in router._pool("prefill")
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
            for i in router._pool("decode")
            if i.healthy and i.instance_id not in full and i.free_blocks >= blocks
        ]
        if not others:
            router.metrics.rejected()
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

    async def _whole(self, role: str, lost: set[str]) -> AsyncIterator[StreamChunk]:
        """Prompt and output on one instance of `role` (colocated, or a decode instance
        recomputing what was lost)."""
        instance = await self.router.pick(role, lost)
        async for chunk in self._follow(instance, "generate", lost):
            yield chunk

    async def _disaggregated(self, lost: set[str]) -> AsyncIterator[StreamChunk]:
        """Pick the pair; the decode instance drives the handoff (it calls the prefill
        instance, pulls the KV, streams): one router → decode stream, one decode → prefill
        call, and the prefill call is also the lease's first renewal."""
        router = self.router
        num_tokens = len(self.prompt_ids) + len(self.emitted)
        prefill = await router.pick("prefill", lost)
        blocks = self._blocks_needed()
        decode = await router.pick("decode", lost, need_blocks=blocks)
        rid = router.attempt_id(self.live.request_id)
        self.live.instances.append((prefill, rid))
        self.timing.prefill_instance = prefill.instance_id
        pending = num_tokens
        prefill.pending_prompt_tokens += pending
        try:
            stream = self._follow(
                decode, "generate_disaggregated", lost, rid, prefill.client.handle,
                before_first=prefill,
            )  # fmt: skip
            async for chunk in stream:
                prefill.pending_prompt_tokens -= pending
                pending = 0
                yield chunk
        except _Recoverable as e:
            # (the decode instance gave the prefill's blocks back itself, if it could)
            if e.__cause__ is not None and isinstance(_cause(e.__cause__), PrefillUnavailable):
                router.mark_lost(prefill, e.__cause__)
            if not e.no_room:
                lost.add(prefill.instance_id)  # prefer another prefill instance next time
            raise
        finally:
            prefill.pending_prompt_tokens -= pending

    async def _follow(self, instance, method, lost, rid=None, *extra, before_first=None):
        """Stream one instance's chunks for this request; instance loss → _Recoverable. An
        instance marked lost while we wait on it (it stopped answering the load poll: hung,
        stopped, partitioned) ends the wait at once: nothing waits on it to come back.
        `before_first`: another instance the first chunk depends on (the prefill)."""
        router = self.router
        rid = rid or router.attempt_id(self.live.request_id)
        self.live.instances.append((instance, rid))
        instance.num_streams += 1
        if method == "generate":  # the prompt runs here too
            self.timing.prefill_instance = instance.instance_id
        self.timing.decode_instance = instance.instance_id
        self.attempt_span.set(
            instance=instance.instance_id, role=instance.role, instance_request_id=rid
        )
        args = (rid, self.prompt_ids, self.inp.params, *extra)
        args += (self.inp.priority, self.inp.cache_salt, self._continuation())
        args += (self.attempt_span.carrier(),)
        stream = instance.client.stream(method, *args)
        got_any = False
        try:
            while True:
                watched = (instance,) if got_any or before_first is None else (
                    instance, before_first)  # fmt: skip
                try:
                    chunk = await self._next(stream, watched, lost)
                except InstanceLost as e:
                    router.mark_lost(instance, e)
                    lost.add(instance.instance_id)
                    raise _Recoverable(
                        f"{instance.role} instance {instance.instance_id} lost",
                        instance_lost=True,
                    ) from e
                except TimeoutError as e:  # (raised by _next)
                    raise _Recoverable(
                        f"{instance.instance_id} sent nothing for "
                        f"{router.settings.call_timeout_s:.0f} s"
                    ) from e
                except NoCapacity as e:
                    lost.add(instance.instance_id)
                    raise _Recoverable(f"{instance.instance_id}: {e}", no_room=True) from e
                except TransferError as e:
                    lost_prefill = isinstance(_cause(e), PrefillUnavailable)
                    raise _Recoverable(
                        f"KV transfer failed: {type(_cause(e)).__name__}: {_cause(e)}",
                        instance_lost=lost_prefill,
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
                        logger.warning("request %s: %s", rid, _cause(e))
                        raise RequestFailed(
                            "the instance refused the request mid-stream", "refused"
                        ) from e
                    raise InvalidRequest(str(_cause(e))) from None
                if chunk is None:
                    return
                if not got_any and "prefill_s" in chunk.timing:
                    self.timing.queue_s += chunk.timing.get("engine_queue_s", 0.0)
                    self.timing.prefill_s = chunk.timing["prefill_s"]
                if not got_any and chunk.timing.get("transfer_s") is not None:
                    self.timing.transfer_s = chunk.timing["transfer_s"]
                    for key in ("kv_bytes", "kv_reads", "kv_descriptors", "kv_read_s"):
                        setattr(self.timing, key, chunk.timing.get(key, 0))
                got_any = True
                yield self._chunk(chunk, first_decode=True)
        finally:
            instance.num_streams -= 1
            await stream.aclose()

    async def _next(self, stream, watched: tuple[Instance, ...], lost: set[str]):
        """The stream's next chunk, unless call_timeout_s passes (TimeoutError) or a watched
        instance is marked lost first (_Recoverable)."""
        router = self.router
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
        raise _Recoverable(f"{gone[0].instance_id} stopped answering", instance_lost=True)

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, chunk, first_decode: bool) -> StreamChunk:
        now = time.monotonic()
        metrics = self.router.metrics
        if not self.emitted and chunk.token_ids:
            self.timing.ttft_s = now - self.arrival
            rest = self.timing.ttft_s - self.timing.queue_s - self.timing.prefill_s
            self.timing.first_decode_s = max(0.0, rest - self.timing.transfer_s)
            metrics.first_token(self.timing)
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
        if chunk.finished:
            self._finish(out)
        return out

    def _finish(self, out: StreamChunk) -> None:
        self.timing.e2e_s = time.monotonic() - self.arrival
        out.usage = Usage(len(self.prompt_ids), len(self.emitted), self.num_cached_tokens)
        out.timing = self.timing
        self.live.instances.clear()  # nothing left to abort anywhere
        self.router.metrics.finished(out.finish_reason or "stop", self.timing, out.usage)
        if not logs.ACCESS.isEnabledFor(logging.INFO):
            return  # no access log: build nothing on the hot path
        t, ms = self.timing, 1000.0
        logs.event(
            "request", request_id=self.live.request_id, tenant=None, status="ok",
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
