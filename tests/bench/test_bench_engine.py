"""`cluster bench engine` end to end on the --quick workload: the result's shape, not its speed
(timings on a shared CPU say nothing a test could hold)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cluster.bench import engine_bench


def test_quick_run_returns_the_documented_schema(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    engine_bench.add_arguments(parser)
    output = tmp_path / "bench.json"
    # One thread: on a busy 2-core box, two OpenMP threads wait ~16 ms on every barrier.
    argv = ["--quick", "--json", "--concurrency", "1,3", "--threads", "1", "--output", str(output)]
    num_threads = torch.get_num_threads()

    result = engine_bench.run(parser.parse_args(argv))

    assert json.loads(capsys.readouterr().out) == result  # stdout is exactly the JSON
    assert json.loads(output.read_text()) == result
    assert set(result) == {"results", "model", "workload", "device", "torch_threads"}
    assert [r["concurrency"] for r in result["results"]] == [1, 3]
    for row in result["results"]:
        assert set(row) == {
            "concurrency",
            "engine_tok_s",
            "hf_tok_s",
            "speedup",
            "num_requests",
            "engine_s",
            "hf_s",
        }
        assert row["engine_tok_s"] > 0 and row["hf_tok_s"] > 0
        assert math.isclose(row["speedup"], row["engine_tok_s"] / row["hf_tok_s"], rel_tol=1e-9)
    quick = engine_bench.QUICK
    assert [r["num_requests"] for r in result["results"]] == [
        quick["batch1_requests"],
        quick["num_requests"],
    ]
    assert result["model"]["num_layers"] == quick["num_layers"]
    assert result["device"] == "cpu" and result["torch_threads"] == 1
    assert torch.get_num_threads() == num_threads  # --threads does not leak past the run
