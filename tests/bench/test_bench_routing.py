"""`cluster bench routing`: the cache figures and ratios on records with known answers, the
deployment config each policy gets, then `--quick` end to end (a cluster per policy, tiny
model, loopback) for the documented keys and a trace saved by one run replayed by another
(timings on a shared CPU say nothing a test could hold)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cluster.bench import routing_bench
from cluster.bench.loadgen import RequestRecord
from cluster.cli import main


def _record(prompt, cached, hit=None, local=None, kv_bytes=None, turn=0, ok=True):
    r = RequestRecord(input_len=prompt, output_len=2, turn=turn)
    r.ttft_s, r.e2e_s, r.num_output_tokens = (0.1, 0.2, 2) if ok else (None, 0.1, 0)
    r.error = "" if ok else "UNAVAILABLE: gone"
    r.cached_tokens, r.kv_hit_tokens, r.local_prefill, r.kv_bytes = cached, hit, local, kv_bytes
    return r


def test_cache_figures_split_the_hits_by_where_they_were():
    records = [
        _record(100, 0, hit=0, local=False, kv_bytes=800),  # turn 0: nothing cached
        _record(200, 64, hit=96, local=False, kv_bytes=400, turn=1),  # handoff, both ends hit
        _record(300, 192, hit=0, local=True, kv_bytes=0, turn=2),  # ran on the decode instance
        _record(400, 400, hit=400, local=False, kv_bytes=0, ok=False),  # failed: left out
    ]
    out = routing_bench.cache_figures(records, kv_bytes_scale=2.0)
    assert out["prefix_hit_ratio"] == pytest.approx((64 + 192) / 600)
    assert out["prefill_hit_ratio"] == pytest.approx(64 / 600)
    assert out["decode_hit_ratio"] == pytest.approx((96 + 192) / 600)
    assert out["kv_bytes_per_request"] == pytest.approx(2.0 * 1200 / 3)
    assert out["kv_bytes_per_followup"] == pytest.approx(2.0 * 400 / 2)
    assert out["local_prefill_share"] == pytest.approx(1 / 3)
    # A server without the KV-routing fields: those figures are None, not 0.
    old = routing_bench.cache_figures([_record(100, 32, kv_bytes=10)])
    assert old["prefix_hit_ratio"] == old["prefill_hit_ratio"] == pytest.approx(0.32)
    assert old["decode_hit_ratio"] is None and old["local_prefill_share"] is None


def _runs(points):
    return [{"session_rate": r, "request_rate": 4 * r, "attainment": a, "ttft_p90_ms": t}
            for r, a, t in points]  # fmt: skip


def test_goodput_and_ratios():
    load = {"runs": _runs([(1, 0.95, 100), (2, 0.8, 400), (4, 0.95, 900)])}
    kv = {"runs": _runs([(1, 0.99, 50), (2, 0.92, 100), (4, 0.5, 1800)])}
    for policy in (load, kv):
        policy.update(routing_bench._goodput(policy["runs"], 0.9))
    assert load["goodput_session_rate"] == 1  # 4 passes above a failure at 2: not counted
    assert kv["goodput_session_rate"] == 2 and kv["goodput_request_rate"] == 8
    ratios = routing_bench.ratios({"load": load, "kv": kv})
    assert [p["load_over_kv"] for p in ratios["p90_ttft_load_over_kv"]] == [2.0, 4.0, 0.5]
    assert ratios["goodput_kv_over_load"] == 2.0
    assert routing_bench.ratios({"kv": kv}) == {}


def _options(*argv: str) -> routing_bench.Options:
    parser = argparse.ArgumentParser()
    routing_bench.add_arguments(parser)
    return routing_bench._options(parser.parse_args(list(argv)))


def test_each_policy_gets_its_router_setting():
    config = routing_bench.serve_config(_options("--prefill", "3", "--decode", "2"), "kv")
    assert config["router"] == {"policy": "kv"} and config["mode"] == "disaggregated"
    assert (config["prefill"]["num_instances"], config["decode"]["num_instances"]) == (3, 2)
    emulated = _options("--emulate", "A100-80GB", "--model", "opt-13b")
    assert (emulated.prefill, emulated.decode, emulated.time_scale) == (4, 2, 8.0)
    config = routing_bench.serve_config(emulated, "load")
    assert config["router"]["policy"] == "load"
    assert config["decode"]["engine"]["emulation"]["model"] == "opt-13b"
    assert emulated.kv_bytes_scale > 1  # stand-in blocks count as the model's KV
    big = _options("--emulate", "A100-80GB", "--model", "llama-3-70b", "--tp", "4",
                   "--time-scale", "4", "--local-prefill-tpot", "0.05",
                   "--local-prefill-max-tokens", "2048")  # fmt: skip
    config = routing_bench.serve_config(big, "kv")
    assert config["prefill"]["engine"]["emulation"]["tp"] == 4
    assert config["router"]["local_prefill_max_tokens"] == 2048
    assert config["router"]["local_prefill_tpot_s"] == pytest.approx(0.2)  # router seconds


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown"):
        _options("--policies", "load,fastest")
    with pytest.raises(ValueError, match="--emulate needs --model"):
        _options("--emulate", "A100-80GB")
    with pytest.raises(ValueError, match="turns"):
        _options("--turns", "5,2")
    with pytest.raises(ValueError, match="--tp"):
        _options("--tp", "2")  # a real CPU cluster is one process per instance


# --- end to end ----------------------------------------------------------------------------


KEYS = {"session_rate", "request_rate", "request_throughput", "num_sessions", "num_requests",
        "completed", "failed", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms",
        "attainment", "ttft_attainment", "tpot_attainment", "prefix_hit_ratio",
        "prefill_hit_ratio", "decode_hit_ratio", "kv_bytes_per_request",
        "kv_bytes_per_followup", "local_prefill_share", "first_error",
        "num_turns_planned"}  # fmt: skip


def _bench(capsys, *argv: str) -> dict:
    code = main(["bench", "routing", "--quick", "--json", *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.mark.slow  # a cluster per policy, one after the other
@pytest.mark.timeout(600)
def test_quick_run_reports_both_policies(tmp_path: Path, capsys):
    trace = tmp_path / "workload.jsonl"
    result = _bench(capsys, "--save-trace", str(trace))
    assert set(result) == {"workload", "slo", "emulated", "router", "policies", "ratios",
                           "machine", "date"}  # fmt: skip
    assert result["router"] == {}  # no local-prefill setting given: the router's own
    assert set(result["policies"]) == {"load", "kv"} and result["emulated"] is None
    for name, policy in result["policies"].items():
        assert policy["policy"] == name and policy["instances"] == 3
        assert {"goodput_session_rate", "goodput_request_rate", "deployment"} <= set(policy)
        (run,) = policy["runs"]
        assert set(run) == KEYS, name
        assert run["failed"] == 0 and run["completed"] == run["num_requests"] > 0, run
        assert run["prefix_hit_ratio"] is not None and run["decode_hit_ratio"] is not None
        assert run["local_prefill_share"] is not None
    assert policy["runs"][0]["num_requests"] == len(trace.read_text().splitlines())
    assert {"p90_ttft_load_over_kv", "goodput_kv_over_load"} == set(result["ratios"])
    assert result["policies"]["load"]["runs"][0]["local_prefill_share"] == 0


@pytest.mark.slow  # one cluster
@pytest.mark.timeout(600)
def test_a_saved_trace_replays_as_one_turn_requests(tmp_path: Path, capsys):
    trace = tmp_path / "two.jsonl"
    rows = [
        {"session_id": "a", "turn": 0, "timestamp": 0.0, "input_length": 8, "output_length": 2,
         "system_id": 0, "system_length": 32},
        {"session_id": "a", "turn": 1, "timestamp": 0.2, "input_length": 8, "output_length": 2},
        {"session_id": "b", "turn": 0, "timestamp": 0.1, "input_length": 8, "output_length": 2,
         "system_id": 0},
    ]  # fmt: skip
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _bench(capsys, "--trace", str(trace), "--policies", "kv", "--workload", "random")
    assert result["workload"]["replay"] == "fixed"  # no think times: the timestamps rule
    (run,) = result["policies"]["kv"]["runs"]
    assert run["num_requests"] == run["num_sessions"] == 3 and run["failed"] == 0
    assert run["session_rate"] == pytest.approx(10.0)  # 2 sessions 0.1 s apart
    assert "send_delay_p90_ms" in run
