"""`cluster bench router --quick --skip-ttft` end to end: `cluster serve` child processes with
noop engines, a gRPC client, the result's shape (timings on a shared CPU say nothing a test
could hold)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.bench import router_bench  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # ~25 s


def test_quick_overhead_run_returns_its_schema(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    router_bench.add_arguments(parser)
    output = tmp_path / "router.json"
    args = parser.parse_args(["--quick", "--skip-ttft", "--json", "--output", str(output)])
    result = router_bench.run(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert set(result["overhead"]) == {"engine", "colocated", "disaggregated"}
    for path, row in result["overhead"].items():
        assert row["num_requests"] == router_bench.QUICK["requests"], path
        assert row["ttft_p50_s"] > 0 and row["tpot_p50_s"] > 0, path
    disaggregated = result["overhead"]["disaggregated"]
    assert disaggregated["transfer_p50_s"] > 0  # the KV really moved
    assert result["overhead"]["colocated"]["transfer_p50_s"] == 0
    for mode in ("colocated", "disaggregated"):
        assert set(result["added"][mode]) == {"per_request_ms", "per_token_ms"}
    assert result["ttft"] == []
    for mode, tax in result["tax"].items():  # the serving tax: CPU of the served processes
        assert tax["generated_tokens"] == tax["num_requests"] * 32, mode
        assert tax["cpu_s"] > 0 and tax["num_processes"] >= 3, mode
        assert tax["cpu_s_per_1k_tokens"] == tax["cpu_s"] / tax["generated_tokens"] * 1000
