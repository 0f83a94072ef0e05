"""`cluster bench serve`: metrics and goodput on synthetic records with known answers, then a
short real run against `cluster serve` (tiny model, loopback) over gRPC and HTTP, and clear
errors for a target that is down or refuses."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cluster.bench.loadgen import RequestRecord
from cluster.bench.serve_bench import VLLM_KEYS, goodput_search
from cluster.bench.serve_metrics import (
    attainment,
    attainment_curve,
    goodput_from_curve,
    rescore,
    summarize_run,
)
from cluster.cli import main

SLO = {"ttft_s": 0.5, "tpot_s": 0.05, "attainment": 0.9}


def _record(ttft, e2e, tokens, error=""):
    r = RequestRecord(input_len=10, output_len=tokens)
    r.ttft_s, r.e2e_s, r.num_output_tokens, r.error = ttft, e2e, tokens, error
    r.itls_s = [(e2e - ttft) / max(tokens - 1, 1)] * (tokens - 1) if ttft is not None else []
    return r


def test_attainment_is_joint_and_counts_failures():
    records = [
        _record(0.1, 0.1 + 9 * 0.01, 10),  # meets both
        _record(0.6, 0.6 + 9 * 0.01, 10),  # TTFT miss
        _record(0.1, 0.1 + 9 * 0.10, 10),  # TPOT miss
        _record(0.4, 0.4, 1),  # one token: no TPOT to miss
        _record(None, 0.2, 0, error="UNAVAILABLE: gone"),  # failed: misses both
    ]
    assert attainment(records, 0.5, 0.05) == pytest.approx(2 / 5)
    assert attainment(records, 0.5, None) == pytest.approx(3 / 5)
    assert attainment(records, None, 0.05) == pytest.approx(3 / 5)
    run = summarize_run(records, duration_s=2.0, request_rate=2.5, slo=SLO)
    assert run["completed"] == 4 and run["failed"] == 1
    assert run["request_goodput"] == pytest.approx(2 / 2.0)
    assert run["request_throughput"] == pytest.approx(4 / 2.0)
    assert run["attainment"] == pytest.approx(0.4)
    ttfts_ms = np.array([0.1, 0.6, 0.1, 0.4]) * 1e3
    assert run["p90_ttft_ms"] == pytest.approx(np.percentile(ttfts_ms, 90))
    assert run["median_tpot_ms"] == pytest.approx(np.median([10, 10, 100]))
    assert rescore(run, {"ttft_s": 1.0, "tpot_s": 1.0}) == pytest.approx(4 / 5)


def test_goodput_reads_the_curve_conservatively():
    curve = attainment_curve(
        [
            {"request_rate": r, "attainment": a, "ttft_attainment": a, "tpot_attainment": a}
            for r, a in [(1, 1.0), (2, 0.95), (2, 0.91), (4, 0.85), (8, 0.92), (3, 0.9)]
        ]
    )
    assert [p["rate"] for p in curve] == [1, 2, 3, 4, 8]
    assert curve[1]["attainment"] == pytest.approx(0.93) and curve[1]["trials"] == 2
    # 8 req/s passes by luck above a failure at 4: not counted.
    assert goodput_from_curve(curve, 0.9) == 3
    assert goodput_from_curve(curve, 0.99) == 1
    assert goodput_from_curve([{"rate": 1, "attainment": 0.5}], 0.9) == 0.0


@pytest.mark.parametrize("capacity", [0.37, 3.7, 37.0])
def test_goodput_search_brackets_the_knee(capacity):
    probed = []

    async def attain(rate):
        probed.append(rate)
        return 0.99 if rate <= capacity else 0.2

    asyncio.run(goodput_search(attain, 0.9, start=1.0, max_trials=20, tolerance=0.1))
    passed = [r for r in probed if r <= capacity]
    failed = [r for r in probed if r > capacity]
    assert max(passed) <= capacity < min(failed) <= 1.1 * max(passed) * 1.0001


# --- a real cluster ----------------------------------------------------------------------------


on_cluster = pytest.mark.slow  # the served tests: ~30 s with the cluster's start-up


@pytest.fixture(scope="module")
def served():
    from cluster.bench.local_cluster import LocalCluster

    config = {"mode": "disaggregated", "api_key": "s3cret", "engine": {"num_blocks": 512}}
    with LocalCluster(config) as cluster:
        yield cluster


ARGS = [
    *("--ttft", "0.5", "--tpot", "0.05", "--duration", "3", "--min-prompts", "8"),
    *("--num-prompts", "12", "--length-scale", "0.1", "--no-progress", "--api-key", "s3cret"),
]


def _bench(capsys, *args):
    code = main(["bench", "serve", *args, *ARGS, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@on_cluster
def test_grpc_run_numbers_agree_with_the_records(served, capsys, tmp_path):
    result = _bench(capsys, "--target", served.target, "--rates", "2,4", "--output-dir",
                    str(tmp_path))  # fmt: skip
    for key in VLLM_KEYS:
        assert key in result, key
    for stat in ("mean", "median", "std", "p90", "p99"):
        for metric in ("ttft", "tpot", "itl", "e2el"):
            assert f"{stat}_{metric}_ms" in result
    assert result["mode"] == "disaggregated" and result["num_gpus"] == 2
    assert [p["rate"] for p in result["attainment_curve"]] == [2, 4]
    for run in result["runs"]:
        ttfts = [t for t in run["ttfts"] if t is not None]
        assert run["completed"] == len(ttfts) == run["num_prompts"] - run["failed"]
        assert run["p90_ttft_ms"] == pytest.approx(np.percentile(np.array(ttfts) * 1e3, 90))
        tpots = [t for t in run["tpots"] if t is not None]
        assert run["mean_tpot_ms"] == pytest.approx(np.mean(tpots) * 1e3)
        good = sum(t is not None and t <= 0.5 and (p is None or p <= 0.05)
                   for t, p in zip(run["ttfts"], run["tpots"], strict=True))  # fmt: skip
        assert run["attainment"] == pytest.approx(good / run["num_prompts"])
        assert run["request_goodput"] == pytest.approx(good / run["duration"])
        assert (
            run["output_lens"] == run["output_lens"]
            and sum(run["output_lens"]) == run["total_output_tokens"]
        )
        parts = run["breakdown_ms"]
        assert parts["prefill"] > 0 and parts["transfer"] > 0  # disaggregated: KV moved
    rep = result["runs"][-1] if result["goodput_rps"] >= 4 else result["runs"][0]
    assert result["p90_ttft_ms"] == rep["p90_ttft_ms"]
    assert (tmp_path / "result.json").is_file() and (tmp_path / "report.html").is_file()


@on_cluster
def test_openai_backend_and_goodput_search(served, capsys):
    http = served.http_url.removesuffix("/v1")
    result = _bench(capsys, "--target", http, "--start-rate", "2", "--max-trials", "3",
                    "--repeats", "1", "--num-gpus", "2")  # fmt: skip
    assert result["backend"] == "openai" and 1 <= len(result["runs"]) <= 3
    assert result["runs"][0]["completed"] > 0
    assert result["runs"][0]["breakdown_ms"] is not None  # the timing extension came back
    assert result["goodput_per_gpu"] == pytest.approx(result["goodput_rps"] / 2)


@pytest.mark.parametrize(
    "target,message",
    [("127.0.0.1:1", "cannot use the cluster at 127.0.0.1:1"),
     ("http://127.0.0.1:1", "cannot reach http://127.0.0.1:1/v1")],
    ids=["grpc-down", "http-down"],
)  # fmt: skip
def test_target_down_is_a_clear_error(target, message, capsys):
    code = main(["bench", "serve", "--target", target, *ARGS, "--rate", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@on_cluster
def test_target_refusing_is_a_clear_error(served, capsys):
    args = [a if a != "s3cret" else "wrong" for a in ARGS]
    code = main(["bench", "serve", "--target", served.target, *args, "--rate", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "UNAUTHENTICATED" in err and "Traceback" not in err


@on_cluster
def test_served_profile_fits_what_the_api_shows(served, tmp_path, capsys):
    from cluster.placement.cli import main as placement_main

    out = tmp_path / "served.json"
    code = placement_main(["profile", "--target", served.target, "--api-key", "s3cret",
                           "--quick", "--repeats", "1", "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    profile = json.loads(out.read_text())
    assert profile["served"] and profile["prefill"] and profile["decode"]
    assert all(row["time_s"] > 0 for row in profile["prefill"] + profile["decode"])
    # Served TTFT includes the handoff: above the bare engine's step for the same prompt.
    assert min(row["time_s"] for row in profile["prefill"]) > 1e-3
    assert len(profile["fit"]["prefill"]["coefficients"]) == 4
