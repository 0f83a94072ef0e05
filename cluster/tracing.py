"""OpenTelemetry traces of a request across its processes: the router, the decode instance
that drives the handoff and the prefill instance it calls. Off unless an OTLP endpoint is
configured (`cluster serve --otlp-traces-endpoint host:port`, config `otlp_traces_endpoint`);
then every process exports its spans over OTLP/gRPC to it.

    request (router; continues a client's W3C `traceparent`, HTTP header or gRPC metadata)
    ├── admission                         waiting for a slot
    └── attempt 1, attempt 2, ...         one per try of the failure policy
        └── handoff (decode instance)     or `generate` on a colocated / recomputing instance
            ├── wait_for_room
            ├── prefill_call
            │   └── prefill (prefill instance)
            │       ├── queue             in the prefill engine, before its first step
            │       └── compute           first step to the first token
            ├── reserve
            ├── read                      bytes, READs, descriptors, remote agent, link
            └── decode                    commit of the first token to the last token
                └── commit                the first token committed and streamed

Spans are started and ended explicitly with their parent passed along (never "the current
span"): the request path is async generators across threads and processes, where implicit
context does not follow. The context crosses a process as a W3C trace-context dict.
"""

from __future__ import annotations

import os
from typing import Any

ENDPOINT_ENV = "PD_CLUSTER_OTLP_TRACES_ENDPOINT"  # how Ray actors learn the endpoint
_EXPORT_DELAY_MS = 500

_provider = None  # the SDK's TracerProvider while tracing is on in this process
_tracer = None


def init(endpoint: str | None, service: str) -> bool:
    """Start exporting this process's spans to `endpoint` (None: stay off). Idempotent."""
    global _provider, _tracer
    if not endpoint or _provider is not None:
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    processor = BatchSpanProcessor(exporter, schedule_delay_millis=_EXPORT_DELAY_MS)
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("pd-cluster")
    return True


def init_from_env(service: str) -> bool:
    return init(os.environ.get(ENDPOINT_ENV), service)


def shutdown() -> None:
    """Export what is buffered and stop."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def enabled() -> bool:
    return _tracer is not None


class Span:
    """One span, or nothing when tracing is off (every method is then a no-op)."""

    __slots__ = ("_span",)

    def __init__(self, span: Any = None):
        self._span = span

    def child(self, name: str, **attributes: Any) -> Span:
        if self._span is None:
            return NOOP
        from opentelemetry import trace

        context = trace.set_span_in_context(self._span)
        return Span(_tracer.start_span(name, context=context, attributes=_clean(attributes)))

    def child_at(self, name: str, start_s: float, end_s: float, **attributes: Any) -> None:
        """A finished child span between two wall-clock times (time.time()) measured
        elsewhere, e.g. an engine's queue and compute of a request."""
        if self._span is None:
            return
        from opentelemetry import trace

        context = trace.set_span_in_context(self._span)
        span = _tracer.start_span(
            name, context=context, attributes=_clean(attributes), start_time=int(start_s * 1e9)
        )
        span.end(end_time=int(end_s * 1e9))

    def set(self, **attributes: Any) -> None:
        if self._span is not None:
            self._span.set_attributes(_clean(attributes))

    def fail(self, error: BaseException | str) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, str(error)))

    def end(self) -> None:
        if self._span is not None:
            self._span.end()

    def carrier(self) -> dict[str, str] | None:
        """This span as W3C trace-context headers, for the next process."""
        if self._span is None:
            return None
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        context = trace.set_span_in_context(self._span)
        TraceContextTextMapPropagator().inject(carrier, context=context)
        return carrier


NOOP = Span()


def start(name: str, parent: dict[str, str] | None = None, **attributes: Any) -> Span:
    """A span whose parent is `parent` (W3C trace-context headers from another process or a
    client), or a new trace's root."""
    if _tracer is None:
        return NOOP
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract(parent) if parent else None
    return Span(_tracer.start_span(name, context=context, attributes=_clean(attributes)))


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OTel takes str, bool, int, float (and lists of them); None is dropped."""
    return {k: v for k, v in attributes.items() if v is not None}
