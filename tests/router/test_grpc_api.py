"""The public gRPC API on loopback, against a real in-process router (colocated, tiny model).

The async server runs on an event loop in a background thread; the tests are plain sync
gRPC clients, as a user's would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer import Tokenizer
from cluster.router.grpc_server import SERVICE_NAME, start_grpc_server, to_sampling_params
from tests.helpers import LoopThread, wait_until

API_KEY = "test-key"
PROMPT = "Hello world"
GREEDY = pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
TIMEOUT_S = 30


@dataclass
class Served:
    port: int  # open
    keyed_port: int  # requires API_KEY


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from cluster.launch import create_local

    loop = LoopThread()
    servers = []
    try:
        router = loop.run(create_local(model_dir=str(tiny_model_dir), mode="colocated"))
        try:
            for api_key in (None, API_KEY):
                servers.append(loop.run(start_grpc_server(router, port=0, api_key=api_key)))
            yield Served(port=servers[0][1], keyed_port=servers[1][1])
        finally:
            for server, _ in servers:
                loop.run(server.stop(None))
            loop.run(router.shutdown())
    finally:
        loop.close()


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def keyed_channel(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.keyed_port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.PDClusterStub(channel)


@pytest.fixture(scope="module")
def greedy_reference(tiny_model_dir) -> list[int]:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return LLMEngine(EngineConfig(model=str(tiny_model_dir))).generate(PROMPT, params)[0].token_ids


def _status_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- generation -----------------------------------------------------------------------------


def test_generate_streams_what_complete_returns_and_the_engine_makes(stub, greedy_reference):
    request = pb.GenerateRequest(request_id="greedy-1", text=PROMPT, sampling_params=GREEDY)
    responses = list(stub.Generate(request, timeout=TIMEOUT_S))
    streamed = [t for r in responses for t in r.token_ids]
    assert streamed == greedy_reference
    assert {r.request_id for r in responses} == {"greedy-1"}
    *body, last = responses
    assert not any(r.finish_reason or r.HasField("usage") for r in body)
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 8 and last.usage.prompt_tokens > 0
    assert last.HasField("timing") and last.timing.e2e_s >= last.timing.ttft_s > 0

    request.request_id = "greedy-2"
    complete = stub.Complete(request, timeout=TIMEOUT_S)
    assert list(complete.token_ids) == streamed
    assert complete.text == "".join(r.text for r in responses)
    assert complete.request_id == "greedy-2"
    assert complete.finish_reason == "length"
    assert complete.usage.completion_tokens == 8
    assert complete.usage.prompt_tokens == last.usage.prompt_tokens


def test_token_ids_prompt_matches_text_prompt(stub, tiny_model_dir, greedy_reference):
    ids = Tokenizer.from_pretrained(tiny_model_dir).encode(PROMPT)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling_params=GREEDY)
    assert list(stub.Complete(request, timeout=TIMEOUT_S).token_ids) == greedy_reference


def test_stop_string_reports_its_reason(stub):
    text = stub.Complete(pb.GenerateRequest(text=PROMPT, sampling_params=GREEDY)).text
    stop = text[len(text) // 2 :][:2]
    params = pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop])
    complete = stub.Complete(pb.GenerateRequest(text=PROMPT, sampling_params=params))
    assert complete.finish_reason == "stop" and complete.stop_reason == stop
    assert stop not in complete.text


def test_logprobs_come_per_token(stub):
    params = pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    complete = stub.Complete(pb.GenerateRequest(text=PROMPT, sampling_params=params))
    assert len(complete.logprobs) == len(complete.token_ids) == 4
    for token_id, entry in zip(complete.token_ids, complete.logprobs, strict=True):
        assert entry.logprob <= 0 and len(entry.top) == 2
        assert entry.top[0].token_id == token_id  # greedy picks the most likely


def test_unset_sampling_fields_take_the_defaults():
    assert to_sampling_params(pb.SamplingParams()) == SamplingParams()
    assert to_sampling_params(pb.SamplingParams(temperature=0, top_k=0)).temperature == 0.0


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (pb.GenerateRequest(sampling_params=GREEDY), "prompt"),
        (pb.GenerateRequest(text="", sampling_params=GREEDY), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(), sampling_params=GREEDY), "prompt"),
        (pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(top_p=2)), "top_p"),
        (pb.GenerateRequest(text=PROMPT, model="no-such-model"), "no-such-model"),
        (pb.GenerateRequest(text=PROMPT, failure_policy="pray"), "failure_policy"),
    ],
    ids=["no-prompt", "empty-text", "empty-ids", "top_p", "model", "failure-policy"],
)
@pytest.mark.parametrize("method", ["Complete", "Generate"])
def test_bad_requests_are_invalid_argument(stub, request_, expected, method):
    if method == "Generate":
        code, details = _status_code(lambda: list(stub.Generate(request_, timeout=TIMEOUT_S)))
    else:
        code, details = _status_code(lambda: stub.Complete(request_, timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details


# -- aborts ---------------------------------------------------------------------------------


def _long_request(request_id: str) -> pb.GenerateRequest:
    """Several seconds of decoding on the tiny model, far longer than an abort may take."""
    params = pb.SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    return pb.GenerateRequest(request_id=request_id, text=PROMPT, sampling_params=params)


def _wait_until_idle(stub, timeout_s: float = 3) -> None:
    wait_until(
        lambda: not stub.GetClusterStatus(pb.GetClusterStatusRequest()).num_requests_in_flight,
        timeout_s,
        message="the router still holds a request",
    )


def test_abort_of_unknown_id_finds_nothing(stub):
    assert not stub.Abort(pb.AbortRequest(request_id="never-sent")).found


def test_abort_ends_a_live_stream(stub):
    stream = stub.Generate(_long_request("abort-me"), timeout=TIMEOUT_S)
    assert next(stream).request_id == "abort-me"
    assert stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    *_, last = stream  # ends cleanly, like vLLM: the last response says why
    assert last.finish_reason == "abort" and last.HasField("usage")
    _wait_until_idle(stub)


def test_client_cancel_aborts_the_request(stub):
    stream = stub.Generate(_long_request("walk-away"), timeout=TIMEOUT_S)
    next(stream)
    stream.cancel()
    _wait_until_idle(stub)
    assert not stub.Abort(pb.AbortRequest(request_id="walk-away")).found


# -- info, health, reflection ---------------------------------------------------------------


def test_model_info(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.name and info.architecture == "LlamaForCausalLM"
    assert (info.vocab_size, info.num_layers, info.dtype) == (512, 4, "float32")
    assert info.max_model_len > 0 and info.block_size > 0 and 1 in info.eos_token_ids


def test_cluster_status_lists_the_pool(stub):
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest())
    assert status.mode == "colocated" and status.max_requests_in_flight > 0
    instances = [i for pool in status.pools for i in pool.instances]
    assert instances and all(i.healthy and i.role == "colocated" for i in instances)
    assert all(i.num_kv_blocks >= i.num_free_kv_blocks > 0 for i in instances)


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_is_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_service(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listed, described = reflection.ServerReflectionInfo(iter(requests), timeout=TIMEOUT_S)
    assert SERVICE_NAME in {s.name for s in listed.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto


# -- API key --------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong")]])
def test_api_key_missing_or_wrong_is_unauthenticated(keyed_channel, metadata):
    stub = pb_grpc.PDClusterStub(keyed_channel)
    request = pb.GenerateRequest(text=PROMPT, sampling_params=GREEDY)
    for call in (
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
        lambda: list(stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S)),
    ):
        code, details = _status_code(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in details


def test_api_key_right_is_accepted_and_health_stays_open(keyed_channel):
    stub = pb_grpc.PDClusterStub(keyed_channel)
    metadata = [("authorization", f"Bearer {API_KEY}")]
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata).name
    health = health_pb2_grpc.HealthStub(keyed_channel)
    status = health.Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING
