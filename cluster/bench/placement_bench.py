"""`cluster bench placement`: what the placement planner costs and what it finds.

1. Planning time and the chosen plans for OPT-66B on 4 nodes x 8 A100-80GB (DistServe's
   testbed) for the chatbot, code and summarization workloads, each with its colocated
   (chunked-prefill) baseline: per-GPU goodput of both and their ratio.
2. Simulator speed: 10,000 chatbot requests through a disaggregated and a colocated cluster.
3. The fitted latency model's hold-out error on a CPU profile of our engine (measured here).
"""

from __future__ import annotations

import argparse
import time

from cluster.bench.common import report
from cluster.placement.hardware import load_catalog
from cluster.placement.instance import LatencySource, ParallelConfig, instance_spec
from cluster.placement.model_spec import PRESETS
from cluster.placement.report import build_plan, describe_pools
from cluster.placement.search import SLO, ClusterSpec, Planner, Settings
from cluster.placement.simulator import Requests, simulate_colocated, simulate_disaggregated
from cluster.placement.workload import WORKLOADS, unit_arrivals

# (workload, TTFT, TPOT) for OPT-66B, in the spirit of DistServe's (§6.1): tight TTFT for code
# completion, loose TTFT for summarization, chat in between; chat again with a tight TPOT.
SLOS = [("chatbot", 2.5, 0.15), ("chatbot", 2.5, 0.06), ("code", 0.125, 0.2),
        ("summarization", 15.0, 0.15)]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one workload, no profile")
    parser.add_argument("--model", default="OPT-66B")
    parser.add_argument("--hardware", default="A100-80GB")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=1500)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")


def plan_workloads(args) -> list[dict]:
    catalog = load_catalog()
    cluster = ClusterSpec(((catalog[args.hardware], args.nodes),))
    rows = []
    for name, ttft, tpot in SLOS[:1] if args.quick else SLOS:
        planner = Planner(PRESETS[args.model], cluster, SLO(ttft, tpot), WORKLOADS[name],
                          Settings(num_requests=args.num_requests))  # fmt: skip
        start = time.perf_counter()
        disagg = build_plan(planner, None, baseline=False, exhaustive=False)
        disagg_s = time.perf_counter() - start
        coloc = planner.colocated(None)[0]
        rows.append({
            "workload": name, "ttft_s": ttft, "tpot_s": tpot,
            "planning_s": round(disagg_s, 2),
            "planning_with_baseline_s": round(time.perf_counter() - start, 2),
            "num_simulations": planner.num_simulations,
            "disaggregated": disagg.predicted, "affinity": disagg.affinity,
            "colocated": {"pools": coloc.describe().replace(" colocated", ""),
                          "goodput_rps": coloc.goodput_rps,
                          "num_gpus": coloc.num_gpus,
                          "goodput_per_gpu": coloc.goodput_rps / coloc.num_gpus},
        })  # fmt: skip
        rows[-1]["ratio"] = (
            disagg.predicted["goodput_per_gpu"] / rows[-1]["colocated"]["goodput_per_gpu"]
        )
    return rows


def simulator_speed(num_requests: int = 10_000) -> dict:
    catalog, model = load_catalog(), PRESETS["OPT-13B"]
    source = LatencySource()
    config = ParallelConfig(catalog["A100-80GB"], 2, 1)
    inputs, outputs = WORKLOADS["chatbot"].sample(num_requests)
    reqs = Requests(unit_arrivals(num_requests) / 8.0, inputs, outputs)
    prefill = [instance_spec(model, config, source, "prefill")] * 2
    decode = [instance_spec(model, config, source, "decode")] * 2
    start = time.perf_counter()
    simulate_disaggregated(reqs, prefill, decode, inputs * 1e-5)
    disagg_s = time.perf_counter() - start
    start = time.perf_counter()
    simulate_colocated(reqs, [instance_spec(model, config, source, "colocated")] * 4)
    return {"num_requests": num_requests, "disaggregated_s": disagg_s,
            "colocated_s": time.perf_counter() - start}  # fmt: skip


def fitted_error() -> dict:
    from cluster.placement.profile import profile_engine

    start = time.perf_counter()
    profile = profile_engine(quick=False)
    fit = profile["fit"]
    return {
        "profile_s": time.perf_counter() - start,
        "prefill_rows": len(profile["prefill"]),
        "decode_rows": len(profile["decode"]),
        **{f"{stage}_{k}": fit[stage][k] for stage in ("prefill", "decode")
           for k in ("holdout_mean_rel_error", "holdout_max_rel_error")},
    }  # fmt: skip


def run(args) -> dict:
    catalog = load_catalog()
    # The profile runs first: it measures this machine, and the planning after it is pure CPU.
    fitted = None if args.quick else fitted_error()
    result = {
        "model": args.model,
        "cluster": f"{args.nodes} x {args.hardware} x {catalog[args.hardware].gpus_per_node}",
        "plans": plan_workloads(args),
        "simulator": simulator_speed(),
        "fitted_model": fitted,
    }
    report(result, table(result), args)
    return result


def _slo(row: dict) -> str:
    return f"{row['ttft_s'] * 1e3:g}/{row['tpot_s'] * 1e3:g} ms"


def table(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['cluster']}",
        f"{'workload, TTFT/TPOT':28s} {'plan (s)':>8s} {'disaggregated plan':66s} {'per GPU':>8s} "
        f"{'colocated':28s} {'per GPU':>8s} {'ratio':>6s}",
    ]
    for row in result["plans"]:
        coloc, pools = (
            row["colocated"],
            f"{describe_pools(row['disaggregated'])} ({row['affinity']})",
        )
        lines.append(
            f"{row['workload'] + ' ' + _slo(row):28s} {row['planning_s']:8.2f} {pools:66s} "
            f"{row['disaggregated']['goodput_per_gpu']:8.3f} {coloc['pools'][:28]:28s} "
            f"{coloc['goodput_per_gpu']:8.3f} {row['ratio']:6.2f}"
        )
    sim = result["simulator"]
    lines.append(
        f"simulator: {sim['num_requests']} requests, disaggregated {sim['disaggregated_s']:.3f} s,"
        f" colocated {sim['colocated_s']:.3f} s"
    )
    fit = result["fitted_model"]
    if fit:
        lines.append(
            f"fitted model, CPU profile ({fit['prefill_rows']}+{fit['decode_rows']} rows), "
            f"hold-out error: prefill mean {fit['prefill_holdout_mean_rel_error']:.1%} "
            f"(max {fit['prefill_holdout_max_rel_error']:.1%}), decode mean "
            f"{fit['decode_holdout_mean_rel_error']:.1%} "
            f"(max {fit['decode_holdout_max_rel_error']:.1%})"
        )
    return "\n".join(lines)
