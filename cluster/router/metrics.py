"""Request metrics measured at the router (vLLM's names, role="router"), merged at scrape time
with every instance's own families (engine gauges and token counters with role prefill /
decode / colocated, and the `vllm:nixl_*` transfer metrics) into one exposition."""

from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from cluster.router.types import Timing, Usage

_TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_E2E_BUCKETS_S = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)
_ROLE = "router"


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["role"], buckets=buckets, registry=r).labels(_ROLE)

        self._ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Arrival at the router to the first token leaving it.",
            _TTFT_BUCKETS_S,
        )
        self._itl = hist(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive streamed tokens, at the router.",
            _ITL_BUCKETS_S,
        )
        self._e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Arrival at the router to the request's last token.",
            _E2E_BUCKETS_S,
        )
        self._queue = hist(
            "vllm:request_queue_time_seconds",
            "Router admission plus prefill-engine queueing, per request.",
            _TTFT_BUCKETS_S,
        )
        self._prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Prompt compute time of each request (prefill or colocated engine).",
            _TTFT_BUCKETS_S,
        )
        self._transfer = hist(
            "pdcluster:request_kv_transfer_time_seconds",
            "Reserve + NIXL pull + commit of each request's KV on its decode instance.",
            _TTFT_BUCKETS_S,
        )
        self._success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason.",
            ["role", "finished_reason"],
            registry=r,
        )
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of finished requests.", ["role"], registry=r
        ).labels(_ROLE)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens streamed to clients.", ["role"], registry=r
        ).labels(_ROLE)
        self._rejected = Counter(
            "pdcluster:requests_rejected",
            "Requests refused because the admission queue was full (429).",
            ["role"],
            registry=r,
        ).labels(_ROLE)
        self._tenant_rejected = Counter(
            "pdcluster:tenant_requests_rejected",
            "Requests refused (429) by their tenant's own limits, by tenant and reason (rate: "
            "its token bucket; in_flight: its cap).",
            ["role", "tenant", "reason"],
            registry=r,
        )
        self._failed = Counter(
            "pdcluster:requests_failed",
            "Requests that ended in an error after admission, by reason (policy, poison, "
            "attempts, engine, aborted, refused, unavailable).",
            ["role", "reason"],
            registry=r,
        )
        self._scaling = Counter(
            "pdcluster:autoscale_actions",
            "Elastic pools' actions (add, remove, flip) by the pool they grew or shrank and "
            "their cause (forecast, ttft_breach, tpot_breach, slack, bounds).",
            ["action", "role", "cause"],
            registry=r,
        )
        self._recomputes = Counter(
            "pdcluster:request_recomputes",
            "Times the failure policy re-ran part of a request.",
            ["role"],
            registry=r,
        ).labels(_ROLE)
        self._local_prefills = Counter(
            "pdcluster:local_prefills",
            "Prompts run on their decode instance itself (policy kv: the part it lacked was "
            "short; no handoff).",
            ["role"],
            registry=r,
        ).labels(_ROLE)
        self._remote_prefills = Counter(
            "pdcluster:remote_prefills",
            "Prompts handed off to a prefill instance under policy kv.",
            ["role"],
            registry=r,
        ).labels(_ROLE)
        self._kv_hit_tokens = Counter(
            "pdcluster:decode_kv_hit_tokens",
            "Prompt tokens whose KV the decode instance had cached, so did not pull.",
            ["role"],
            registry=r,
        ).labels(_ROLE)

    def local_prefill(self, local: bool) -> None:
        """policy kv, disaggregated: where a request's prompt ran."""
        (self._local_prefills if local else self._remote_prefills).inc()

    def first_token(self, timing: Timing) -> None:
        self._ttft.observe(timing.ttft_s)
        self._queue.observe(timing.queue_s)
        self._prefill.observe(timing.prefill_s)
        if timing.transfer_s:
            self._transfer.observe(timing.transfer_s)
        if timing.kv_hit_tokens:
            self._kv_hit_tokens.inc(timing.kv_hit_tokens)

    def inter_token(self, gap_s: float, num_tokens: int) -> None:
        for _ in range(num_tokens):
            self._itl.observe(gap_s / num_tokens)

    def finished(self, reason: str, timing: Timing, usage: Usage) -> None:
        self._e2e.observe(timing.e2e_s)
        self._success.labels(_ROLE, reason).inc()
        self._prompt_tokens.inc(usage.prompt_tokens)
        self._generation_tokens.inc(usage.completion_tokens)
        if timing.num_recomputes:
            self._recomputes.inc(timing.num_recomputes)

    def rejected(self) -> None:
        self._rejected.inc()

    def tenant_rejected(self, tenant: str, reason: str) -> None:
        self._tenant_rejected.labels(_ROLE, tenant, reason).inc()

    def failed(self, reason: str) -> None:
        self._failed.labels(_ROLE, reason).inc()

    def scaled(self, action: str, role: str, cause: str) -> None:
        """An elastic pool's action (cluster/elastic/): add, remove or flip, and why."""
        self._scaling.labels(action, role, cause).inc()

    def render(self, num_in_flight: int, num_queued: int, per_instance: list[list],
               health: list[tuple[str, str, bool, bool]] = ()) -> bytes:  # fmt: skip
        """One exposition: families with one name from several sources are merged (the
        text format allows each name once). `health`: (role, instance id, healthy,
        draining) each."""
        merged: dict[str, object] = {}
        sources = [list(self.registry.collect()), _gauges(num_in_flight, num_queued, health)]
        for families in [*sources, *per_instance]:
            for family in families:
                known = merged.get(family.name)
                if known is None:  # a copy: the sources' own families stay as they were
                    merged[family.name] = copy.copy(family)
                    merged[family.name].samples = list(family.samples)
                else:
                    known.samples.extend(family.samples)
        return generate_latest(_Families(list(merged.values())))


def _gauges(num_in_flight: int, num_queued: int, health=()) -> list:
    running = GaugeMetricFamily(
        "vllm:num_requests_running", "Requests in flight.", labels=["role", "instance"]
    )
    running.add_metric([_ROLE, ""], num_in_flight)
    waiting = GaugeMetricFamily(
        "vllm:num_requests_waiting", "Requests waiting for admission.", labels=["role", "instance"]
    )
    waiting.add_metric([_ROLE, ""], num_queued)
    healthy = GaugeMetricFamily(
        "pdcluster:instance_healthy",
        "1 while the router can use the instance, 0 while it is lost (readiness of each pool: "
        "a pool with none healthy makes /health 503).",
        labels=["role", "instance"],
    )
    pools = GaugeMetricFamily(
        "pdcluster:pool_instances",
        "Instances of each pool the router routes to (elastic pools: not draining).",
        labels=["role"],
    )
    draining = GaugeMetricFamily(
        "pdcluster:pool_instances_draining",
        "Instances of each pool being drained before they stop or change role.",
        labels=["role"],
    )
    counts: dict[str, list[int]] = {}
    for role, instance, ok, is_draining in health:
        healthy.add_metric([role, instance], 1.0 if ok else 0.0)
        counts.setdefault(role, [0, 0])[is_draining] += 1
    for role, (serving, leaving) in counts.items():
        pools.add_metric([role], serving)
        draining.add_metric([role], leaving)
    return [running, waiting, healthy, pools, draining]


class _Families:
    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)
