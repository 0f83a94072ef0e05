"""`cluster status` as a process against a real `cluster serve` (tiny model, 1 prefill + 1
decode, API key on): the JSON and the table list every instance the router's `/metrics` names,
with its role and health; a target that is down or a wrong key is one `error:` line and exit
code 2; `--watch` redraws until SIGINT and exits 0."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.engine.parallel import free_port
from cluster.status import render

CLI = str(Path(sys.executable).parent / "cluster")
API_KEY = "s3cret"


on_cluster = pytest.mark.slow  # the tests of a real `cluster serve`: ~20 s with its start-up


@pytest.fixture(scope="module")
def served():
    from cluster.bench.local_cluster import LocalCluster

    config = {"mode": "disaggregated", "api_key": API_KEY, "engine": {"num_blocks": 128}}
    with LocalCluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def metric_instances(served) -> dict[str, str]:
    """instance id -> role, as the router's Prometheus exposition names them."""
    url = served.http_url.removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    pattern = r'^vllm:kv_cache_usage_perc\{instance="([^"]+)",role="(\w+)"\}'
    return dict(re.findall(pattern, text, flags=re.MULTILINE))


def _status(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "status", *args], capture_output=True, text=True, timeout=60, env=env
    )


@on_cluster
def test_json_lists_every_instance_with_role_and_health(served, metric_instances):
    done = _status("--target", served.target, "--api-key", API_KEY, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["mode"] == "disaggregated"
    assert status["max_requests_in_flight"] > 0 and status["max_queued_requests"] > 0
    assert [pool["role"] for pool in status["pools"]] == ["prefill", "decode"]
    seen = {}
    for pool in status["pools"]:
        for i in pool["instances"]:
            assert i["role"] == pool["role"] and i["healthy"] is True
            assert i["num_kv_blocks"] == 128 and 0 <= i["num_free_kv_blocks"] <= 128
            assert 0.0 <= i["kv_cache_usage"] <= 1.0
            assert isinstance(i["pending_prompt_tokens"], int)  # not proto-JSON's "0"
            seen[i["instance_id"]] = i["role"]
    assert seen == metric_instances and len(seen) == 2


@on_cluster
def test_table_lists_every_instance_key_from_the_environment(served, metric_instances):
    env = {**os.environ, "PD_CLUSTER_API_KEY": API_KEY}
    done = _status("--target", served.target, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "mode disaggregated" in lines[0] and "queued max" in lines[0]
    assert lines[1] == "pools: prefill 1/1 healthy, decode 1/1 healthy"
    header = next(line.split() for line in lines if line.startswith("ROLE"))
    for instance_id, role in metric_instances.items():
        (row,) = [line.split() for line in lines if instance_id in line.split()]
        cells = dict(zip(header, row, strict=True))
        assert cells["ROLE"] == role and cells["HEALTHY"] == "yes"
        assert cells["KV_FREE/TOTAL"].endswith("/128") and cells["KV_USAGE"].endswith("%")


@on_cluster
@pytest.mark.parametrize("case", ["down", "wrong-key"])
def test_unusable_target_is_one_error_line(served, case):
    target = f"127.0.0.1:{free_port()}" if case == "down" else served.target
    done = _status("--target", target, "--api-key", "wrong", "--json")
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: cannot get the status of {target}: ")
    assert ("UNAVAILABLE" if case == "down" else "UNAUTHENTICATED") in line


@on_cluster
def test_watch_redraws_until_interrupted(served):
    proc = subprocess.Popen(
        [CLI, "status", "--target", served.target, "--api-key", API_KEY, "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_frames(proc, 3, timeout_s=30)  # 3 frames: two redraws
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err


def _wait_for_frames(proc: subprocess.Popen, num_frames: int, timeout_s: float) -> None:
    """Read the watcher's output until it has drawn `num_frames` frames (one header each)."""
    deadline, seen = time.monotonic() + timeout_s, 0
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while seen < num_frames:
            assert time.monotonic() < deadline, f"{seen} frames in {timeout_s} s"
            assert proc.poll() is None, proc.stderr.read()
            if selector.select(timeout=1.0):
                seen += proc.stdout.readline().startswith("pd-cluster at ")


def test_render_marks_unhealthy_instances():
    status = pb.ClusterStatus(mode="disaggregated", max_requests_in_flight=8, max_queued_requests=4)
    pool = status.pools.add(role="decode")
    pool.instances.add(instance_id="decode-0", role="decode", healthy=True, num_kv_blocks=10,
                       num_free_kv_blocks=4, kv_cache_usage=0.6, num_running=3)  # fmt: skip
    pool.instances.add(instance_id="decode-1", role="decode", healthy=False, num_kv_blocks=10)
    lines = render(status, "host:1").splitlines()
    assert lines[1] == "pools: decode 1/2 healthy"
    assert lines[4].split() == ["decode", "decode-0", "yes", "3", "0", "0", "4/10", "60.0%", "-"]
    assert lines[5].split()[:3] == ["decode", "decode-1", "NO"]
