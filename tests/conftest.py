"""Shared fixtures: the tiny default model, random-weight checkpoints of each supported
family (written by `transformers` itself, so our loader reads real Hugging Face folders) and
one Ray cluster per test module. Plain helpers (polling, the `transformers` reference, a
deployment served on Ray) are in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Keep the embedded default out of ~/.cache and never let transformers reach for a hub.
os.environ.setdefault("PD_CLUSTER_CACHE", tempfile.mkdtemp(prefix="pd-cluster-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tests.helpers import write_family_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cluster.engine.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, tiny_model_dir):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(family)
            cache[family] = write_family_model(family, out, tiny_model_dir)
        return cache[family]

    return make


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the test module (2 CPUs, no dashboard, worker logs kept off
    the driver); yields the `ray` module and shuts the cluster down after the module's last
    test. A module serving a deployment takes it before its own served fixture, so the
    deployment stops first."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# Leave without finalizing the interpreter once pytest has reported everything. Native
# libraries (NIXL/UCX, Ray's core worker) keep daemon threads; one caught inside a call that
# released the GIL when the interpreter finalizes aborts the process (exit 134) after every
# test passed (seen on 2026-11-30 in CI). The workers also stop their own housekeeping at
# exit (workers/base.py), but no library's threads are ours to join.
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config):
    if _exit_status and not os.environ.get("PD_CLUSTER_TEST_FINALIZE"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
