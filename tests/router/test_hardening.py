"""Hardening of the serving path (issue 14) against one real served cluster: Ray actors (2
prefill + 1 decode, KV over real NIXL), the router, gRPC and OpenAI HTTP on loopback.

- hostile input gets a 4xx / INVALID_ARGUMENT and the cluster keeps serving the same text;
- a request whose processing raises inside a step fails alone; an engine that dies exits its
  actor, Ray restarts it, the cluster serves again; a request that took two instances down is
  not run a third time;
- a cancel or an Abort at every step of the handoff leaves every block free on both sides and
  the requests running beside it with their exact greedy output;
- a prefill that queues longer than the lease still hands off; decode KV exhaustion is a 429
  with Retry-After, then the cluster recovers.

Faults come from cluster/faults.py (`fault_injection: true` in this deployment only): a sleep
at a named await point so a real cancel lands there, a raise where a real bug would raise,
an exit where a real crash would. Everything else is real.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
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
    served_on_ray,
    token_prompts,
    wait_until,
    wait_until_async,
)

MAX_TOKENS = 10
GREEDY = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPTS = token_prompts(8, seed=14)
DECODE_BLOCKS = 48  # small: a burst of long requests exhausts it
LEASE_S = 4.0


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), cache=CacheConfig(num_blocks=512)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    from cluster.launch import DeploymentConfig, PoolSpec
    from cluster.workers.base import TransferSettings

    config = DeploymentConfig(
        model=str(tiny_model_dir),
        prefill=PoolSpec(num_instances=2),
        decode=PoolSpec(engine={"num_blocks": DECODE_BLOCKS}),
        engine={"num_blocks": 256, "fault_injection": True},
        transfer=TransferSettings(lease_s=LEASE_S, kv_wait_s=1.0),
        router={"instance_wait_s": 120.0},
    )
    # (A dropped or late notification frees on lease expiry: up to a lease and a bit.)
    with served_on_ray(config, free_timeout_s=30.0) as served:
        yield served


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        yield pb_grpc.PDClusterStub(channel)


def request(prompt: list[int], params=GREEDY, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=params, **fields)


def generate_ids(stub, prompt, params=GREEDY, **fields) -> list[int]:
    ids = []
    for response in stub.Generate(request(prompt, params, **fields), timeout=180):
        ids += response.token_ids
    return ids


def post(served, path: str, body: bytes | dict, headers: dict | None = None):
    """(status, parsed body, headers) of a raw HTTP POST (the client would hide the wire)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        served.http_base + path,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers


def announce_body(served, num_bytes: int) -> int:
    """The status the server answers to headers announcing a body of num_bytes, before any
    of it is sent."""
    host, port = served.http_base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(num_bytes))
    conn.endheaders()
    try:
        return conn.getresponse().status
    finally:
        conn.close()


def completion(prompt="The capital of France is", **extra) -> dict:
    return {"model": "", "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}


# -- hostile input ---------------------------------------------------------------------------


def test_hostile_http_bodies_are_4xx_and_change_nothing(served, stub, reference):
    status, before, _ = post(served, "/v1/completions", completion())
    assert status == 200
    surrogate = '"\\ud800"'
    cases = [
        # (body bytes, expected status)
        (b'{"prompt": "hi", "max_tokens": 4, "cache_salt": ' + surrogate.encode() + b"}", 400),
        (b'{"prompt": ' + surrogate.encode() + b', "max_tokens": 4}', 400),
        (b'{"prompt": "hi", "stop": [' + surrogate.encode() + b"]}", 400),
        (
            b'{"messages": [{"role": "user", "content": ' + surrogate.encode() + b"}]}",
            400,
        ),
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400),
        (b'{"prompt": "hi", "temperature": NaN}', 400),
        (b'{"prompt": "hi", "temperature": 1e400}', 400),
        (b'{"prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        (b'{"prompt": "hi", "stop": ' + json.dumps(["a"] * 100).encode() + b"}", 400),
        (b'{"prompt": "hi", "stop_token_ids": ' + json.dumps([1] * 1000).encode() + b"}", 400),
        (b'{"prompt": "hi", "cache_salt": "' + b"s" * 100_000 + b'"}', 400),
        (b'{"prompt": "' + b"x" * 3_000_000 + b'"}', 400),  # over max_model_len x 16 chars
        (b'{"prompt": "hi", "priority": ' + str(2**40).encode() + b"}", 400),
        (b'{"prompt": "hi", "logprobs": 4294967295}', 400),
        (b"\xff\xfe{}", 400),
    ]
    for body, expected in cases:
        for path in ("/v1/completions", "/v1/chat/completions"):
            status, answer, _ = post(served, path, body)
            assert status == expected or (path.endswith("chat/completions") and status == 400), (
                body[:80],
                status,
                answer,
            )
            message = answer["error"]["message"]
            assert "Traceback" not in message and "actor" not in message.lower()
    assert announce_body(served, 5 * 1024 * 1024) == 413  # refused before it is sent
    status, _, _ = post(served, "/v1/completions", completion(), {"X-Request-Id": "a b"})
    assert status == 400
    status, _, _ = post(served, "/v1/completions", completion(), {"X-Request-Id": "r" * 1000})
    assert status == 400
    status, after, _ = post(served, "/v1/completions", completion())
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
    assert all(i.healthy for i in served.router.instances)
    assert generate_ids(stub, PROMPTS[0]) == reference[0]
    served.assert_all_blocks_free()


@pytest.mark.parametrize(
    "fields",
    [
        {"sampling_params": pb.SamplingParams(max_tokens=4, logprobs=4294967295)},
        {"sampling_params": pb.SamplingParams(max_tokens=4, logprobs=21)},
        {"sampling_params": pb.SamplingParams(max_tokens=4, stop=["x"] * 17)},
        {"sampling_params": pb.SamplingParams(max_tokens=4, stop=["x" * 600])},
        {"sampling_params": pb.SamplingParams(max_tokens=4, stop_token_ids=[1] * 65)},
        {"sampling_params": pb.SamplingParams(max_tokens=4, stop_token_ids=[10**9])},
        {"sampling_params": pb.SamplingParams(max_tokens=4294967295)},
        {"cache_salt": "s" * 300},
        {"request_id": "r" * 200},
        {"request_id": "line\nbreak"},
        {"priority": -(2**31), "sampling_params": pb.SamplingParams(max_tokens=4, top_k=-5)},
    ],
)
def test_hostile_grpc_fields_are_invalid_argument(stub, fields):
    fields = dict(fields)
    params = fields.pop("sampling_params", GREEDY)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request(PROMPTS[1], params, **fields), timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_cached_tokens_are_reported_in_disaggregated_mode(served, stub):
    """The prefill instance's prefix-cache hit reaches usage.cached_tokens (it was always 0:
    the decode side never looks its prompt up). Two prefill instances: of three runs, two
    land on one of them, so some run hits the cache."""
    prompt = list(range(40, 140))  # 100 tokens: 6 full blocks of 16
    params = pb.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    runs = [stub.Complete(request(prompt, params, cache_salt="grpc"), timeout=60) for _ in "abc"]
    assert runs[0].usage.cached_tokens == 0
    assert max(r.usage.cached_tokens for r in runs) == 96  # every full block
    body = completion(prompt=prompt, max_tokens=2, cache_salt="http")
    cached = [post(served, "/v1/completions", body)[1]["usage"] for _ in "abc"]
    assert max(u["prompt_tokens_details"]["cached_tokens"] for u in cached) == 96


# -- engine exceptions -------------------------------------------------------------------------


def test_a_request_that_raises_in_a_step_fails_alone(served, stub, reference):
    served.arm("decode", "engine.request", "raise", match="poison-step", count=1)
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(generate_ids, stub, p) for p in PROMPTS[:3]]
        with pytest.raises(grpc.RpcError) as e:
            generate_ids(stub, PROMPTS[3], request_id="poison-step")
        assert [f.result() for f in others] == reference[:3]
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "stopped alone" in e.value.details()
    assert all(i.healthy for i in served.router.instances)  # nobody died of it
    assert generate_ids(stub, PROMPTS[3]) == reference[3]
    served.assert_all_blocks_free()


def test_an_engine_that_dies_exits_and_comes_back(served, stub, reference):
    """The decode engine's next forward raises: its actor exits (os._exit), Ray restarts it;
    the request in flight is retried by its policy; the restarted instance serves."""
    served.arm("decode", "engine.forward", "raise", count=1)
    assert generate_ids(stub, PROMPTS[4]) == reference[4]  # recovered, same greedy output
    served.wait_healthy(timeout_s=180)
    assert generate_ids(stub, PROMPTS[5]) == reference[5]
    served.assert_all_blocks_free()


def test_failover_keeps_held_back_text_and_the_seeded_stream(served, stub, tiny_model_dir):
    """The decode instance dies mid-stream of a seeded, sampled request with a stop string:
    the retried stream (prefill of prompt + output so far, a new decode) gives exactly the
    text and tokens of a run that never failed."""
    prompt = PROMPTS[5]
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    probe = SamplingParams(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
    text = engine.generate(prompt, probe)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True, stop=[stop])
    expected = engine.generate(prompt, params)[0]
    wire = pb.SamplingParams(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True, stop=[stop])
    # The decode process dies (a crash) while processing this request's 8th sampled token.
    served.arm("decode", "engine.request", "exit", match="failover", count=1, skip=7)
    ids, got = [], ""
    stream = stub.Generate(request(prompt, wire, request_id="failover"), timeout=180)
    for response in stream:
        ids += response.token_ids
        got += response.text
    assert ids == expected.token_ids
    assert got == expected.text
    assert response.timing.num_recomputes == 1
    served.wait_healthy()
    served.assert_all_blocks_free()


def test_a_request_that_kills_two_instances_is_not_run_again(served, stub, reference):
    """Every prefill instance dies on this request's forward pass; after the second the
    router stops (INTERNAL), so the request never reaches a third engine."""
    served.arm("prefill", "engine.forward", "raise", match="poison-kill", count=1)
    with pytest.raises(grpc.RpcError) as e:
        generate_ids(stub, PROMPTS[6], request_id="poison-kill")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "not run again" in e.value.details()
    served.wait_healthy(timeout_s=180)
    assert generate_ids(stub, PROMPTS[6]) == reference[6]
    served.assert_all_blocks_free()


# -- the handoff: cancel and Abort at every step -----------------------------------------------

HANDOFF_POINTS = [
    ("decode", "decode.before_prefill"),
    ("prefill", "prefill.compute"),
    ("decode", "decode.after_handle"),
    ("decode", "decode.before_read"),
    ("decode", "decode.read"),
    ("decode", "decode.reserve"),
    ("decode", "decode.after_commit"),
]


@pytest.mark.parametrize("how", ["cancel", "abort"])
@pytest.mark.parametrize("role,point", HANDOFF_POINTS, ids=[p for _, p in HANDOFF_POINTS])
def test_cancel_at_every_handoff_step_leaks_nothing(served, stub, reference, role, point, how):
    rid = f"stop-{how}-{point}"
    before = served.hits(role, point)
    served.arm(role, point, "sleep:1.5", match=rid, count=1)
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(generate_ids, stub, p) for p in PROMPTS[:2]]
        call = stub.Generate(request(PROMPTS[7], request_id=rid), timeout=120)
        seen = pool.submit(lambda: [r for r in call])
        wait_until(lambda: served.hits(role, point) > before, 60, message=f"{point} never reached")
        if how == "cancel":
            call.cancel()
        else:
            assert stub.Abort(pb.AbortRequest(request_id=rid)).found
        try:
            responses = seen.result(timeout=60)
            assert how == "abort"
            if responses[-1].finish_reason != "abort":  # it finished before the Abort came
                assert [t for r in responses for t in r.token_ids] == reference[7]
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED
        assert [f.result() for f in others] == reference[:2]  # nobody else's KV was touched
    served.assert_all_blocks_free(timeout_s=LEASE_S + 10)
    assert generate_ids(stub, PROMPTS[7]) == reference[7]


def test_a_stopped_prefill_does_not_hold_the_request(served, stub, reference):
    """The prefill instance a request waits on is SIGSTOPped (hung, not dead): once the router
    marks it lost (its load poll goes unanswered), the request is retried elsewhere instead
    of waiting for it; after SIGCONT that instance frees what it held."""
    import os
    import signal

    prefills = served.instances("prefill")
    before = [served.call(i, "fault_hits", "prefill.compute") for i in prefills]
    served.arm("prefill", "prefill.compute", "sleep:2.0", match="hung-prefill", count=1)
    call = stub.Generate(request(PROMPTS[4], request_id="hung-prefill"), timeout=120)
    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(lambda: [t for r in call for t in r.token_ids])

        def holders() -> list:
            now = [served.call(i, "fault_hits", "prefill.compute") for i in prefills]
            return [i for i, a, b in zip(prefills, before, now, strict=True) if b > a]

        holder = wait_until(holders, 60, message="no prefill instance took the request")[0]
        pid = served.call(holder, "pid")
        os.kill(pid, signal.SIGSTOP)
        try:
            assert seen.result(timeout=90) == reference[4]
        finally:
            os.kill(pid, signal.SIGCONT)
    served.wait_healthy()
    served.assert_all_blocks_free(timeout_s=LEASE_S + 15)


# -- leases and overload -----------------------------------------------------------------------


def test_a_prefill_slower_than_the_lease_still_hands_off(served, stub, reference):
    """The prompt waits 1.5 leases before it runs: the lease starts at its grant."""
    before = served.hits("prefill", "prefill.compute")
    served.arm("prefill", "prefill.compute", f"sleep:{LEASE_S * 1.5}", match="slow", count=3)
    assert generate_ids(stub, PROMPTS[2], request_id="slow-prefill") == reference[2]
    assert served.hits("prefill", "prefill.compute") == before + 1  # first try, no retry
    served.arm("prefill", "prefill.compute", "sleep:0", match="slow", count=0)  # disarm
    served.assert_all_blocks_free()


def test_decode_kv_exhaustion_is_429_then_recovers(served, stub, reference):
    long = pb.SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    # 400 tokens + 300 out: 44 of the decode's 48 blocks. Each prompt starts differently:
    # the decode instance would share an identical prompt's cached blocks.
    prompts = [[3 + i, *range(4, 403)] for i in range(9)]

    def one(i):
        try:
            generate_ids(stub, prompts[i], long)
            return "ok"
        except grpc.RpcError as e:
            return e.code(), dict(e.trailing_metadata() or ())

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    codes = [r if r == "ok" else r[0] for r in results]
    assert "ok" in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}, codes  # never INTERNAL
    assert all(r[1].get("retry-after") for r in results if r != "ok")
    status, headers = None, None
    with ThreadPoolExecutor(3) as pool:  # over HTTP: 429 with Retry-After
        bodies = [completion(prompt=p, max_tokens=300, ignore_eos=True) for p in prompts[6:]]
        answers = list(pool.map(lambda b: post(served, "/v1/completions", b), bodies))
    for status, payload, headers in answers:
        assert status in (200, 429), (status, payload)
        if status == 429:
            assert headers["Retry-After"]
    assert generate_ids(stub, PROMPTS[0]) == reference[0]
    served.assert_all_blocks_free()


# -- without the served cluster ----------------------------------------------------------------


def test_pools_that_cannot_exchange_kv_are_refused_at_start(tiny_model_dir):
    import asyncio

    from cluster.launch import DeploymentConfig, PoolSpec, start_local

    config = DeploymentConfig(
        model=str(tiny_model_dir),
        engine={"num_blocks": 32},
        decode=PoolSpec(engine={"block_size": 32}),
    )
    with pytest.raises(ValueError, match="block_size"):
        asyncio.run(start_local(config))


def test_model_identity_tells_same_shape_weights_apart(tiny_model_dir, tmp_path):
    import shutil

    from cluster.engine.config import model_identity

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    assert model_identity(str(other)) == model_identity(str(tiny_model_dir))
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    model_identity.cache_clear()
    assert model_identity(str(other)) != model_identity(str(tiny_model_dir))


def test_abort_of_a_queued_request_stops_it_before_it_runs(tiny_model_dir):
    """max_in_flight 1: the second request queues; Abort ends it at once, and it never ran
    on an engine (no tokens, finish_reason abort)."""
    import asyncio

    from cluster.launch import create_local
    from cluster.router.types import GenerateInput

    async def scenario():
        router = await create_local(str(tiny_model_dir), mode="colocated", max_in_flight=1)
        try:
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            first = router.generate(GenerateInput(PROMPTS[0], long, request_id="running"))
            await anext(first)  # it holds the only slot
            queued = router.generate(GenerateInput(PROMPTS[1], long, request_id="queued"))
            pending = asyncio.ensure_future(anext(queued))
            await wait_until_async(lambda: router.in_flight("queued"), timeout_s=30)
            assert await router.abort("queued")
            await first.aclose()  # frees the slot: the queued one is admitted, then stops
            chunk = await asyncio.wait_for(pending, 30)
            assert chunk.finished and chunk.finish_reason == "abort" and not chunk.token_ids
            assert chunk.timing.prefill_instance == ""  # it never reached an instance
        finally:
            await router.shutdown()

    asyncio.run(scenario())


def _stream_text(engine, request_id, prompt, params, resume=None) -> tuple[list[int], str]:
    engine.add_request(request_id, prompt, params, resume=resume)
    ids, text = [], ""
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.delta_text
    return ids, text


@pytest.mark.parametrize("seed", [None, 7])
def test_a_resumed_request_continues_text_and_random_stream(tiny_model_dir, seed):
    """A run cut after k tokens and resumed on another engine (the router's retry) gives
    the same tokens and text as one that never failed: text held back for a stop string
    or a partial character is sent, a seeded stream goes on where it was."""
    from cluster.engine.llm_engine import Resume

    temperature = 0.0 if seed is None else 1.0
    prompt = PROMPTS[0]
    whole_engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    probe = SamplingParams(max_tokens=24, temperature=temperature, seed=seed, ignore_eos=True)
    ids, text = _stream_text(whole_engine, "probe", prompt, probe)
    stop = text[10:14] if len(text) > 14 else text[-2:]  # a stop string late in the text
    params = SamplingParams(
        max_tokens=24, temperature=temperature, seed=seed, ignore_eos=True, stop=[stop]
    )
    whole_ids, whole_text = _stream_text(whole_engine, "whole", prompt, params)
    for cut in range(1, len(whole_ids)):
        first = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
        first.add_request("a", prompt, params)
        got_ids, got_text = [], ""
        while len(got_ids) < cut and first.has_unfinished():
            for out in first.step():
                got_ids += out.new_token_ids
                got_text += out.delta_text
        if not first.has_unfinished():
            continue
        resumed = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
        rest_ids, rest_text = _stream_text(
            resumed, "b", prompt, params, Resume(tuple(got_ids), len(got_text))
        )
        assert got_ids + rest_ids == whole_ids, cut
        assert got_text + rest_text == whole_text, cut
        resumed.check_integrity()


def test_a_prefill_backlog_over_the_limit_is_shed_with_429(tiny_model_dir):
    import asyncio

    from cluster.launch import DeploymentConfig, start_local
    from cluster.router.router import RouterSettings
    from cluster.router.types import GenerateInput, Overloaded

    async def scenario():
        config = DeploymentConfig(
            model=str(tiny_model_dir), engine={"num_blocks": 64, "fault_injection": True}
        )
        settings = RouterSettings(max_pending_prefill_tokens=len(PROMPTS[0]) - 1)
        router = await start_local(config, settings)
        try:
            prefill = next(i for i in router.instances if i.role == "prefill")
            prefill.client.worker.inject_fault("prefill.compute", "sleep:1.0")
            params = SamplingParams(max_tokens=4, temperature=0.0)
            slow = asyncio.ensure_future(
                anext(router.generate(GenerateInput(PROMPTS[0], params, request_id="slow")))
            )
            await wait_until_async(lambda: prefill.pending_prompt_tokens > 0, timeout_s=30)
            with pytest.raises(Overloaded) as e:
                await anext(router.generate(GenerateInput(PROMPTS[1], params)))
            assert e.value.retry_after_s >= 1 and "prompt tokens queued" in str(e.value)
            assert (await slow).token_ids  # the one admitted is served
        finally:
            await router.shutdown()

    asyncio.run(scenario())


def test_grpc_bytes_that_are_not_a_valid_message_are_invalid_argument(served, stub, reference):
    """Protobuf strings must be UTF-8: a message whose cache_salt (field 7) or text (field 2)
    holds a lone-surrogate encoding or stray bytes cannot be parsed; that is the client's
    error (INVALID_ARGUMENT), and the cluster serves on."""
    with grpc.insecure_channel(served.grpc_target) as channel:
        call = channel.unary_unary("/pdcluster.v1.PDCluster/Complete")  # raw bytes both ways
        for field, payload in ((7, b"\xed\xa0\x80"), (2, b"\xff\xfe"), (1, b"\x80")):
            good = request(PROMPTS[0]).SerializeToString()
            raw = good + bytes([field << 3 | 2, len(payload)]) + payload
            with pytest.raises(grpc.RpcError) as e:
                call(raw, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)  # a length past the end
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert generate_ids(stub, PROMPTS[0]) == reference[0]
