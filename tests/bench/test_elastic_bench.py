"""`cluster bench elastic` without a cluster: the trace (rates, mixes, seed), the per-window
figures on records with known answers (failed requests miss, the reaction time's windows go
unchecked), device-seconds from /metrics samples, and the options it refuses. The run itself
needs the autoscaler and minutes of emulated load: not a unit test."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from cluster.bench import elastic_bench as eb
from cluster.bench.loadgen import RequestRecord
from cluster.cli import main
from cluster.placement.hardware import load_catalog


def _options(*argv: str) -> eb.Options:
    parser = argparse.ArgumentParser()
    eb.add_arguments(parser)
    return eb._options(parser.parse_args(list(argv)))


# -- the trace --------------------------------------------------------------------------------


def test_each_phase_realises_its_rate_and_mix():
    opt = _options("--phase-s", "1000", "--base-rate", "2", "--seed", "3")
    trace = eb.build_trace(opt)
    rows = eb.phase_summary(opt, trace)
    assert [(r["rate_multiple"], r["mix"]) for r in rows] == [
        (1, "chat"), (3, "chat"), (3, "summarization"), (1, "summarization")
    ]  # fmt: skip
    for row in rows:
        assert row["realised_rate"] == pytest.approx(row["rate"], rel=0.08)
    chat, summarization = trace.phase(1), trace.phase(2)
    assert 256 <= np.median(chat.input_lens) <= 512 and 200 <= chat.output_lens.mean() <= 300
    assert 2000 <= np.median(summarization.input_lens) <= 3000
    assert 40 <= summarization.output_lens.mean() <= 90
    assert chat.input_lens.max() > 2 * np.median(chat.input_lens)  # a tail, not a band
    assert trace.input_lens.max() <= opt.max_model_len
    assert np.all(np.diff(trace.arrival_s) >= 0)
    for index in range(4):
        arrivals = trace.phase(index).arrival_s
        assert arrivals.min() >= index * 1000 and arrivals.max() < (index + 1) * 1000


def test_the_trace_is_determined_by_its_seed():
    a, b = (eb.build_trace(_options("--seed", "7")) for _ in range(2))
    c = eb.build_trace(_options("--seed", "8"))
    for x, y in zip(eb.dataclasses.astuple(a), eb.dataclasses.astuple(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(a.arrival_s) != len(c.arrival_s) or not np.array_equal(a.input_lens, c.input_lens)


def test_phases_parse_and_say_what_is_wrong():
    phases = eb.parse_phases("2:summarization, 0.5:chat")
    assert phases == (eb.Phase(2.0, "summarization"), eb.Phase(0.5, "chat"))
    for bad in ("", "2:poetry", "0:chat", "x:chat", "chat"):
        with pytest.raises(ValueError, match="--phases"):
            eb.parse_phases(bad)
    # A phase like the one before it is no load change.
    opt = _options("--phases", "1:chat,1:chat,3:chat", "--phase-s", "10")
    assert opt.change_times_s() == [20.0]


# -- the windows --------------------------------------------------------------------------------


def _record(arrival_s, ttft_s=0.1, tpot_s=0.01, ok=True, k=1.0):
    """A finished request of 11 tokens, times in emulated seconds (real = x k)."""
    r = RequestRecord(input_len=100, output_len=11, scheduled_s=arrival_s * k)
    if ok:
        r.ttft_s, r.num_output_tokens = ttft_s * k, 11
        r.e2e_s = (ttft_s + 10 * tpot_s) * k
    else:
        r.error, r.e2e_s = "UNAVAILABLE: gone", 0.1
    return r


def _sample(t_s, prefill=1, decode=1, draining=0, gpus=None, counter=None, actions=None,
            failed=0.0):  # fmt: skip
    return eb.PoolSample(t_s, {"prefill": prefill, "decode": decode},
                         {"prefill": draining, "decode": 0}, gpus, counter, actions or {},
                         failed)  # fmt: skip


def test_window_attainment_counts_failures_and_both_targets():
    k = 4.0  # every figure in emulated seconds, whatever the time scale
    opt = _options("--phases", "1:chat,3:chat", "--phase-s", "20", "--window-s", "10",
                   "--reaction-s", "10", "--ttft", "1", "--tpot", "0.1",
                   "--time-scale", "4")  # fmt: skip
    records = [
        _record(1, k=k), _record(2, k=k), _record(3, ttft_s=1.5, k=k), _record(4, ok=False, k=k),
        _record(12, tpot_s=0.2, k=k), _record(15, k=k),  # window 1: one TPOT miss
        _record(21, k=k),  # window 2: just after the change to 3x
        _record(35, k=k), _record(36, k=k),
    ]  # fmt: skip
    samples = [_sample(0), _sample(50 * k, prefill=3), _sample(80 * k, prefill=3)]
    windows = eb.window_figures(records, samples, opt, {"prefill": 1, "decode": 1})
    assert [w["num_requests"] for w in windows] == [4, 2, 1, 2]
    assert [w["attainment"] for w in windows] == [0.5, 0.5, 1.0, 1.0]
    assert windows[0]["num_failed"] == 1
    assert windows[0]["ttft_attainment"] == 0.5 and windows[0]["tpot_attainment"] == 0.75
    assert [w["in_reaction"] for w in windows] == [False, False, True, False]
    assert windows[3]["phase"] == "3x chat"
    assert windows[0]["pools"]["prefill"] == 1 and windows[3]["pools"]["prefill"] == 1
    check = eb.window_check(windows, 0.9)
    assert (check["num_checked"], check["num_meeting"], check["num_in_reaction"]) == (3, 1, 1)
    assert not check["every_window_meets"] and check["worst_attainment"] == 0.5
    # Only the reaction window misses: the check passes.
    windows[2]["attainment"] = 0.1
    for w in windows[:2]:
        w["attainment"] = 0.95
    assert eb.window_check(windows, 0.9)["every_window_meets"]


def test_variant_figures_count_the_lost_and_the_static_ratio():
    opt = _options("--phases", "1:chat", "--phase-s", "20", "--time-scale", "2")
    records = [_record(1, k=2), _record(2, ok=False, k=2)]
    samples = [_sample(0, failed=1), _sample(40, counter=None, failed=2)]
    static = {"num_prefill": 3, "num_decode": 1, "num_gpus": 4, "cost_per_hour": 36.0,
              "source": "given"}  # fmt: skip
    out = eb.variant_figures(records, samples, opt, num_planned=3, static=static)
    assert out["duration_s"] == 20 and out["gpu_seconds"] == pytest.approx(2 * 20)
    assert out["static_peak_gpu_seconds"] == 80
    assert out["gpu_seconds_over_static_peak"] == pytest.approx(0.5)
    # No cost counter: the device-seconds at the plan's $9/device-hour; emulated seconds.
    assert out["dollars"] == pytest.approx(40 * 9 / 3600)
    assert out["static_peak_dollars"] == pytest.approx(36 * 20 / 3600)
    assert out["dollars_over_static_peak"] == pytest.approx(0.5)
    assert "static plan" in out["dollars_source"]
    assert out["lost"]["client_failed"] == 1 and out["lost"]["not_sent"] == 1
    assert out["lost"]["total"] == 2 and out["lost"]["server_failed"] == 1
    assert out["attainment"] == 0.5
    assert [p["gpus"] for p in out["timeline"]] == [2, 2]


# -- the samples --------------------------------------------------------------------------------

EXPOSITION = """\
# TYPE pdcluster:pool_instances gauge
pdcluster:pool_instances{role="prefill"} 3.0
pdcluster:pool_instances{role="decode"} 1.0
# TYPE pdcluster:pool_instances_draining gauge
pdcluster:pool_instances_draining{role="prefill"} 1.0
pdcluster:pool_instances_draining{role="decode"} 0.0
# TYPE pdcluster:pool_gpus gauge
pdcluster:pool_gpus 5.0
# TYPE pdcluster:gpu_seconds counter
pdcluster:gpu_seconds_total 120.5
pdcluster:gpu_seconds_created 1.7e9
# TYPE pdcluster:autoscale_actions counter
pdcluster:autoscale_actions_total{action="add",role="prefill",cause="ttft_breach"} 2.0
pdcluster:autoscale_actions_total{action="flip",role="prefill",cause="slack"} 1.0
# TYPE pdcluster:pool_cost_seconds counter
pdcluster:pool_cost_seconds_total 3600.0
# TYPE pdcluster:requests_failed counter
pdcluster:requests_failed_total{role="router",reason="engine"} 1.0
pdcluster:requests_failed_total{role="router",reason="policy"} 2.0
"""


def test_metrics_parse_into_a_sample():
    s = eb.parse_metrics(EXPOSITION, 1.5)
    assert s.t_s == 1.5 and s.num_instances == {"prefill": 3, "decode": 1}
    assert s.num_draining == {"prefill": 1, "decode": 0}
    assert (s.num_gpus, s.gpu_seconds_total, s.num_failed) == (5.0, 120.5, 3.0)
    assert s.actions == {("add", "prefill", "ttft_breach"): 2.0, ("flip", "prefill", "slack"): 1.0}
    assert s.cost_seconds_total == 3600.0
    static = eb.parse_metrics(EXPOSITION.split("# TYPE pdcluster:pool_instances_d")[0], 0.0)
    assert static.num_gpus is None and static.gpu_seconds_total is None
    assert static.cost_seconds_total is None
    assert static.num_failed == 0 and static.actions == {}


def test_gpu_seconds_from_the_counter_or_integrated_from_the_pools():
    devices = {"prefill": 1, "decode": 2}
    counted = [_sample(0, counter=100.0), _sample(5, counter=112.0), _sample(10, counter=130.0)]
    assert eb.gpu_seconds(counted, devices) == (30.0, "pdcluster:gpu_seconds_total")
    # No counter: each sample's devices (draining ones too) held until the next sample.
    pools = [_sample(0), _sample(2, prefill=2, draining=1), _sample(6, prefill=2), _sample(7)]
    used, source = eb.gpu_seconds(pools, devices)
    assert used == pytest.approx(3 * 2 + 5 * 4 + 4 * 1) and "samples" in source
    gauges = [_sample(0, gpus=4.0), _sample(3, gpus=1.0)]
    assert eb.gpu_seconds(gauges, devices)[0] == 12.0
    assert eb.gpu_seconds(pools[:1], devices)[0] == 0.0


def test_dollars_from_the_cost_counter_or_the_plans_price():
    devices = {"prefill": 1, "decode": 1}
    counted = [dataclasses.replace(_sample(0), cost_seconds_total=100.0),
               dataclasses.replace(_sample(10), cost_seconds_total=460.0)]  # fmt: skip
    assert eb.dollars(counted, devices, 99.0) == (360.0, "pdcluster:pool_cost_seconds")
    used, source = eb.dollars([_sample(0), _sample(10, prefill=2)], devices, 5.0)
    assert used == pytest.approx(2 * 10 * 5.0) and "static plan" in source


def test_actions_are_the_counters_growth_over_the_run():
    before = {("add", "prefill", "forecast"): 1.0}
    after = {("add", "prefill", "forecast"): 3.0, ("remove", "decode", "slack"): 1.0,
             ("flip", "decode", "slack"): 0.0}  # fmt: skip
    rows = eb.action_counts([_sample(0, actions=before), _sample(9, actions=after)])
    assert rows == [
        {"action": "add", "role": "prefill", "cause": "forecast", "count": 2},
        {"action": "remove", "role": "decode", "cause": "slack", "count": 1},
    ]


def test_comparison_of_flip_and_static():
    def variant(attainment, gpu_s, static_s=None, dollars=None, static_dollars=None):
        return {"attainment": attainment, "gpu_seconds": gpu_s, "static_peak_gpu_seconds": static_s,
                "dollars": dollars if dollars is not None else gpu_s / 10,
                "static_peak_dollars": static_dollars}  # fmt: skip

    out = eb.comparison({"elastic": variant(0.95, 60, dollars=3.0),
                         "elastic-noflip": variant(0.9, 80),
                         "static-peak": variant(0.99, 100)})  # fmt: skip
    assert out["flip_minus_noflip"]["attainment"] == pytest.approx(0.05)
    assert out["flip_minus_noflip"]["gpu_seconds"] == -20
    assert out["elastic_over_static_gpu_seconds"] == 0.6
    assert out["elastic-noflip_over_static_gpu_seconds"] == 0.8
    assert out["elastic_over_static_dollars"] == pytest.approx(0.3)  # cheaper types: < GPU-s
    alone = eb.comparison({"elastic": variant(0.95, 60, static_s=120, static_dollars=24.0)})
    assert alone["elastic_over_static_gpu_seconds"] == 0.5 and "static_basis" in alone
    assert alone["elastic_over_static_dollars"] == pytest.approx(0.25)


# -- the deployments and options ----------------------------------------------------------------


def test_each_variant_gets_its_deployment():
    opt = _options("--max-gpus", "6", "--ttft", "2", "--static-prefill", "4",
                   "--static-decode", "2")  # fmt: skip
    static = eb.static_plan(opt, eb.build_trace(opt))
    assert static["num_gpus"] == 6
    elastic = eb.serve_config(opt, "elastic", static)
    assert (elastic["prefill"]["num_instances"], elastic["decode"]["num_instances"]) == (1, 1)
    section = {"interval_s": 2.0, "min_gpus": 2, "max_gpus": 6, "ttft_s": 2.0, "tpot_s": 0.1,
               "attainment": 0.9, "flip": True}  # fmt: skip
    assert elastic["autoscale"].items() >= section.items()
    assert elastic["decode"]["engine"]["emulation"]["model"] == "llama-3-8b"
    assert elastic["router"]["max_in_flight"] == 100_000
    assert eb.serve_config(opt, "elastic-noflip", static)["autoscale"]["flip"] is False
    peak = eb.serve_config(opt, "static-peak", static)
    assert peak["autoscale"] is None
    assert (peak["prefill"]["num_instances"], peak["decode"]["num_instances"]) == (4, 2)
    assert elastic["autoscale"]["hardware"] is None  # one type: the config's own
    assert static["prefill_hardware"] == static["decode_hardware"] == "A100-80GB"


def test_mixed_hardware_flags_reach_the_autoscaler_and_the_static_plan():
    opt = _options("--prefill-hardware", "L40S,A100-80GB", "--static-prefill", "2",
                   "--static-decode", "1")  # fmt: skip
    assert opt.types("prefill") == ("L40S", "A100-80GB") and opt.types("decode") == ("A100-80GB",)
    static = eb.static_plan(opt, eb.build_trace(opt))
    assert (static["prefill_hardware"], static["decode_hardware"]) == ("L40S", "A100-80GB")
    catalog = load_catalog()
    assert static["cost_per_hour"] == pytest.approx(
        2 * catalog["L40S"].price_per_hour + catalog["A100-80GB"].price_per_hour
    )
    elastic = eb.serve_config(opt, "elastic", static)
    assert elastic["autoscale"]["hardware"] == {"prefill": ["L40S", "A100-80GB"],
                                                "decode": ["A100-80GB"]}  # fmt: skip
    peak = eb.serve_config(opt, "static-peak", static)
    assert peak["prefill"]["engine"]["emulation"]["hardware"] == "L40S"
    assert peak["decode"]["engine"]["emulation"]["hardware"] == "A100-80GB"
    assert "L40S|A100-80GB" in eb.describe(opt)


def test_the_static_plan_over_mixed_types_is_the_cheapest_pair_meeting_every_phase():
    argv = ("--phase-s", "20", "--phases", "1:chat,3:chat")
    mixed = eb.static_plan(_options(*argv, "--decode-hardware", "A100-80GB,L40S"),
                           eb.build_trace(_options(*argv)))  # fmt: skip
    singles = {d: eb.static_plan(_options(*argv, "--decode-hardware", d),
                                 eb.build_trace(_options(*argv)))
               for d in ("A100-80GB", "L40S")}  # fmt: skip
    assert mixed["decode_hardware"] in singles
    chosen = singles[mixed["decode_hardware"]]
    assert (mixed["num_prefill"], mixed["num_decode"]) == (chosen["num_prefill"],
                                                           chosen["num_decode"])  # fmt: skip
    meeting = [p["cost_per_hour"] for p in singles.values()
               if all(r["meets_target"] for r in p["phases"])]  # fmt: skip
    assert mixed["cost_per_hour"] == min(meeting)
    assert "cheapest" in mixed["source"]


def test_the_static_plan_is_the_planners_peak_of_each_pool():
    opt = _options("--phase-s", "20")
    plan = eb.static_plan(opt, eb.build_trace(opt))
    assert [p["phase"] for p in plan["phases"]] == [
        "1x chat", "3x chat", "3x summarization", "1x summarization"
    ]  # fmt: skip
    assert plan["num_prefill"] == max(p["num_prefill"] for p in plan["phases"])
    assert plan["num_decode"] == max(p["num_decode"] for p in plan["phases"])
    assert plan["num_gpus"] == plan["num_prefill"] + plan["num_decode"]
    # Long prompts at 3x need more prefill than short ones at 3x or long ones at 1x.
    by_phase = {p["phase"]: p["num_prefill"] for p in plan["phases"]}
    assert by_phase["3x summarization"] > by_phase["3x chat"]
    assert by_phase["3x summarization"] > by_phase["1x summarization"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "elastic,turbo"], "--variants"),
        (["--phases", "1:poetry"], "--phases"),
        (["--phase-s", "0"], "--phase-s"),
        (["--base-rate", "-1"], "--base-rate"),
        (["--window-s", "0"], "--window-s"),
        (["--ttft", "0"], "--ttft"),
        (["--reaction-s", "-1"], "--reaction-s"),
        (["--attainment", "1.5"], "--attainment"),
        (["--time-scale", "0.5"], "--time-scale"),
        (["--min-gpus", "1"], "--min-gpus"),
        (["--min-gpus", "6", "--max-gpus", "4"], "--max-gpus"),
        (["--static-prefill", "2"], "--static-decode"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--prefill-hardware", "A100-80GB,B300"], "--prefill-hardware: unknown hardware"),
        (["--decode-hardware", "L40S,L40S"], "--decode-hardware: give distinct"),
        (["--decode-hardware", ","], "--decode-hardware"),
    ],
)
def test_bad_options_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        _options(*argv)


def test_the_cli_refuses_before_starting_anything(capsys):
    assert main(["bench", "elastic", "--variants", "nope"]) == 2
    assert "--variants" in capsys.readouterr().err
