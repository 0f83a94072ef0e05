"""An emulated 8-GPU cluster served on real Ray: OPT-13B on A100-80GB, 2 prefill instances of
TP2 (batching whole prompts, as emulate() sets them) and 1 decode instance of TP2 x PP2, each
one process sleeping the latency model's step times (time scale 1), the stand-in KV pulled
over real NIXL, the router, gRPC and HTTP on loopback. Requests complete with the
deterministic tokens an in-process emulated engine gives; colocated deployments (2 x TP4
chunked, 1 x TP8 prefill-first) give the same tokens; a prefill instance SIGKILLed with
requests on it costs them a retry, not their tokens; drain lets the requests in flight
finish; every instance's achieved step time covers its modelled one.

One Ray cluster and one disaggregated deployment serve the module; the colocated ones join it
for the determinism test and stay up to the end (deployments on one Ray cluster share its KV
registry actor, which a deployment's shutdown kills). The kill and the drain run last."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb  # noqa: E402
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc  # noqa: E402
from cluster.emulate import EmulationSettings, emulate, num_devices  # noqa: E402
from cluster.engine.config import EngineConfig  # noqa: E402
from cluster.engine.emulation import Emulation  # noqa: E402
from cluster.engine.llm_engine import LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.launch import DeploymentConfig, PoolSpec  # noqa: E402
from cluster.router.types import Unavailable  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_all_blocks_free,
    ray_router,
    router_token_ids,
    served_on_ray,
    token_prompts,
    wait_until,
    wait_until_async,
)

HARDWARE, MODEL = "A100-80GB", "OPT-13B"
MAX_TOKENS = 16
LONG_TOKENS = 64  # the drain's requests: ~1 s of emulated decode steps
PROMPTS = token_prompts(16, seed=5)
GREEDY = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def emulated(config: DeploymentConfig) -> DeploymentConfig:
    return emulate(config, EmulationSettings(HARDWARE, MODEL, time_scale=1.0))


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """LONG_TOKENS tokens of each prompt from an emulated engine in this process (another
    instance shape: TP4); a request for fewer tokens gets a prefix of them."""
    emulation = Emulation(HARDWARE, MODEL, tp=4)
    engine = LLMEngine(EngineConfig(model_runner="emulated", emulation=emulation))
    params = SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def served(ray_cluster):
    """2 prefill TP2 + 1 decode TP2 x PP2 (8 emulated GPUs), failure policy retry, fault
    points armable (the kill test holds requests on the instance it kills)."""
    config = emulated(
        DeploymentConfig(
            prefill=PoolSpec(num_instances=2, engine={"tensor_parallel_size": 2}),
            decode=PoolSpec(engine={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
            engine={"fault_injection": True},
            router={"failure_policy": "retry", "instance_wait_s": 60.0},
        )
    )
    assert num_devices(config) == 8
    with served_on_ray(config, free_timeout_s=30.0) as served:
        yield served


@contextlib.contextmanager
def colocated_router(loop, num_instances: int, engine: dict):
    """An emulated colocated deployment's router on the module's Ray cluster and loop."""
    config = DeploymentConfig(
        mode="colocated", colocated=PoolSpec(num_instances=num_instances, engine=engine)
    )
    assert num_devices(emulated(config)) == 8
    with ray_router(config, loop) as (_, router):
        yield router


@pytest.fixture(scope="module")
def colocated_chunked(served):
    """2 colocated TP4 instances, chunked prefill in 64-token steps (prompts run in chunks
    beside decodes); shut down before `served`."""
    engine = {"tensor_parallel_size": 4, "max_num_batched_tokens": 64}
    with colocated_router(served.loop, 2, engine) as router:
        yield router


@pytest.fixture(scope="module")
def colocated_prefill_first(served):
    """1 colocated TP8 instance scheduling prefill-first (whole prompts; decodes wait)."""
    engine = {"tensor_parallel_size": 8, "chunked_prefill": False}
    with colocated_router(served.loop, 1, engine) as router:
        yield router


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        yield pb_grpc.PDClusterStub(channel)


def generate_ids(stub, prompt: list[int]) -> tuple[list[int], pb.Timing]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=GREEDY)
    ids, last = [], None
    for response in stub.Generate(request, timeout=120):
        ids += response.token_ids
        last = response
    assert last.finish_reason == "length"
    return ids, last.timing


async def generate(router, prompt, max_tokens=MAX_TOKENS, streaming: asyncio.Event | None = None):
    """A request's token ids through the router; `streaming` is set at its first chunk."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return await router_token_ids(router, prompt, params, streaming)


def serve_all(loop, router) -> list[list[int]]:
    async def run():
        return await asyncio.gather(*(generate(router, p) for p in PROMPTS))

    return loop.run(run(), timeout_s=120)


def scrape(served) -> dict[str, dict[str, float]]:
    """The router's merged exposition: sample name -> {instance (or engine, or role) label,
    then "/quantile" if it has one: value}; histogram buckets left out."""
    text = served.loop.run(served.router.metrics_text()).decode()
    samples: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" in s.labels:
                continue
            key = s.labels.get("instance") or s.labels.get("engine") or s.labels.get("role", "")
            if "quantile" in s.labels:
                key += "/" + s.labels["quantile"]
            samples.setdefault(s.name, {})[key] = s.value
    return samples


def ids_of(served, role: str) -> list[str]:
    return [i.instance_id for i in served.instances(role)]


def short(ids: list[list[int]]) -> list[list[int]]:
    return [t[:MAX_TOKENS] for t in ids]


# -- serving ----------------------------------------------------------------------------------


def test_requests_complete_on_both_prefills_with_kv_over_nixl(served, stub, reference):
    """16 concurrent gRPC requests and an OpenAI one: each gets its MAX_TOKENS deterministic
    tokens; both prefill instances computed prompts; the decode instance pulled every
    request's (stand-in) KV over NIXL; every block is free afterwards."""
    import openai

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: generate_ids(stub, p), PROMPTS))
    assert [ids for ids, _ in results] == short(reference)
    prefill_ids, decode_ids = ids_of(served, "prefill"), ids_of(served, "decode")
    assert {t.prefill_instance for _, t in results} == set(prefill_ids)
    assert {t.decode_instance for _, t in results} == set(decode_ids)
    assert all(t.transfer_s > 0 for _, t in results)

    client = openai.OpenAI(base_url=served.http_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert done.usage.completion_tokens == MAX_TOKENS
    assert done.choices[0].finish_reason == "length"

    metrics = scrape(served)
    prompt_tokens = metrics["vllm:prompt_tokens_total"]
    assert all(prompt_tokens.get(i, 0) > 0 for i in prefill_ids), prompt_tokens
    (decode,) = decode_ids
    assert metrics["vllm:nixl_bytes_transferred_count"][decode] >= len(PROMPTS) + 1
    assert metrics["vllm:nixl_bytes_transferred_sum"][decode] > 0
    assert not any(metrics.get("vllm:nixl_num_failed_transfers_total", {}).values())
    served.assert_all_blocks_free()


def test_colocated_chunked_and_prefill_first_give_the_same_tokens(
    served, colocated_chunked, colocated_prefill_first, reference
):
    """The same prompts on 2 colocated TP4 instances (chunked) and on 1 colocated TP8
    instance (prefill-first): the tokens of the disaggregated deployment (and of the
    in-process engine); every block freed."""
    for router in (colocated_chunked, colocated_prefill_first, served.router):
        assert serve_all(served.loop, router) == short(reference)
    for router in (colocated_chunked, colocated_prefill_first):
        assert_all_blocks_free(served.loop, router.instances)


def test_emulated_step_times_cover_the_model(served):
    """Every instance ran emulated steps, each sleeping at least its modelled time (the
    quantiles of achieved / modelled per step are >= 1 too)."""
    serve_all(served.loop, served.router)
    metrics = scrape(served)
    steps = metrics["pdcluster:emulated_num_steps"]
    modelled = metrics["pdcluster:emulated_modelled_s"]
    achieved = metrics["pdcluster:emulated_achieved_s"]
    instance_ids = [i.instance_id for i in served.router.instances]
    assert sorted(steps) == sorted(instance_ids)
    ratio = metrics["pdcluster:emulated_step_ratio"]
    for instance in instance_ids:
        assert steps[instance] > 0 and modelled[instance] > 0, instance
        assert achieved[instance] >= modelled[instance], instance
        assert ratio[f"{instance}/p50"] >= 1.0 and ratio[f"{instance}/p99"] >= 1.0, instance


# -- failures (last: they kill and drain) -----------------------------------------------------


def test_a_prefill_killed_with_requests_on_it_retries_them(served, reference):
    """Every prompt that reaches prefill instance 0 waits there (a fault point: a queue that
    does not drain) until its process is SIGKILLed with them; under policy retry they are
    prefilled again on the other instance and complete with the same tokens. Ray restarts
    the killed instance; every block on every instance is free afterwards."""
    victim = served.instances("prefill")[0]
    pid = served.call(victim, "pid")
    served.call(victim, "inject_fault", "prefill.compute", "sleep:300", "", 0, 0)
    before = sum(scrape(served).get("pdcluster:request_recomputes_total", {}).values())

    async def run() -> list[list[int]]:
        tasks = [asyncio.ensure_future(generate(served.router, p)) for p in PROMPTS]

        async def held() -> bool:
            return await victim.client.call("fault_hits", "prefill.compute", timeout=10) > 0

        await wait_until_async(held, 60, message="no request reached the victim")
        os.kill(pid, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    assert served.loop.run(run(), timeout_s=180) == short(reference)
    after = sum(scrape(served)["pdcluster:request_recomputes_total"].values())
    assert after > before  # (the held requests failed over)

    def restarted() -> bool:
        return victim.healthy and victim.info.pid != pid

    wait_until(restarted, 120, interval_s=0.2, message="the killed instance did not come back")
    served.assert_all_blocks_free()
    assert serve_all(served.loop, served.router) == short(reference)


def test_drain_lets_requests_in_flight_finish(served, reference):
    """drain(): new requests are refused (not ready, Unavailable) while the ones streaming
    run to their end; none is left at the deadline. The router stays draining: last test."""
    router = served.router

    async def run():
        events = [asyncio.Event() for _ in PROMPTS]
        tasks = [
            asyncio.ensure_future(generate(router, p, LONG_TOKENS, e))
            for p, e in zip(PROMPTS, events, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=60)
        drain = asyncio.ensure_future(router.drain(60.0))
        await wait_until_async(lambda: not router.is_ready(), timeout_s=10)
        in_flight = (await router.cluster_status())["num_requests_in_flight"]
        with pytest.raises(Unavailable):
            await generate(router, PROMPTS[0])
        return in_flight, await drain, await asyncio.gather(*tasks)

    in_flight, left, got = served.loop.run(run(), timeout_s=120)
    assert in_flight == len(PROMPTS) and left == 0
    assert got == reference
    served.assert_all_blocks_free()
