"""`cluster bench chaos --quick`: 40 s of open-loop greedy load on a real disaggregated
deployment (2 prefill + 2 decode, decode TP=2) while actors, ranks and notifications fail.
Nothing may hang, no completed stream may differ from the colocated reference, and every
block on every instance must be free afterwards (issue 14)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.bench import chaos_bench  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # ~55 s: a 40 s chaos run


def test_quick_chaos_run_neither_hangs_nor_corrupts_nor_leaks(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    chaos_bench.add_arguments(parser)
    output = tmp_path / "chaos.json"
    argv = ["--quick", "--tp-decode", "2", "--json", "--output", str(output)]
    result = chaos_bench.run(parser.parse_args(argv))
    assert not ray.is_initialized()  # the bench stopped the Ray cluster it started

    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text()) == json.loads(json.dumps(result))
    keys = {"requests", "completed", "failed", "hung", "wrong", "leaked_blocks", "faults"}
    assert keys <= set(result)
    assert result["requests"] > 0
    assert sum(n for kind, n in result["faults"].items() if kind != "skipped") >= 1
    assert result["hung"] == 0, result["errors"]
    assert result["wrong"] == 0
    assert result["completed"] + result["failed"] == result["requests"]
    assert result["recovered_s"] is not None  # every instance served again after the load
    assert result["integrity_errors"] == {}
    assert result["unchecked_instances"] == {}
    assert result["leaked_blocks"] == 0, result["leaked_by_instance"]
    # Not asserted: completed >= 95 % of requests (the goal). On a 2-core runner a
    # restart (model load, NIXL agent, TP rendezvous) takes long enough that a request can
    # use up its attempts while both instances of a pool are down; the 10-minute run in
    # docs/benchmarks.md reports the ratio instead.
