"""`cluster bench transfer` end to end on the --quick grid, with real NIXL between two real Ray
actors: the result's shape, not its speed (timings on a shared CPU say nothing a test could
hold)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.bench import transfer_bench  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROW_KEYS = {
    "total_bytes",
    "num_blocks",
    "nixl_gb_s",
    "memcpy_gb_s",
    "fraction",
    "fixed_cost_us",
    "block_bytes",
    "pattern",
    "num_descs",
    "pull_us",
    "post_us",
    "memcpy_us",
    "reps",
}


def test_quick_run_returns_the_documented_schema(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    transfer_bench.add_arguments(parser)
    output = tmp_path / "transfer.json"

    result = transfer_bench.run(parser.parse_args(["--quick", "--json", "--output", str(output)]))

    assert json.loads(capsys.readouterr().out) == result  # stdout is exactly the JSON
    assert json.loads(output.read_text()) == result
    assert result["device"] == "cpu" and result["fixed_cost_us"] > 0
    quick = transfer_bench.QUICK
    grid = transfer_bench.make_grid(quick["sizes"], quick["block_counts"])
    assert [(r["total_bytes"], r["num_blocks"], r["pattern"]) for r in result["results"]] == [
        (p.total_bytes, p.num_blocks, p.pattern) for p in grid
    ]
    for row in result["results"]:
        assert set(row) == ROW_KEYS
        assert row["nixl_gb_s"] > 0 and row["memcpy_gb_s"] > 0
        assert math.isclose(row["fraction"], row["nixl_gb_s"] / row["memcpy_gb_s"], rel_tol=1e-9)
        assert row["fixed_cost_us"] == result["fixed_cost_us"]
        assert row["block_bytes"] * row["num_blocks"] == row["total_bytes"]
        assert 1 <= row["num_descs"] <= row["num_blocks"]
        assert row["reps"] >= quick["min_reps"]
    contiguous = [r for r in result["results"] if r["pattern"] == "contiguous"]
    assert [r["num_descs"] for r in contiguous] == [1]
