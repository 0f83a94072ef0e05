"""`cluster serve` in a child process on free loopback ports, for the length of a with-block:
what the benchmarks measure when they are not pointed at a running cluster. It reads the
address line `cluster serve` prints, and stops the child with SIGINT (a graceful drain)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


class LocalCluster:
    """`config` is a `cluster serve --config` mapping; the ports are always chosen free."""

    def __init__(self, config: dict, start_timeout_s: float = 300.0, log_path: str | None = None):
        """`log_path`: the server's stderr (its logs) goes there; else nowhere."""
        self.log_path = log_path
        self.config = {
            **config,
            "grpc": {"host": "127.0.0.1", "port": 0},
            "http": {"host": "127.0.0.1", "port": 0},
        }
        self.start_timeout_s = start_timeout_s
        self.target = ""  # gRPC host:port
        self.http_url = ""  # http://host:port/v1

    def __enter__(self) -> LocalCluster:
        self._tmp = tempfile.TemporaryDirectory(prefix="pdc-bench-")
        path = Path(self._tmp.name) / "cluster.yaml"
        path.write_text(yaml.safe_dump(self.config))
        cli = Path(sys.executable).parent / "cluster"
        env = {**os.environ, "RAY_ADDRESS": ""}
        self._log = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(cli), "serve", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=self._log or subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        grpc_match = re.search(r"gRPC ([\d.]+:\d+)", line)
        http_match = re.search(r"HTTP (http://[\d.]+:\d+/v1)", line)
        if not grpc_match or not http_match:
            self.__exit__()
            raise RuntimeError(f"cluster serve did not start: {line!r}")
        self.target, self.http_url = grpc_match.group(1), http_match.group(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()
        if self._log is not None:
            self._log.close()
