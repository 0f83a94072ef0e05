"""KV transfer metrics under vLLM's `vllm:nixl_*` names, with `role` and `engine` labels, in
a Prometheus registry the worker chooses (its /metrics endpoint serves that registry).

Decode side: transfer time, post time, bytes, descriptors per pull, failures by reason.
Prefill side: expired leases (vLLM counts them on the P instance too) and notifications that
named no live lease.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_TIME_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BYTE_BUCKETS = tuple(float(4**i * 1024) for i in range(1, 12))  # 4 KiB .. 4 GiB
_DESC_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_LABELS = ("role", "engine")


class KVTransferMetrics:
    def __init__(self, role: str, engine: str = "0", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._xfer_time = Histogram(
            "vllm:nixl_xfer_time_seconds",
            "Duration of NIXL KV cache pulls.",
            _LABELS,
            buckets=_TIME_BUCKETS_S,
            registry=r,
        ).labels(role, engine)
        self._post_time = Histogram(
            "vllm:nixl_post_time_seconds",
            "Time to post a NIXL KV cache pull.",
            _LABELS,
            buckets=_TIME_BUCKETS_S,
            registry=r,
        ).labels(role, engine)
        self._bytes = Histogram(
            "vllm:nixl_bytes_transferred",
            "Bytes moved per NIXL KV cache pull.",
            _LABELS,
            buckets=_BYTE_BUCKETS,
            registry=r,
        ).labels(role, engine)
        self._descs = Histogram(
            "vllm:nixl_num_descriptors",
            "Descriptors per NIXL KV cache pull.",
            _LABELS,
            buckets=_DESC_BUCKETS,
            registry=r,
        ).labels(role, engine)
        self._failed = Counter(
            "vllm:nixl_num_failed_transfers",
            "KV pulls that did not complete, by reason.",
            (*_LABELS, "reason"),
            registry=r,
        )
        self._expired = Counter(
            "vllm:nixl_num_kv_expired_reqs",
            "Requests whose KV lease expired unread.",
            _LABELS,
            registry=r,
        ).labels(role, engine)
        self._bad_notifs = Counter(
            "vllm:nixl_num_failed_notifications",
            "Notifications naming no live lease.",
            _LABELS,
            registry=r,
        ).labels(role, engine)
        self._labels = (role, engine)

    def transfer(self, num_bytes: int, num_descs: int, post_s: float, xfer_s: float) -> None:
        self._bytes.observe(num_bytes)
        self._descs.observe(num_descs)
        self._post_time.observe(post_s)
        self._xfer_time.observe(xfer_s)

    def failed(self, reason: str) -> None:
        self._failed.labels(*self._labels, reason).inc()

    def expired(self, num_requests: int = 1) -> None:
        self._expired.inc(num_requests)

    def unmatched_notification(self) -> None:
        self._bad_notifs.inc()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 if absent); for tests and status pages."""
        labels = {"role": self._labels[0], "engine": self._labels[1], **labels}
        return self.registry.get_sample_value(name, labels) or 0.0
