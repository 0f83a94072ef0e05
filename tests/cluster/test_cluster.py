"""The served cluster end to end: Ray actors for prefill and decode (KV over real NIXL), the
router, gRPC and the OpenAI HTTP API on loopback. Greedy output equals colocated and the
`transformers` reference; cancellation frees blocks on both sides; killed instances end each
request by its failure policy, never a hang; overload answers RESOURCE_EXHAUSTED / 429.

One Ray cluster and one disaggregated deployment (2 prefill + 1 decode) serve the module; the
tests that kill actors run last."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb  # noqa: E402
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc  # noqa: E402
from cluster.engine.config import CacheConfig, EngineConfig  # noqa: E402
from cluster.engine.llm_engine import LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from tests.helpers import (  # noqa: E402
    hf_greedy,
    served_on_ray,
    token_prompts,
    wait_until,
)

MAX_TOKENS = 12
GREEDY = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
NUM_BLOCKS = 256


PROMPTS = token_prompts(32)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[list[int]]:
    """transformers' greedy tokens for PROMPTS; colocated must agree with them."""
    expected = hf_greedy(str(tiny_model_dir), PROMPTS, MAX_TOKENS)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(num_blocks=512)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == expected
    return expected


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    from cluster.launch import DeploymentConfig, PoolSpec

    config = DeploymentConfig(
        model=str(tiny_model_dir),
        prefill=PoolSpec(num_instances=2),
        engine={"num_blocks": NUM_BLOCKS},
        router={"instance_wait_s": 60.0},
    )
    with served_on_ray(config) as served:
        yield served


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        yield pb_grpc.PDClusterStub(channel)


def generate_ids(stub, prompt: list[int], params=GREEDY, **fields) -> tuple[list[int], pb.Timing]:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), sampling_params=params, **fields
    )
    ids, last = [], None
    for response in stub.Generate(request, timeout=120):
        ids += response.token_ids
        last = response
    assert last.finish_reason in ("length", "stop")
    return ids, last.timing


def test_grpc_single_and_concurrent_equal_reference(served, stub, reference):
    ids, timing = generate_ids(stub, PROMPTS[0])
    assert ids == reference[0]
    assert timing.transfer_s > 0 and timing.prefill_instance.startswith("prefill")
    assert timing.decode_instance.startswith("decode")
    assert timing.ttft_s >= timing.prefill_s + timing.transfer_s
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda p: generate_ids(stub, p)[0], PROMPTS))
    assert got == reference
    served.assert_all_blocks_free()


def test_complete_and_text_prompt(stub, reference, tiny_model_dir):
    done = stub.Complete(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[1]), sampling_params=GREEDY),
        timeout=60,
    )
    assert list(done.token_ids) == reference[1]
    assert done.usage.prompt_tokens == len(PROMPTS[1])
    assert done.usage.completion_tokens == MAX_TOKENS
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(num_blocks=64)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = engine.generate("The capital of France is", params)[0]
    text = stub.Complete(
        pb.GenerateRequest(text="The capital of France is", sampling_params=GREEDY), timeout=60
    )
    assert (list(text.token_ids), text.text) == (expected.token_ids, expected.text)


def test_openai_client_concurrent_equals_reference(served, reference, tiny_model_dir):
    import openai

    async def run() -> list[list[int]]:
        client = openai.AsyncOpenAI(base_url=served.http_url, api_key="unused")

        async def one(prompt: list[int]) -> list[int]:
            stream = await client.completions.create(
                model=served.router.model_info.name,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                logprobs=0,
                extra_body={"ignore_eos": True},
            )
            texts = [c.choices[0].text async for c in stream]
            return "".join(texts)

        texts = await asyncio.gather(*(one(p) for p in PROMPTS))
        await client.close()
        return texts

    texts = asyncio.run(run())
    single = openai.OpenAI(base_url=served.http_url, api_key="unused").completions.create(
        model=served.router.model_info.name,
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(num_blocks=512)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference
    assert texts == [o.text for o in outs]
    assert single.choices[0].text == outs[0].text
    assert single.usage.completion_tokens == MAX_TOKENS


def test_cancel_mid_stream_frees_blocks_on_both_sides(served, stub):
    long = pb.SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    call = stub.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[2]), sampling_params=long),
        timeout=120,
    )
    for n, _ in enumerate(call):
        if n == 3:
            break
    call.cancel()
    served.assert_all_blocks_free()
    status = served.loop.run(served.router.cluster_status())
    assert status["num_requests_in_flight"] == 0


def test_abort_by_id_ends_stream_with_abort(served, stub):
    long = pb.SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(
        request_id="abort-me", token_ids=pb.TokenIds(ids=PROMPTS[3]), sampling_params=long
    )
    call = stub.Generate(request, timeout=120)
    next(call)
    assert stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    reasons = [r.finish_reason for r in call]
    assert reasons[-1] == "abort"
    assert not stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    served.assert_all_blocks_free()


def test_bad_requests_and_cluster_keeps_serving(stub, reference):
    cases = [
        (pb.GenerateRequest(text="", sampling_params=GREEDY), "empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 5000)), "max_model_len"),
        (pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(top_p=2)), "top_p"),
        (pb.GenerateRequest(text="hi", model="gpt-4"), "not served"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6])), "token ids"),
    ]
    for request, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in info.value.details()
    assert generate_ids(stub, PROMPTS[4])[0] == reference[4]


def test_overload_is_refused_with_resource_exhausted_and_429(served, reference):
    """A second router over the same instances, with room for one request and no queue."""
    import urllib.error
    import urllib.request

    from cluster.router.grpc_server import start_grpc_server
    from cluster.router.http_server import start_http_server, stop_http_server
    from cluster.router.router import Router, RouterSettings

    async def make():
        return Router(
            served.router.instances,
            RouterSettings(max_in_flight=1, max_queued=0),
            served.router.tokenizer,
        )

    router = served.loop.run(make())
    server, port = served.loop.run(start_grpc_server(router, port=0))
    http, http_task, http_port = served.loop.run(start_http_server(router, port=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PDClusterStub(channel)
            slow = pb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            holder = stub.Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[5]), sampling_params=slow)
            )
            next(holder)  # admitted and streaming: the only slot is taken
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(text="hi"), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            body = b'{"prompt": "hi", "max_tokens": 2}'
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as http_info:
                urllib.request.urlopen(request, timeout=30)
            assert http_info.value.code == 429
            list(holder)  # the slot frees; the next request is served
            assert generate_ids(stub, PROMPTS[6])[0] == reference[6]
    finally:
        served.loop.run(server.stop(None))
        served.loop.run(stop_http_server(http, http_task))
        served.loop.run(router.shutdown())


def test_metrics_carry_vllm_names_and_roles(served, stub):
    generate_ids(stub, PROMPTS[7])
    text = served.loop.run(served.router.metrics_text()).decode()
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:nixl_xfer_time_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    for role in ("router", "prefill", "decode"):
        assert f'role="{role}"' in text
    assert text.count("# TYPE vllm:kv_cache_usage_perc ") == 1  # merged, one family


def test_status_lists_pools(stub):
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest())
    assert status.mode == "disaggregated"
    assert {p.role: len(p.instances) for p in status.pools} == {"prefill": 2, "decode": 1}


def test_decode_pulls_a_forwarded_handle_after_renewing_its_lease(served, reference):
    """The lower-level path: a KV handle obtained from a prefill instance and handed to a
    decode instance later; the decode side renews the lease before it reads."""
    from cluster.workers.protocol import Chunk, GenerateFrom, Prefill, PrefillResult, RequestSpec

    prefill, decode = served.instances("prefill")[0], served.instances("decode")[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    spec = RequestSpec("fwd", PROMPTS[9], params)
    result = served.loop.run(prefill.client.request(Prefill(spec), PrefillResult))
    assert result.handle is not None and result.chunk is None

    async def pull() -> list:
        forward = GenerateFrom(spec, result.handle, prefill.info.address)
        return [c async for c in decode.client.stream(forward, Chunk)]

    chunks = served.loop.run(pull())
    assert [t for c in chunks for t in c.token_ids] == reference[9]
    assert chunks[0].timing.transfer_s > 0
    served.assert_all_blocks_free()


# -- failures (last: they kill actors) ----------------------------------------------------


def _stream_and_kill(stub, actor, prompt, policy: str, after: int = 3):
    """Start a long greedy stream, kill `actor` (Ray restarts it) after `after` responses,
    and return (tokens, error code or None)."""
    params = pb.SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), sampling_params=params, failure_policy=policy
    )
    ids = []
    try:
        for n, response in enumerate(stub.Generate(request, timeout=180)):
            ids += response.token_ids
            if n == after:
                kill = threading.Thread(
                    target=ray.kill, args=(actor,), kwargs={"no_restart": False}
                )
                kill.start()
        return ids, None
    except grpc.RpcError as e:
        return ids, e.code()


def test_decode_killed_mid_stream_recovers_by_policy(served, stub, tiny_model_dir):
    prompt = PROMPTS[8]
    expected = hf_greedy(str(tiny_model_dir), [prompt], 60)[0]
    for policy in ("retry", "recompute"):
        ids, code = _stream_and_kill(stub, served.actors("decode")[0], prompt, policy)
        assert code is None, f"{policy}: {code}"
        assert ids == expected, policy  # a recomputed stream is still the greedy stream
    ids, code = _stream_and_kill(stub, served.actors("decode")[0], prompt, "fail")
    assert code == grpc.StatusCode.INTERNAL
    assert ids == expected[: len(ids)] and len(ids) < 60
    served.assert_all_blocks_free(timeout_s=60)


def test_prefill_killed_request_still_served(served, stub, reference):
    """A dead prefill instance (not restarted): requests go to the other one, or are
    recomputed; every one completes correctly and the router marks the instance down."""
    victim = served.actors("prefill")[0]
    ray.kill(victim, no_restart=True)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: generate_ids(stub, p)[0], PROMPTS[:8]))
    assert got == reference[:8]

    def num_healthy_prefill() -> int:
        status = stub.GetClusterStatus(pb.GetClusterStatusRequest())
        prefill = next(p for p in status.pools if p.role == "prefill")
        return sum(i.healthy for i in prefill.instances)

    wait_until(lambda: num_healthy_prefill() == 1, timeout_s=10, interval_s=0.2)


def test_openai_fields_through_ray_workers(served):
    """The new OpenAI fields across process boundaries (Ray actors, the data plane, NIXL):
    n choices under a JSON schema with a logit bias, reproducible, every block freed."""
    import json

    import jsonschema
    import openai

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
              "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    client = openai.OpenAI(base_url=served.http_url, api_key="unused", max_retries=0)

    def ask():
        return client.completions.create(
            model=served.router.model_info.name, prompt=PROMPTS[1], max_tokens=40, n=3,
            seed=7, temperature=1.0, logit_bias={"5": -100},
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
        )  # fmt: skip

    first = ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    for choice in first.choices:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), schema)
    assert [c.text for c in ask().choices] == [c.text for c in first.choices]
    served.assert_all_blocks_free()
