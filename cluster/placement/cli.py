"""The `placement` command: `plan` sizes and parallelises the prefill and decode pools for a
model, hardware, workload and TTFT/TPOT targets; `simulate` reports a saved plan's attainment
against rate; `profile` measures our engine here for the fitted latency model; `spec` prints a
model's sizes."""

from __future__ import annotations

import argparse
import json
import sys

from cluster.placement.hardware import get_hardware, load_catalog
from cluster.placement.instance import LatencySource
from cluster.placement.model_spec import load_model_spec
from cluster.placement.plan import Plan, PlanError
from cluster.placement.report import build_plan, planner_for, render_table, simulate_plan
from cluster.placement.search import SLO, ClusterSpec, Planner, PlanningError, Settings
from cluster.placement.workload import WORKLOADS, load_workload


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be >= 1")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", help="YAML of extra or replacement hardware entries")
    p.add_argument("--profile", help="profile JSON from `placement profile` (fitted latencies)")
    p.add_argument("--num-requests", type=int, default=1500, help="requests per simulation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose pools, parallelism and placement for SLOs")
    p.add_argument("--model", required=True, help="preset name, config.json or checkpoint dir")
    p.add_argument(
        "--hardware",
        required=True,
        help="device type, or TYPE:NODES,TYPE:NODES for a mixed cluster",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes (single device type)")
    p.add_argument("--gpus-per-node", type=int, help="override the catalog's devices per node")
    p.add_argument("--ttft", type=float, required=True, help="TTFT target, seconds")
    p.add_argument("--tpot", type=float, required=True, help="TPOT target, seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    traces = "or a JSONL trace (arrival_s, input_len, output_len)"
    p.add_argument("--workload", default="chatbot", help=f"{'|'.join(WORKLOADS)} {traces}")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--rate", type=float, help="target request rate (req/s) to meet cheapest")
    goal.add_argument("--maximize", choices=["goodput"], help="maximise goodput (the default)")
    p.add_argument("--objective", choices=["gpus", "cost", "power"], default="gpus")
    p.add_argument("--affinity", choices=["high", "low", "auto"], default="auto")
    p.add_argument(
        "--colocated-baseline",
        action="store_true",
        help="also plan the best colocated (chunked-prefill) deployment",
    )
    p.add_argument("--exhaustive", action="store_true", help="brute force over every plan")
    p.add_argument("--tp", type=_ints, help="allowed tensor-parallel sizes, e.g. 1,2,4")
    p.add_argument("--pp", type=_ints, help="allowed pipeline-parallel sizes")
    p.add_argument("--top-k", type=int, default=3, help="shapes per phase checked end to end")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: CV of the gaps")
    p.add_argument("--output", "-o", default="plan.yaml", help="plan file to write ('-': none)")
    _common(p)
    p.set_defaults(func=run_plan)


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="attainment against rate for a saved plan")
    p.add_argument("plan", help="plan YAML/JSON from `placement plan`")
    p.add_argument("--rates", help="comma-separated req/s (default: 0.25 ... 1.5 x goodput)")
    _common(p)
    p.set_defaults(func=run_simulate)


def _spec_parser(sub) -> None:
    p = sub.add_parser("spec", help="parameters, weight and KV bytes of a model")
    p.add_argument("--model", required=True, help="preset name, config.json or checkpoint dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_spec)


def _cluster(args, catalog) -> ClusterSpec:
    entries = []
    for part in args.hardware.split(","):
        name, _, nodes = part.partition(":")
        hw = get_hardware(name.strip(), catalog)
        if args.gpus_per_node:
            hw = hw.with_gpus_per_node(args.gpus_per_node)
        count = int(nodes) if nodes else args.nodes
        if count < 1:
            raise PlanningError(f"{hw.name}: the number of nodes must be >= 1")
        entries.append((hw, count))
    return ClusterSpec(tuple(entries))


def run_plan(args) -> int:
    catalog = load_catalog(args.catalog)
    model = load_model_spec(args.model)
    source = LatencySource.from_profile_file(args.profile, catalog)
    source.check_model(model)
    settings = Settings(
        num_requests=args.num_requests,
        search_requests=min(500, args.num_requests),
        seed=args.seed,
        top_k=args.top_k,
        affinity=args.affinity,
        objective=args.objective,
        arrival=args.arrival,
        arrival_cv=args.cv,
        tp=args.tp,
        pp=args.pp,
    )
    if args.rate is not None and args.rate <= 0:
        raise PlanningError("--rate must be > 0 requests per second")
    slo = SLO(args.ttft, args.tpot, args.attainment)
    planner = Planner(
        model, _cluster(args, catalog), slo, load_workload(args.workload), settings, source
    )
    plan = build_plan(planner, args.rate, args.colocated_baseline, args.exhaustive)
    if args.output != "-":
        plan.save(args.output)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        print(render_table(plan))
        spanning = [
            p
            for p in plan.pools
            if p.tensor_parallel_size * p.pipeline_parallel_size
            > plan.hardware[p.hardware].gpus_per_node
        ]
        if spanning:
            print(
                "note: this build keeps an instance's ranks on one node; the "
                f"{spanning[0].role} pool's instances span nodes (plan with --affinity high "
                "or a smaller --pp to serve it today)"
            )
        if args.output != "-":
            print(f"plan written to {args.output}  (serve it: cluster serve --plan {args.output})")
    return 0


def run_simulate(args) -> int:
    plan = Plan.load(args.plan)
    catalog = load_catalog(args.catalog)
    source = LatencySource.from_profile_file(args.profile, catalog)
    settings = Settings(num_requests=args.num_requests, seed=args.seed)
    planner = planner_for(plan, settings, source)
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    else:
        goodput = plan.predicted.get("goodput_rps") or 1.0
        rates = [round(goodput * f, 4) for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)]
    rows = simulate_plan(plan, rates, planner)
    if args.json:
        print(json.dumps({"plan": args.plan, "slo": plan.slo, "results": rows}))
        return 0
    print(
        f"{'rate':>8s} {'attain':>7s} {'TTFT ok':>8s} {'TPOT ok':>8s} {'p90 TTFT':>9s} "
        f"{'p90 TPOT':>9s}"
    )
    for r in rows:
        print(
            f"{r['rate']:8.3f} {r['attainment']:7.1%} {r['ttft_attainment']:8.1%} "
            f"{r['tpot_attainment']:8.1%} {r['p90_ttft_s'] * 1e3:7.0f}ms "
            f"{r['p90_tpot_s'] * 1e3:7.1f}ms"
        )
    return 0


def run_spec(args) -> int:
    spec = load_model_spec(args.model)
    if args.dtype:
        from dataclasses import replace

        spec = replace(spec, dtype=args.dtype)
    info = spec.to_dict()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:24s} {value}")
    return 0


def _profile_parser(sub, argv: list[str]) -> None:
    """`profile` runs our engine: importing it (torch) takes longer than a whole plan, so only
    `placement profile` pays for it; the other commands list it with a stub."""
    if argv[:1] == ["profile"]:
        from cluster.placement import profile as profile_cmd

        profile_cmd.add_parser(sub)
    else:
        sub.add_parser("profile", help=PROFILE_HELP)


PROFILE_HELP = "measure our engine's prefill and decode steps and fit the latency model"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="placement", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(metavar="COMMAND")
    _plan_parser(sub)
    _simulate_parser(sub)
    _profile_parser(sub, argv)
    _spec_parser(sub)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (PlanningError, PlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
