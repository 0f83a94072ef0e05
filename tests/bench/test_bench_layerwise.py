"""`cluster bench layerwise --quick`: two Ray actor processes, a real prefill on the engine
with per-layer readiness over NIXL notifications, whole and layer-wise pulls."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("ray")
pytest.importorskip("nixl")


def test_bench_layerwise_quick():
    from cluster.bench import layerwise_bench

    args = argparse.Namespace(
        quick=True,
        prompt_lens=None,
        num_layers=None,
        hidden_size=None,
        repeats=None,
        json=True,
        output=None,
    )
    result = layerwise_bench.run(args)
    (row,) = result["rows"]
    assert row["layerwise_reads"] == result["model"]["num_layers"]  # one READ per layer
    assert row["whole_compute_ms"] > 0 and row["pull_alone_ms"] > 0
    assert row["whole_tail_ms"] > 0  # a whole pull can only start once the prefill ended
