"""What an operator sees of a request (issue 21): one OpenTelemetry trace across the router,
the decode instance and the prefill instance (three processes, exported over real OTLP/gRPC to
a receiver in this process), failover attempts as their own spans, the KV pull's figures in
the timing every client gets, and JSON access-log lines with a stable schema."""

from __future__ import annotations

import io
import json
import logging
from concurrent import futures

import grpc
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry.proto.collector.trace.v1 import (  # noqa: E402
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from cluster import logs, tracing  # noqa: E402
from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb  # noqa: E402
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc  # noqa: E402
from tests.helpers import served_on_ray, wait_healthy, wait_until  # noqa: E402

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
PROMPT = list(range(20, 70))
GREEDY = pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
HANDOFF_SPANS = {"handoff", "wait_for_room", "prefill_call", "reserve", "read", "decode"}
PREFILL_SPANS = {"prefill", "queue", "compute"}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict] = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        {
                            "service": attrs.get("service.name", ""),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "error": span.status.code == 2,
                            "attrs": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, names: set[str], timeout_s: float = 60.0) -> list[dict]:
        """The spans of one trace, once every name in `names` has arrived."""

        def spans() -> list[dict]:
            return [s for s in self.spans if s["trace_id"] == trace_id]

        def complete() -> list[dict] | None:
            found = spans()
            return found if names <= {s["name"] for s in found} else None

        return wait_until(
            complete,
            timeout_s,
            interval_s=0.1,
            message=lambda: f"spans so far: {sorted({s['name'] for s in spans()})}",
        )


def _value(any_value):
    return (
        getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None
    )


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collected.endpoint = f"127.0.0.1:{port}"
    yield collected
    server.stop(None)


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir, receiver):
    from cluster.launch import DeploymentConfig

    config = DeploymentConfig(
        model=str(tiny_model_dir),
        engine={"num_blocks": 128, "fault_injection": True},
        router={"instance_wait_s": 120.0},
        otlp_traces_endpoint=receiver.endpoint,
    )
    try:
        with served_on_ray(config) as served:
            yield served
    finally:
        tracing.shutdown()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        yield pb_grpc.PDClusterStub(channel)


def generate(stub, request_id: str, metadata=()) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT), sampling_params=GREEDY, request_id=request_id
    )
    return list(stub.Generate(request, timeout=120, metadata=metadata))[-1]


def test_one_trace_across_router_decode_and_prefill(served, stub, receiver):
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    generate(stub, "traced", metadata=(("traceparent", traceparent),))
    names = {"request", "admission", "attempt 1", "commit"} | HANDOFF_SPANS | PREFILL_SPANS
    spans = receiver.trace(CLIENT_TRACE_ID, names)
    by_name = {s["name"]: s for s in spans}
    services = {s["name"]: s["service"] for s in spans}
    assert services["request"] == services["attempt 1"] == "pd-cluster-router"
    assert {services[n] for n in HANDOFF_SPANS} == {"pd-cluster-decode"}
    assert {services[n] for n in PREFILL_SPANS} == {"pd-cluster-prefill"}
    # the tree: client -> request -> attempt -> handoff -> (steps); prefill_call -> prefill
    parent = {s["name"]: s["parent"] for s in spans}
    span_id = {s["name"]: s["span_id"] for s in spans}
    assert parent["request"] == CLIENT_SPAN_ID
    assert parent["admission"] == parent["attempt 1"] == span_id["request"]
    assert parent["handoff"] == span_id["attempt 1"]
    for step in HANDOFF_SPANS - {"handoff"}:
        assert parent[step] == span_id["handoff"], step
    assert parent["prefill"] == span_id["prefill_call"]
    assert parent["queue"] == parent["compute"] == span_id["prefill"]
    assert by_name["queue"]["end"] <= by_name["compute"]["start"]
    assert parent["commit"] == span_id["decode"]
    # in order, within one process's clock
    order = ["wait_for_room", "prefill_call", "reserve", "read", "decode"]
    for before, after in zip(order, order[1:], strict=False):
        assert by_name[before]["end"] <= by_name[after]["start"], (before, after)
    read = by_name["read"]["attrs"]
    assert read["kv_bytes"] > 0 and read["kv_reads"] >= 1 and read["kv_descriptors"] >= 1
    assert by_name["decode"]["attrs"]["output_tokens"] == 8
    assert not any(s["error"] for s in spans)


def test_a_failover_is_its_own_attempt_span(served, stub, receiver):
    loop, router = served.loop, served.router
    decode = next(i for i in router.instances if i.role == "decode")
    loop.run(decode.client.call("inject_fault", "engine.request", "exit", "failover", 1, 2))
    last = generate(stub, "failover-traced")
    assert last.timing.num_recomputes == 1
    request = next(
        s for s in _wait(receiver, "request", "failover-traced") if s["name"] == "request"
    )
    spans = receiver.trace(request["trace_id"], {"attempt 1", "attempt 2"})
    attempts = sorted(
        (s for s in spans if s["name"].startswith("attempt")), key=lambda s: s["start"]
    )
    assert [a["name"] for a in attempts] == ["attempt 1", "attempt 2"]
    assert attempts[0]["error"] and not attempts[1]["error"]
    assert all(a["parent"] == request["span_id"] for a in attempts)
    wait_healthy(router.instances, timeout_s=120)


def _wait(receiver, name: str, request_id: str, timeout_s: float = 60.0) -> list[dict]:
    """The spans called `name` of one request, once one has arrived."""
    return wait_until(
        lambda: [
            s
            for s in receiver.spans
            if s["name"] == name and s["attrs"].get("request_id") == request_id
        ],
        timeout_s,
        interval_s=0.1,
        message=f"no {name!r} span of {request_id}",
    )


def test_the_kv_pull_figures_reach_every_client(served, stub):
    import urllib.request

    timing = generate(stub, "figures").timing
    assert timing.kv_bytes > 0 and timing.kv_reads >= 1 and timing.kv_descriptors >= 1
    assert 0 < timing.kv_read_s <= timing.transfer_s
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(
        served.http_base + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as response:
        events = [
            line[6:] for line in response.read().decode().splitlines() if line[:6] == "data: "
        ]
    usage_chunk = json.loads(events[-2])  # the last before [DONE]
    assert usage_chunk["timing"]["kv_bytes"] > 0


ACCESS_KEYS = {
    "ts", "level", "logger", "message", "event", "request_id", "tenant", "status",
    "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "queue_ms",
    "prefill_ms", "transfer_ms", "first_decode_ms", "ttft_ms", "e2e_ms", "kv_bytes",
    "kv_reads", "kv_descriptors", "kv_read_ms", "prefill_instance", "decode_instance",
    "num_failovers",
}  # fmt: skip


def test_access_log_lines_are_json_with_a_stable_schema(served, stub):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logs.ACCESS.addHandler(handler)
    logs.ACCESS.setLevel(logging.INFO)
    try:
        generate(stub, "logged")
        bad = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=PROMPT), sampling_params=GREEDY, request_id="logged-bad",
            failure_policy="fail",
        )  # fmt: skip
        loop, router = served.loop, served.router
        decode = next(i for i in router.instances if i.role == "decode")
        loop.run(decode.client.call("inject_fault", "engine.request", "raise", "logged-bad"))
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(bad, timeout=60))
    finally:
        logs.ACCESS.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    ok = next(e for e in lines if e["event"] == "request" and e["request_id"] == "logged")
    assert ACCESS_KEYS <= set(ok), ACCESS_KEYS - set(ok)
    assert ok["status"] == "ok" and ok["completion_tokens"] == 8 and ok["kv_bytes"] > 0
    failed = next(e for e in lines if e["event"] == "request_failed")
    assert failed["request_id"] == "logged-bad" and failed["reason"] == "engine"
    assert failed["level"] == "warning" and failed["status"] == "error"


def test_log_formats(capsys):
    handler = logs.configure("text")
    try:
        logs.event("request", request_id="r1", status="ok", ttft_ms=1.5)
        text = capsys.readouterr().err.strip().splitlines()[-1]
        assert "pdcluster.access: request" in text and "request_id=r1" in text
        logs.configure("json")
        logs.event("request", request_id="r2", status="ok")
        entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert entry["request_id"] == "r2" and entry["event"] == "request"
    finally:
        logging.getLogger().removeHandler(handler)
        for h in [h for h in logging.getLogger().handlers if getattr(h, "_pdcluster", False)]:
            logging.getLogger().removeHandler(h)
    with pytest.raises(ValueError):
        logs.configure("xml")


def test_an_http_client_trace_continues(served, receiver):
    import urllib.request

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    req = urllib.request.Request(
        served.http_base + "/v1/completions",
        data=json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
        headers={
            "Content-Type": "application/json",
            "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
        },
    )
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.status == 200
    spans = receiver.trace(trace_id, {"request", "handoff", "prefill"})
    request = next(s for s in spans if s["name"] == "request")
    assert request["parent"] == "b7ad6b7169203331"
