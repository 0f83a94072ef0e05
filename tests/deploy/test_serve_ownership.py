"""Under Ray Serve the pools are not the ingress replica's to lose (deploy/serve_app.py): an
instance that crashes leaves the replica and the other pools alone, a replica that Serve
restarts re-attaches to the running pools, and deleting the application ends them. One Serve
application on the module's Ray cluster; the tests run in order, each from where the last left
it."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

from cluster.deploy.serve_app import pool_tag
from cluster.engine.parallel import free_port
from tests.helpers import wait_until

APP = "pd cluster/test"  # a name that needs quoting in the pools' actor names
PROMPT = [5, 17, 42, 99, 7]
LONG = 1000  # tokens of the stream that outlives a prefill crash (seconds on the tiny model)


def _config(model_dir, **changes) -> dict:
    return {
        "model": str(model_dir),
        "served_model_name": "tiny",
        "engine": {"device": "cpu"},
        "prefill": {"num_instances": 1},
        "decode": {"num_instances": 1},
        # no healthy prefill for a second: a clean 503, not a wait for the restart
        "router": {"instance_wait_s": 1.0},
        **changes,
    }


def test_pool_tag_follows_the_pool_settings_only():
    config = {"model": "/m", "prefill": {"num_instances": 1}, "router": {"max_in_flight": 8}}
    tag = pool_tag("app", config)
    assert tag == pool_tag("app", dict(reversed(config.items())))
    assert tag == pool_tag("app", {**config, "router": {"max_in_flight": 9}, "api_key": "k"})
    assert tag != pool_tag("app", {**config, "prefill": {"num_instances": 2}})
    assert tag != pool_tag("app2", config)
    assert pool_tag("a b", config) != pool_tag("a_b", config)  # quoted, never folded


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    serve = pytest.importorskip("ray.serve")
    from cluster.deploy.serve_app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(_config(tiny_model_dir)), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_an_instance_crash_leaves_the_replica_and_the_other_pool_alone(served, ray_cluster):
    ray, serve = ray_cluster, pytest.importorskip("ray.serve")
    replica = _replica(ray)
    prefill, decode = _instance(ray, "prefill"), _instance(ray, "decode")
    prefill_pid, decode_pid = _pid(ray, prefill), _pid(ray, decode)
    stream = _Stream(served, LONG)
    assert stream.started.wait(120) and stream.error is None, stream.error

    ray.kill(prefill, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
    wait_until(lambda: _health(served) == 503, 30, message="/health never reported the loss")
    num_chunks = stream.num_chunks
    assert serve.get_app_handle(APP).check_health.remote().result(timeout_s=30) is None
    status, _ = _complete(served, 8)
    assert status == 503  # no healthy prefill: a clean refusal, not a hang

    stream.join(120)
    assert stream.error is None
    assert stream.num_chunks > num_chunks  # it ran across the crash, to the last token
    assert stream.usage["completion_tokens"] == LONG
    assert _pid(ray, decode) == decode_pid  # the decode pool was left alone
    assert _replica(ray) == replica  # Serve did not restart the replica
    wait_until(lambda: _health(served) == 200, 120, message="the prefill never came back")
    assert _instance(ray, "prefill")._actor_id == prefill._actor_id
    assert _pid(ray, prefill) != prefill_pid  # (restarted by Ray, in a new process)
    status, body = _complete(served, 8)
    assert status == 200 and body["usage"]["completion_tokens"] == 8
    assert serve.status().applications[APP].status == "RUNNING"


@pytest.mark.slow
def test_an_instance_killed_for_good_is_started_again(served, ray_cluster):
    ray = ray_cluster
    wait_until(lambda: _health(served) == 200, 120, message="not ready to start with")
    decode, replica = _instance(ray, "decode"), _replica(ray)

    ray.kill(decode, no_restart=True)  # Ray will not bring it back: the router starts it anew

    def started_again() -> bool:
        instance = _instance(ray, "decode")
        return instance is not None and instance._actor_id != decode._actor_id

    wait_until(started_again, 60, message="the decode instance was never started again")
    wait_until(lambda: _health(served) == 200, 120, message="the new decode never got ready")
    assert _replica(ray) == replica
    assert _complete(served, 8)[0] == 200


@pytest.mark.slow
def test_a_restarted_replica_re_attaches_to_the_running_pools(served, ray_cluster):
    ray = ray_cluster
    wait_until(lambda: _health(served) == 200, 120, message="not ready to start with")
    instances = {role: _instance(ray, role) for role in ("prefill", "decode")}
    pids = {role: _pid(ray, actor) for role, actor in instances.items()}
    _, before = _complete(served, 12)
    replica = _replica(ray)

    ray.kill(ray.get_actor(replica[0], namespace="serve"), no_restart=True)  # as an OOM would
    wait_until(lambda: _replica(ray) not in (None, replica), 120, message="no new replica")
    wait_until(lambda: _health(served) == 200, 180, message="the new replica never got ready")

    for role, actor in instances.items():
        assert _instance(ray, role)._actor_id == actor._actor_id
        assert _pid(ray, actor) == pids[role]  # the same process: neither pool restarted
    status, after = _complete(served, 12)
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]


@pytest.mark.slow
def test_a_redeploy_with_other_router_settings_keeps_the_pools(served, ray_cluster,
                                                               tiny_model_dir):  # fmt: skip
    ray, serve = ray_cluster, pytest.importorskip("ray.serve")
    from cluster.deploy.serve_app import build

    pids = {role: _pid(ray, _instance(ray, role)) for role in ("prefill", "decode")}
    replica = _replica(ray)
    router = {"instance_wait_s": 1.0, "max_in_flight": 64}
    serve.run(build(_config(tiny_model_dir, router=router)), name=APP, route_prefix="/")

    # a new replica (new args) over the same pools, once the old one drained and went
    wait_until(lambda: _replica(ray) not in (None, replica), 60, message="no new replica")
    assert {role: _pid(ray, _instance(ray, role)) for role in pids} == pids
    assert _complete(served, 8)[0] == 200


@pytest.mark.slow
def test_a_redeploy_with_other_pool_settings_replaces_the_pools(served, ray_cluster,
                                                                tiny_model_dir):  # fmt: skip
    ray, serve = ray_cluster, pytest.importorskip("ray.serve")
    from cluster.deploy.serve_app import build

    old = {_names(ray, role)[0] for role in ("prefill", "decode")}
    config = _config(tiny_model_dir, transfer={"lease_s": 31})
    serve.run(build(config), name=APP, route_prefix="/")  # (returns with the new pools up)

    def replaced() -> bool:
        return not old & {name for role in ("prefill", "decode") for name in _names(ray, role)}

    wait_until(replaced, 120, message="the old config's pools were never stopped")
    tag = pool_tag(APP, config)
    assert all(
        _names(ray, role) == [f"pd-cluster-{role}-0-{tag}"] for role in ("prefill", "decode")
    )
    assert _complete(served, 8)[0] == 200


@pytest.mark.slow
def test_deleting_the_application_ends_its_pools(served, ray_cluster):
    ray, serve = ray_cluster, pytest.importorskip("ray.serve")
    assert _instance(ray, "prefill") is not None
    serve.delete(APP)
    assert _instance(ray, "prefill") is None and _instance(ray, "decode") is None


# -- helpers ------------------------------------------------------------------------------------


def _names(ray, role: str) -> list[str]:
    """The actor names of the app's instances of `role`, whatever their config."""
    head = f"pd-cluster-{role}-0-{quote(APP, safe='')}-"
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "pd-cluster" and a["name"].startswith(head)
    ]


def _instance(ray, role: str):
    """The app's instance actor of `role` (one each here), or None."""
    names = _names(ray, role)
    assert len(names) <= 1, names
    return ray.get_actor(names[0], namespace="pd-cluster") if names else None


def _pid(ray, actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _replica(ray) -> tuple[str, int] | None:
    """The app's replica: its actor name (new for each replica Serve starts) and pid."""
    head = f"SERVE_REPLICA::{APP}#PDClusterIngress#"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(head)
    ]
    if len(names) != 1:
        return None
    try:
        return names[0], _pid(ray, ray.get_actor(names[0], namespace="serve"))
    except Exception:  # noqa: BLE001 - it died between the two looks
        return None


def _health(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _request(base: str, max_tokens: int, stream: bool = False) -> urllib.request.Request:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def _complete(base: str, max_tokens: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(_request(base, max_tokens), timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class _Stream(threading.Thread):
    """A streamed completion read on a thread: `started` at its first chunk; its chunks
    counted, and its usage (the last chunk)."""

    def __init__(self, base: str, max_tokens: int):
        super().__init__(daemon=True)
        self.request = _request(base, max_tokens, stream=True)
        self.started = threading.Event()
        self.num_chunks, self.usage, self.error = 0, None, None
        self.start()

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=300) as response:
                for line in response:
                    self._read(line.decode().strip())
        except Exception as e:  # noqa: BLE001 - the test reports it
            self.error = e
        finally:
            self.started.set()  # (so that no one waits on a stream that failed)

    def _read(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:  # (a stream that fails after its first token says so here)
            raise RuntimeError(chunk["error"])
        self.usage = chunk.get("usage") or self.usage
        self.num_chunks += 1
        self.started.set()
