"""`cluster serve` as a user runs it: a process that starts Ray, the pools and both APIs, says
where it listens, serves `cluster generate` and the HTTP API, and stops cleanly on SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("ray")
pytest.importorskip("nixl")

BIN = os.path.dirname(sys.executable)


def test_serve_generate_and_stop(tiny_model_dir, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nengine: {{num_blocks: 128}}\n"
        "grpc: {host: 127.0.0.1, port: 0}\nhttp: {host: 127.0.0.1, port: 0}\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ""}
    server = subprocess.Popen(
        [f"{BIN}/cluster", "serve", "--config", str(config), "--api-key", "k3y"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()  # blocks until serving (or the process dies)
        match = re.search(r"gRPC 127\.0\.0\.1:(\d+), HTTP http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        assert "disaggregated: 1 prefill + 1 decode" in line and "API key required" in line
        grpc_port, http_port = match.groups()
        args = [f"{BIN}/cluster", "generate", "Hello", "--max-tokens", "5", "--ignore-eos"]
        args += ["--target", f"127.0.0.1:{grpc_port}", "--json"]
        denied = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        done = subprocess.run(
            args + ["--api-key", "k3y"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert len(result["token_ids"]) == 5 and result["finish_reason"] == "length"
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/models", headers={"Authorization": "Bearer k3y"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == tiny_model_dir.name
    finally:
        server.send_signal(signal.SIGINT)
        start = time.monotonic()
        code = server.wait(timeout=60)
    assert code == 0
    assert time.monotonic() - start < 60
