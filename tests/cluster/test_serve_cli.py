"""`cluster serve` as a user runs it: a process that starts Ray, the pools of a placement plan
whose prefill and decode layouts differ (prefill TP=2, decode PP=2: the KV is re-sharded on
every transfer) and both APIs, says where it listens, serves `cluster generate` (the output
of a one-rank engine) and the HTTP API, drains on SIGTERM (refuses new requests, finishes the
ones in flight) and stops cleanly. Its API key comes from a file and never shows in any
process's command line or in any log."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import wait_until

pytest.importorskip("ray")
pytest.importorskip("nixl")

pytestmark = pytest.mark.slow  # ~25 s: a cluster start-up with TP=2 and PP=2 pools, a drain

BIN = os.path.dirname(sys.executable)
KEY = secrets.token_hex(16)


def test_serve_generate_and_stop(tiny_model_dir, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nengine: {{num_blocks: 128}}\n"
        "grpc: {host: 127.0.0.1, port: 0}\nhttp: {host: 127.0.0.1, port: 0}\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "mode: disaggregated\n"
        "prefill: {num_instances: 1, tensor_parallel_size: 2, pipeline_parallel_size: 1}\n"
        "decode: {num_instances: 1, tensor_parallel_size: 1, pipeline_parallel_size: 2}\n"
    )
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("PD_CLUSTER_API_KEY", None)
    serve = [f"{BIN}/cluster", "serve", "--config", str(config), "--plan", str(plan)]
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [*serve, "--api-key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()  # blocks until serving (or the process dies)
        match = re.search(r"gRPC 127\.0\.0\.1:(\d+), HTTP http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        assert "disaggregated: 1 prefill (TP2 x PP1) + 1 decode (TP1 x PP2)" in line
        assert "API key required" in line
        grpc_port, http_port = match.groups()
        # (a prompt whose greedy continuation changes token midway: it depends on the KV)
        prompt = "The quick brown fox jumps over the lazy dog"
        generate = [f"{BIN}/cluster", "generate", prompt, "--max-tokens", "8"]
        generate += ["--ignore-eos", "--temperature", "0", "--json"]
        args = generate + ["--target", f"127.0.0.1:{grpc_port}"]
        denied = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        keyed = {**env, "PD_CLUSTER_API_KEY": KEY}
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=keyed)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert len(result["token_ids"]) == 8 and result["finish_reason"] == "length"
        local = subprocess.run(generate + ["--local", "--model", str(tiny_model_dir)],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert local.returncode == 0, local.stderr
        assert result["token_ids"] == json.loads(local.stdout)["token_ids"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == tiny_model_dir.name
        assert not _command_lines_with(KEY), "the API key shows in the process list"
        _check_drain(server, http_port, tiny_model_dir.name)
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    assert code == 0
    logs = [log, *_ray_session_logs()]
    assert not [p for p in logs if KEY.encode() in p.read_bytes()], "the API key was logged"


def _command_lines_with(text: str) -> list[str]:
    """Every process's command line (what `ps` shows) that holds `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if text in line:
            found.append(line)
    return found


def _ray_session_logs() -> list[Path]:
    """The log files of the newest local Ray session (the one the server started)."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    return [p for p in logs.rglob("*") if p.is_file()] if logs.is_dir() else []


def _post(http_port: str, body: dict):
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=60)


def _check_drain(server: subprocess.Popen, http_port: str, model: str) -> None:
    """SIGTERM while a request streams: the stream completes, a new request gets 503, and
    the process exits 0 once nothing is in flight."""
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 400, "stream": True}
    body.update(ignore_eos=True, stream_options={"include_usage": True})
    stream = _post(http_port, body)
    assert stream.readline().startswith(b"data:")  # the request is in flight
    server.send_signal(signal.SIGTERM)

    def refused() -> urllib.error.HTTPError | None:
        """The error a new request gets (None: served, the signal not handled yet)."""
        try:
            with _post(http_port, {"model": model, "prompt": [5], "max_tokens": 2}) as answer:
                answer.read()
        except urllib.error.HTTPError as e:
            return e
        return None

    error = wait_until(refused, timeout_s=30, interval_s=0.1, message="never refused")
    assert error.code == 503 and b"draining" in error.read()
    events = [line for line in stream.read().splitlines() if line.startswith(b"data: {")]
    usage = json.loads(events[-1][6:])["usage"]
    assert usage["completion_tokens"] == 400
    assert server.wait(timeout=60) == 0
