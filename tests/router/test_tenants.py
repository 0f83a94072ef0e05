"""Tenants (cluster/router/tenants.py): the auth file, keys, server-side cache salts, limits,
and what each tenant may see and touch, end to end through the real HTTP and gRPC front ends
over in-process routers (colocated and disaggregated, real engines, KV over NIXL), called by
the official `openai` client and the generated gRPC stub.

The side channel of Gu et al. ("Auditing Prompt Caching in Language Model APIs", 2025) is
tested as an attacker would run it: with no client salts, a victim sends a prompt; the
attacker re-sending it must be no faster than a fresh prompt of the same length (Mann-Whitney
U over 16 pairs, not significant at 1 %) and must see cached_tokens == 0, while the victim's
own re-send hits."""

from __future__ import annotations

import hashlib
import random
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import openai
import pytest
from scipy.stats import mannwhitneyu

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.launch import create_local
from cluster.router.grpc_server import start_grpc_server
from cluster.router.http_server import start_http_server, stop_http_server
from cluster.router.tenants import Auth, Tenant, TenantLimits, TenantOverloaded, key_sha256
from cluster.router.types import Overloaded
from tests.helpers import LoopThread, wait_until

KEYS = {name: f"key-of-{name}-{i}" for i, name in enumerate(
    ("victim", "attacker", "alice", "bob", "carol", "slow", "single", "ops"))}  # fmt: skip
PROMPT_TOKENS = 160  # 10 blocks of 16
PAIRS = 16


def _sha(name: str) -> str:
    return hashlib.sha256(KEYS[name].encode()).hexdigest()


AUTH = {
    "tenants": {
        "victim": {"key_sha256": _sha("victim")},
        "attacker": {"key_sha256": _sha("attacker"), "max_priority": 5},
        "alice": {"key_sha256": _sha("alice"), "share_cache_with": ["bob"]},
        "bob": {"key_sha256": _sha("bob"), "share_cache_with": ["alice"]},
        "carol": {"key_sha256": _sha("carol"), "share_cache_with": ["alice"]},  # one-sided
        "slow": {"key_sha256": _sha("slow"), "rate_limit_rps": 0.01, "rate_limit_burst": 2},
        "single": {"key_sha256": _sha("single"), "max_in_flight": 1},
        "ops": {"key_sha256": _sha("ops"), "admin": True},
    }
}


# -- the auth file ---------------------------------------------------------------------------


def test_salts_isolate_every_tenant_unless_both_share():
    auth = Auth.from_dict(AUTH)
    salts = {name: t.cache_salt for name, t in auth.tenants.items()}
    assert salts["alice"] == salts["bob"]  # both list each other
    others = [s for name, s in salts.items() if name not in ("alice", "bob")]
    assert len(set(others)) == len(others) and salts["alice"] not in others
    assert salts["carol"] != salts["alice"]  # carol lists alice, alice does not list carol
    # the client's salt narrows the tenant's, never widens it to another tenant's
    victim, attacker = auth.tenants["victim"], auth.tenants["attacker"]
    assert victim.salt("x") != attacker.salt("x") and victim.salt("x") != victim.salt(None)
    assert victim.salt(None) == victim.cache_salt


def test_salts_are_keyed_by_the_members_keys():
    """The salt is a keyed hash: the same names with other keys give other salts, so knowing
    the tenants' names does not give their salts."""
    other = {"tenants": {n: {**s, "key_sha256": hashlib.sha256(n.encode()).hexdigest()}
                         for n, s in AUTH["tenants"].items()}}  # fmt: skip
    a, b = Auth.from_dict(AUTH), Auth.from_dict(other)
    assert all(a.tenants[n].cache_salt != b.tenants[n].cache_salt for n in a.tenants)


@pytest.mark.parametrize(
    "tenants, message",
    [
        ({"a": {"key_sha256": "00" * 31}}, "64 hex digits"),
        ({"a": {"key_sha256": "ab" * 32, "key": "x"}}, "unknown keys ['key']"),
        ({"a b": {"key_sha256": "ab" * 32}}, "tenant name"),
        ({"a": {"key_sha256": "ab" * 32, "share_cache_with": ["z"]}}, "unknown ['z']"),
        ({"a": {"key_sha256": "ab" * 32, "rate_limit_rps": 0}}, "rate_limit_rps must be >="),
        ({"a": {"key_sha256": "ab" * 32, "max_in_flight": 1.5}}, "max_in_flight must be"),
        ({"a": {"key_sha256": "ab" * 32}, "b": {"key_sha256": "AB" * 32}}, "the same key"),
        (
            {
                "a": {"key_sha256": "a1" * 32, "share_cache_with": ["b"]},
                "b": {"key_sha256": "b1" * 32, "share_cache_with": ["a", "c"]},
                "c": {"key_sha256": "c1" * 32, "share_cache_with": ["b"]},
            },
            "cache sharing must form groups",
        ),
    ],
)
def test_a_bad_auth_file_is_refused_saying_what_to_fix(tenants, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Auth.from_dict({"tenants": tenants})


def test_authenticate_finds_the_tenant_by_its_key_only():
    auth = Auth.from_dict(AUTH)
    assert auth.authenticate(f"Bearer {KEYS['alice']}").name == "alice"
    assert auth.authenticate(f"Bearer {KEYS['alice']}".encode()).name == "alice"
    for wrong in (None, "", KEYS["alice"], f"Bearer {KEYS['alice']}x", f"Basic {KEYS['alice']}",
                  f"Bearer {_sha('alice')}"):  # fmt: skip
        assert auth.authenticate(wrong) is None
    single = Auth.single_key("k")
    assert single.authenticate("Bearer k").admin and single.tenants["default"].salt("s") == "s"


def test_file_holds_only_hashes(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text(f"tenants:\n  t: {{key_sha256: {key_sha256('sekret').hex()}}}\n")
    assert Auth.from_file(path).authenticate("Bearer sekret").name == "t"
    assert "sekret" not in path.read_text()


# -- limits (a scripted clock: no sleeps) ----------------------------------------------------


def test_token_bucket_refuses_past_the_burst_and_says_when_to_retry():
    now = [100.0]
    limits = TenantLimits(clock=lambda: now[0])
    tenant = Tenant("t", b"k", rate_limit_rps=0.5, rate_limit_burst=2)
    for _ in range(2):
        with limits.admit(tenant):
            pass
    with pytest.raises(TenantOverloaded) as refused:
        with limits.admit(tenant):
            pass
    assert refused.value.reason == "rate" and refused.value.retry_after_s == 2
    now[0] += 1.0  # half a token back
    with pytest.raises(Overloaded) as again:
        with limits.admit(tenant):
            pass
    assert again.value.retry_after_s == 1
    now[0] += 1.0
    with limits.admit(tenant):
        pass


def test_in_flight_cap_holds_a_seat_until_the_request_ends():
    limits = TenantLimits(clock=lambda: 0.0)
    tenant = Tenant("t", b"k", max_in_flight=2)
    with limits.admit(tenant), limits.admit(tenant):
        with pytest.raises(TenantOverloaded) as refused:
            with limits.admit(tenant):
                pass
        assert refused.value.reason == "in_flight"
    assert limits.in_flight("t") == 0
    with limits.admit(tenant):
        assert limits.in_flight("t") == 1


def test_priority_is_raised_to_the_tenants_cap():
    tenant = Tenant("t", b"k", max_priority=5)
    assert tenant.priority(-(2**31)) == 5 and tenant.priority(0) == 5
    assert tenant.priority(9) == 9 and Tenant("u", b"k").priority(-3) == -3


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def served(request, tiny_model_dir):
    loop = LoopThread()
    call = loop.run
    router = call(create_local(model_dir=str(tiny_model_dir), mode=request.param))
    auth = Auth.from_dict(AUTH)
    http, http_task, http_port = call(start_http_server(router, port=0, auth=auth))
    grpc_server, grpc_port = call(start_grpc_server(router, port=0, auth=auth))
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield SimpleNamespace(
        mode=request.param,
        router=router,
        call=call,
        http_port=http_port,
        stub=pb_grpc.PDClusterStub(channel),
        model=router.model_info.name,
    )
    channel.close()
    call(grpc_server.stop(None))
    call(stop_http_server(http, http_task))
    call(router.shutdown())
    loop.close()


def _client(served, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1",
                         api_key=KEYS[tenant], max_retries=0, timeout=60)  # fmt: skip


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(1, 500) for _ in range(PROMPT_TOKENS)]


def _send(client: openai.OpenAI, model: str, prompt: list[int]) -> tuple[float, int]:
    """(seconds, cached prompt tokens) of a one-token completion."""
    start = time.perf_counter()
    out = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
    elapsed = time.perf_counter() - start
    return elapsed, out.usage.prompt_tokens_details.cached_tokens


def test_an_attacker_cannot_probe_a_victims_prompts(served):
    victim, attacker = _client(served, "victim"), _client(served, "attacker")
    rng = random.Random(f"probe-{served.mode}")
    probes, fresh = [], []
    for i in range(PAIRS):
        secret = _prompt(rng)
        _send(victim, served.model, secret)
        _, own_hit = _send(victim, served.model, secret)
        assert own_hit > 0, "the victim's own re-send must hit its cache"
        order = [("probe", secret), ("fresh", _prompt(rng))]
        for kind, prompt in order if i % 2 else order[::-1]:  # alternate: no drift bias
            elapsed, cached = _send(attacker, served.model, prompt)
            assert cached == 0, f"the attacker's {kind} prompt hit another tenant's cache"
            (probes if kind == "probe" else fresh).append(elapsed)
    p = mannwhitneyu(probes, fresh, alternative="less").pvalue
    assert p > 0.01, f"re-sending the victim's prompt is faster than a fresh one (p={p:.4f})"


def test_tenants_that_both_list_each_other_share_and_no_one_else(served):
    rng = random.Random(f"share-{served.mode}")
    alice, bob, carol = (_client(served, n) for n in ("alice", "bob", "carol"))
    prompt = _prompt(rng)
    _send(alice, served.model, prompt)
    assert _send(bob, served.model, prompt)[1] > 0  # mutual: shared
    assert _send(carol, served.model, prompt)[1] == 0  # carol lists alice; alice not carol
    # a client salt narrows sharing within the group
    salted = _prompt(rng)
    alice.completions.create(model=served.model, prompt=salted, max_tokens=1,
                             extra_body={"cache_salt": "mine"})  # fmt: skip
    out = bob.completions.create(model=served.model, prompt=salted, max_tokens=1)
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_a_client_salt_cannot_reach_another_tenants_cache(served):
    """Even sending the victim's server-side salt verbatim as its own cache_salt: the
    attacker's salt is prefixed with its own tenant's, so it hashes apart."""
    rng = random.Random(f"forge-{served.mode}")
    prompt = _prompt(rng)
    _send(_client(served, "victim"), served.model, prompt)
    forged = Auth.from_dict(AUTH).tenants["victim"].cache_salt
    out = _client(served, "attacker").completions.create(
        model=served.model, prompt=prompt, max_tokens=1, extra_body={"cache_salt": forged}
    )
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_unknown_keys_are_refused(served):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key="nope",
                      max_retries=0).models.list()  # fmt: skip
    with pytest.raises(grpc.RpcError) as denied:
        served.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_md("nope"))
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _md(tenant: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS.get(tenant, tenant)}")]


def _long_request(request_id: str) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    return pb.GenerateRequest(text="a long story", sampling_params=params,
                              request_id=request_id)  # fmt: skip


def test_abort_reaches_only_the_callers_own_requests(served):
    rid = f"shared-id-{served.mode}"
    victim = served.stub.Generate(_long_request(rid), metadata=_md("victim"))
    next(victim)  # running
    # the same id is free for another tenant, and its Abort does not reach the victim's
    other = served.stub.Generate(_long_request(rid), metadata=_md("alice"))
    next(other)
    found = served.stub.Abort(pb.AbortRequest(request_id=rid), metadata=_md("attacker"))
    assert not found.found
    assert served.stub.Abort(pb.AbortRequest(request_id=rid), metadata=_md("alice")).found
    assert [r.finish_reason for r in other if r.finish_reason] == ["abort"]
    rest = list(victim)
    assert rest[-1].finish_reason == "length"
    assert 1 + sum(len(r.token_ids) for r in rest) >= 400 - len(rest[0].token_ids)


def test_instance_ids_and_cluster_status_are_for_admins(served):
    request = pb.GenerateRequest(text="hello", sampling_params=pb.SamplingParams(max_tokens=2))
    tenant_view = served.stub.Complete(request, metadata=_md("victim")).timing
    admin_view = served.stub.Complete(request, metadata=_md("ops")).timing
    assert tenant_view.decode_instance == "" and tenant_view.prefill_instance == ""
    assert admin_view.decode_instance != "" and tenant_view.ttft_s > 0
    with pytest.raises(grpc.RpcError) as denied:
        served.stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=_md("victim"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert served.stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=_md("ops")).pools


def _raw_completion(served, tenant: str) -> tuple[int, dict, bytes]:
    body = f'{{"model": "{served.model}", "prompt": "hi", "max_tokens": 1}}'.encode()
    headers = {"Authorization": f"Bearer {KEYS[tenant]}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"http://127.0.0.1:{served.http_port}/v1/completions",
                                     data=body, headers=headers)  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_rate_limit_is_a_429_with_retry_after(served):
    statuses = []
    for _ in range(3):  # a burst of 2, then 0.01 requests/s: the third waits ~100 s
        status, headers, body = _raw_completion(served, "slow")
        statuses.append(status)
    assert statuses[-1] == 429, statuses
    assert int(headers["retry-after"]) >= 50 and b"rate limit" in body
    assert _raw_completion(served, "victim")[0] == 200  # other tenants are not limited
    metrics = served.call(served.router.metrics_text()).decode()
    assert 'pdcluster:tenant_requests_rejected_total{reason="rate",role="router",tenant="slow"}' \
        in metrics  # fmt: skip
    assert metrics.count("pdcluster:instance_healthy{") == len(served.router.instances)


def test_in_flight_cap_is_per_tenant(served):
    running = served.stub.Generate(_long_request(f"cap-{served.mode}"), metadata=_md("single"))
    next(running)
    status, headers, body = _raw_completion(served, "single")
    assert status == 429 and "retry-after" in headers and b"in flight" in body
    assert _raw_completion(served, "victim")[0] == 200
    running.cancel()
    wait_until(lambda: served.router.tenant_limits.in_flight("single") == 0)
    assert _raw_completion(served, "single")[0] == 200
