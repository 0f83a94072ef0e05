"""`cluster bench compare --emulate`: the pieces that turn runs on an emulated cluster into
real-world numbers and goodput, and one end-to-end run of the smallest comparison."""

from __future__ import annotations

import json

import pytest

from cluster.bench.emulated_bench import crossing
from cluster.bench.serve_bench import to_real_world
from cluster.cli import main


def test_to_real_world_scales_rates_up_and_times_down():
    run = {
        "request_rate": 2.0, "duration": 50.0, "request_throughput": 1.5,
        "request_goodput": 1.0, "output_throughput": 300.0, "total_token_throughput": 900.0,
        "mean_ttft_ms": 800.0, "p99_tpot_ms": 120.0, "attainment": 0.9,
        "ttfts": [0.4, None], "tpots": [0.05, None], "itls": [[0.1, 0.2], []],
        "e2els": [2.0, None], "breakdown_ms": {"queue": 10.0},
        "breakdowns": [{"prefill": 0.2}, None],
    }  # fmt: skip
    out = to_real_world(run, 4.0)
    assert out["request_rate"] == 8.0 and out["output_throughput"] == 1200.0
    assert out["duration"] == 12.5 and out["mean_ttft_ms"] == 200.0 and out["p99_tpot_ms"] == 30.0
    assert out["ttfts"] == [0.1, None] and out["itls"] == [[0.025, 0.05], []]
    assert out["breakdown_ms"] == {"queue": 2.5} and out["breakdowns"] == [{"prefill": 0.05}, None]
    assert out["attainment"] == 0.9 and out["time_scale"] == 4.0
    assert to_real_world(run, 1.0) is run


def test_crossing_interpolates_to_the_first_miss():
    assert crossing([(10, 1.0), (20, 0.95), (30, 0.85)], 0.9) == pytest.approx(25.0)
    assert crossing([(10, 1.0), (20, 0.95)], 0.9) == 20  # never missed: the highest rate
    assert crossing([(10, 0.5), (20, 0.95)], 0.9) == 0.0  # missed at the lowest rate
    # a pass above a miss is noise, not capacity
    assert crossing([(10, 1.0), (20, 0.8), (30, 0.95)], 0.9) == pytest.approx(15.0)


@pytest.mark.slow
def test_compare_emulate_measures_beside_the_simulator(capsys, tmp_path):
    """The smallest comparison: 4 emulated A100s, only the planner's disaggregated plan, one
    rate, at full speed (time scale 1)."""
    code = main([
        "bench", "compare", "--emulate", "A100-80GB", "--model", "OPT-13B", "--nodes", "1",
        "--gpus-per-node", "4", "--workload", "chatbot", "--ttft", "0.25", "--tpot", "0.1",
        "--time-scale", "1", "--only", "planner dis", "--rate-fractions", "0.5",
        "--num-prompts", "8", "--min-prompts", "8", "--no-progress", "--json",
        "--output-dir", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["emulated"]["hardware"] == "A100-80GB"
    (dep,) = result["deployments"]
    assert dep["name"] == "planner disaggregated" and dep["num_gpus"] == 4
    (point,) = dep["curve"]
    assert point["completed"] == point["num_prompts"] == 8
    assert 0 <= point["attainment"] <= 1 and 0 <= point["predicted_attainment"] <= 1
    assert dep["emulator"]["steps"] > 0 and dep["emulator"]["achieved_over_modelled"] >= 1.0
    assert "emulated" in (tmp_path / "report.html").read_text()
