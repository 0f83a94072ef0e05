"""`cluster bench serve` and `cluster bench compare`: SLO attainment against offered rate and
goodput per GPU of a running (or launched) deployment, as JSON with `vllm bench serve`'s keys
and as an HTML/Markdown report.

    serve    one deployment: a single rate (--rate), a sweep (--rates), or (default) a goodput
             search: double the rate until attainment drops below the target, then bisect,
             repeating the trials whose attainment lands near the target
    compare  the same workload and search against a disaggregated and a colocated deployment
             with the same number of workers, launched here one after the other

Goodput (docs/architecture.md, "Definitions") is the highest rate whose joint TTFT-and-TPOT
attainment meets the target (90 % by default), read off the measured curve; per GPU it
divides by the deployment's devices (one per instance in this build). With --plan, the
simulator's prediction for the plan is drawn over the measured curve (--profile: fitted
latencies of this machine)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cluster.bench.loadgen import (
    BenchError,
    GrpcBackend,
    OpenAIBackend,
    RequestRecord,
    build_requests,
    run_open_loop,
)
from cluster.bench.serve_metrics import attainment_curve, goodput_from_curve, rescore, summarize_run
from cluster.placement.workload import LengthDist, Trace, Workload, load_workload, unit_arrivals

# vLLM's top-level result keys, copied from the representative run.
VLLM_KEYS = (
    "request_rate",
    "burstiness",
    "duration",
    "completed",
    "failed",
    "num_prompts",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "errors",
)


def add_common(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument(
        "--workload",
        default="chatbot",
        help="chatbot | code | summarization | JSONL trace (arrival_s, input_len, output_len)",
    )
    w.add_argument(
        "--length-scale",
        type=float,
        default=1.0,
        help="scale the workload's lengths (a small model: e.g. 0.25)",
    )
    w.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    w.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: CV of the gaps")
    w.add_argument("--seed", type=int, default=0)
    s = parser.add_argument_group("SLOs and rates")
    s.add_argument("--ttft", type=float, required=True, help="TTFT target, seconds")
    s.add_argument("--tpot", type=float, required=True, help="TPOT target, seconds")
    s.add_argument("--attainment", type=float, default=0.9)
    s.add_argument("--slo-scale", help="also score every run at these multiples of the SLOs")
    s.add_argument("--rate", type=float, help="one run at this rate (req/s)")
    s.add_argument("--rates", help="a sweep: comma-separated rates")
    s.add_argument("--start-rate", type=float, default=1.0, help="goodput search: first rate")
    s.add_argument("--max-trials", type=int, default=10, help="goodput search: runs at most")
    s.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="goodput search: trials at a rate whose attainment is near the target",
    )
    s.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="goodput search: stop when the bracket is this narrow (relative)",
    )
    r = parser.add_argument_group("run size")
    r.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    r.add_argument("--num-prompts", type=int, default=200, help="most requests per run")
    r.add_argument("--min-prompts", type=int, default=30, help="fewest requests per run")
    e = parser.add_argument_group("emulated accelerators (numbers reported as emulated)")
    e.add_argument(
        "--emulate",
        metavar="HARDWARE",
        help="launch emulated instances of this catalog hardware running --model (a preset "
        "such as OPT-13B or a config.json); with --target: the cluster there is emulated",
    )
    e.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="the emulated cluster runs this many times slower: rates are divided and SLOs "
        "multiplied by it, results come back in real-world units (default 1; 8 for compare)",
    )
    o = parser.add_argument_group("output")
    o.add_argument("--output-dir", help="write result.json, report.html, report.md here")
    o.add_argument("--plan", help="placement plan: draw the simulator's prediction")
    o.add_argument("--profile", help="profile JSON for the prediction's latencies")
    o.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--api-key", default=None)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help="grpc://host:port (default 127.0.0.1:50051) or "
        "http://host:port[/v1] for the OpenAI API",
    )
    parser.add_argument(
        "--launch",
        choices=["disaggregated", "colocated"],
        help="start a local cluster for the run instead of --target",
    )
    parser.add_argument(
        "--backend",
        choices=["grpc", "openai"],
        help="with --launch: which API to drive (default grpc)",
    )
    _launch_options(parser)
    parser.add_argument(
        "--num-gpus",
        type=int,
        help="devices of the deployment (default: its instance count from GetClusterStatus)",
    )
    add_common(parser)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["grpc", "openai"], default="grpc")
    _launch_options(parser)
    add_common(parser)
    e = parser.add_argument_group("compare --emulate: the planner's cluster")
    e.add_argument("--nodes", type=int, default=1, help="emulated nodes")
    e.add_argument("--gpus-per-node", type=int, help="default: the catalog's")
    e.add_argument(
        "--rate-fractions",
        default="0.6,0.8,1.0,1.2,1.4",
        help="each deployment runs at these multiples of its predicted goodput",
    )
    e.add_argument(
        "--only",
        help="comma-separated deployments to measure (name prefixes, e.g. 'planner dis'); "
        "default: all",
    )


def _launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: the tiny model)")
    parser.add_argument("--num-prefill", type=int, default=1)
    parser.add_argument("--num-decode", type=int, default=1)
    parser.add_argument("--num-colocated", type=int, help="default: prefill + decode")


# --- one deployment --------------------------------------------------------------------------


def workload_of(args) -> Workload | Trace:
    workload = load_workload(args.workload)
    if args.length_scale != 1.0 and isinstance(workload, Workload):
        f = args.length_scale
        scale = lambda d: LengthDist(
            d.mean * f,
            d.cv,
            max(1, round(d.min_len * f)),  # noqa: E731
            max(2, round(d.max_len * f)),
        )
        workload = Workload(f"{workload.name}x{f:g}", scale(workload.input), scale(workload.output))
    return workload


class Benchmark:
    """Runs at chosen rates against one backend; keeps every run."""

    def __init__(self, backend, args, info: dict):
        self.backend, self.args, self.info = backend, args, info
        self.slo = {"ttft_s": args.ttft, "tpot_s": args.tpot, "attainment": args.attainment}
        self.workload = workload_of(args)
        self.runs: list[dict] = []
        self.time_scale = getattr(args, "time_scale", 1.0) or 1.0
        self.last_plans: list = []

    def _requests(self, rate: float):
        a = self.args
        if isinstance(self.workload, Trace):
            t = self.workload
            n = min(len(t.arrival_s), a.num_prompts)
            arrivals = t.arrival_s[:n] * (t.rate / rate)
            inputs, outputs = t.input_lens[:n], t.output_lens[:n]
        else:
            n = int(np.clip(round(rate * a.duration), a.min_prompts, a.num_prompts))
            seed = a.seed + len(self.runs)  # fresh requests for every trial
            inputs, outputs = self.workload.sample(n, seed=seed)
            arrivals = unit_arrivals(n, a.arrival, a.cv, seed) / rate
        return build_requests(
            inputs,
            outputs,
            arrivals,
            self.info["vocab_size"],
            self.info["max_model_len"],
            seed=a.seed,
        )

    async def warm_up(self) -> None:
        """One request before the first run: connections, caches and lazy paths warm (as
        `vllm bench serve` sends a test prompt first). A failure here fails the benchmark."""
        plan = build_requests(
            np.array([16]),
            np.array([4]),
            np.zeros(1),
            self.info["vocab_size"],
            self.info["max_model_len"],
        )[0]
        record = RequestRecord(16, 4)
        await self.backend.send(plan, record)
        if not record.ok:
            raise BenchError(f"the warm-up request failed: {record.error}")

    async def run_at(self, rate: float) -> dict:
        """One run at `rate` (real-world req/s). On an emulated cluster running time_scale
        times slower, requests leave that much further apart and the SLOs stretch with them;
        the run comes back in real-world units (to_real_world)."""
        k = self.time_scale
        self.last_plans = self._requests(rate)
        plans = [dataclasses.replace(p, arrival_s=p.arrival_s * k) for p in self.last_plans]
        cap = max(self.args.duration * k, plans[-1].arrival_s + 1.0)
        records, duration = await run_open_loop(
            self.backend, plans, cap, progress=not self.args.no_progress
        )
        burstiness = 1.0 / self.args.cv**2 if self.args.arrival == "gamma" else 1.0
        slo = {**self.slo, "ttft_s": self.slo["ttft_s"] * k, "tpot_s": self.slo["tpot_s"] * k}
        run = to_real_world(summarize_run(records, duration, rate / k, slo, burstiness), k)
        self.runs.append(run)
        print(
            f"  rate {rate:7.3f} req/s: {run['completed']}/{run['num_prompts']} done, "
            f"attainment {run['attainment']:6.1%} (TTFT {run['ttft_attainment']:.0%}, "
            f"TPOT {run['tpot_attainment']:.0%}), p90 TTFT {run['p90_ttft_ms']:.0f} ms, "
            f"p90 TPOT {run['p90_tpot_ms']:.1f} ms",
            file=sys.stderr,
        )
        if run["completed"] == 0:
            first = next((e for e in run["errors"] if e), "no response")
            raise BenchError(f"every request at {rate:g} req/s failed: {first}")
        return run


_RATE_KEYS = ("request_throughput", "request_goodput", "output_throughput",
              "total_token_throughput")  # fmt: skip


def to_real_world(run: dict, k: float) -> dict:
    """A run measured on a cluster emulated k times slower, in the emulated hardware's time:
    rates and throughputs x k, durations and latencies / k; attainments stay."""
    if k == 1:
        return run

    def scale(x):
        if x is None:
            return None
        if isinstance(x, list):
            return [scale(v) for v in x]
        if isinstance(x, dict):
            return {key: scale(v) for key, v in x.items()}
        return x / k

    out = dict(run)
    out["request_rate"] = run["request_rate"] * k
    out["duration"] = run["duration"] / k
    for key in _RATE_KEYS:
        out[key] = run[key] * k
    for key, value in run.items():
        if key.endswith("_ms") or key in ("ttfts", "tpots", "itls", "e2els", "breakdowns"):
            out[key] = scale(value)
    out["time_scale"] = k
    return out


async def goodput_search(
    attain: Callable, target: float, start: float, max_trials: int, tolerance: float
) -> None:
    """Probe rates to bracket the goodput: double (or halve) from `start` until the
    attainment crosses the target, then bisect geometrically. `attain(rate)` runs trials."""
    lo, hi, rate, trials = 0.0, math.inf, start, 0
    while trials < max_trials:
        passed = await attain(rate) >= target
        trials += 1
        lo, hi = (max(lo, rate), hi) if passed else (lo, min(hi, rate))
        if hi < math.inf and lo > 0 and hi / lo <= 1 + tolerance:
            return
        if hi == math.inf:
            rate *= 2
        elif lo == 0:
            rate /= 2
            if rate < 1e-3:
                return
        else:
            rate = math.sqrt(lo * hi)


async def measure(bench: Benchmark) -> None:
    a = bench.args
    if a.rate is not None:
        await bench.run_at(a.rate)
    elif a.rates:
        for rate in sorted(float(x) for x in a.rates.split(",")):
            await bench.run_at(rate)
    else:

        async def attain(rate: float) -> float:
            values = [(await bench.run_at(rate))["attainment"]]
            while len(values) < a.repeats and abs(np.mean(values) - a.attainment) < 0.05:
                values.append((await bench.run_at(rate))["attainment"])
            return float(np.mean(values))

        await goodput_search(attain, a.attainment, a.start_rate, a.max_trials, a.tolerance)


def assemble(bench: Benchmark, target: str, num_gpus: int, mode: str) -> dict:
    a, runs = bench.args, bench.runs
    curve = attainment_curve(runs)
    goodput = goodput_from_curve(curve, a.attainment)
    passing = [r for r in runs if goodput > 0 and r["request_rate"] <= goodput * (1 + 1e-6)]
    representative = max(passing, key=lambda r: r["request_rate"]) if passing else runs[0]
    result = {k: representative[k] for k in VLLM_KEYS}
    result.update(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        backend=bench.backend.name,
        target=target,
        model_id=bench.info["model_id"],
        tokenizer_id=bench.info["model_id"],
        mode=mode,
        num_gpus=num_gpus,
        workload=bench.workload.to_dict(),
        slo=bench.slo,
        arrival={"process": a.arrival, "cv": a.cv},
        runs=runs,
        attainment_curve=curve,
        goodput_rps=goodput,
        goodput_per_gpu=goodput / num_gpus if num_gpus else None,
        slo_scale=_slo_scales(a, runs),
        prediction=_prediction(a, bench, curve),
    )
    for key, value in representative.items():  # the representative run's latency stats
        if key.endswith("_ms") and key.split("_")[0] in ("mean", "median", "std", "p90", "p99"):
            result[key] = value
    return result


def _slo_scales(args, runs: list[dict]) -> list[dict] | None:
    if not args.slo_scale:
        return None
    out = []
    for scale in (float(x) for x in args.slo_scale.split(",")):
        slo = {"ttft_s": args.ttft * scale, "tpot_s": args.tpot * scale}
        curve = attainment_curve(
            [
                {**r, "attainment": rescore(r, slo), "ttft_attainment": 0, "tpot_attainment": 0}
                for r in runs
            ]
        )
        out.append(
            {
                "scale": scale,
                "curve": [{"rate": p["rate"], "attainment": p["attainment"]} for p in curve],
                "goodput_rps": goodput_from_curve(curve, args.attainment),
            }
        )
    return out


def _prediction(args, bench: Benchmark, curve: list[dict]) -> list[dict] | None:
    """The simulator's attainment at the measured rates (and a few around them) for the
    deployment that was measured: its pools (one device per instance, this build) on the
    plan's model and hardware, with the --profile latencies when given."""
    if not args.plan:
        return None
    from cluster.placement.hardware import load_catalog
    from cluster.placement.instance import LatencySource
    from cluster.placement.plan import Plan, PoolPlan
    from cluster.placement.report import planner_for, simulate_plan
    from cluster.placement.search import Settings

    plan = Plan.load(args.plan)
    hardware = plan.pools[0].hardware
    counts: dict[str, int] = {}
    for role, _ in bench.info["instances"]:
        counts[role] = counts.get(role, 0) + 1
    if not counts:
        return None  # an OpenAI target does not say what it runs
    # Our engine's step budget (SchedulerConfig.max_num_batched_tokens) bounds every batch.
    roles = [r for r in ("prefill", "decode", "colocated") if r in counts]
    plan.pools = [PoolPlan(role, hardware, 1, 1, counts[role], 2048, 0) for role in roles]
    plan.mode = "colocated" if "colocated" in counts else "disaggregated"
    plan.slo = {"ttft_s": args.ttft, "tpot_s": args.tpot, "attainment": args.attainment}
    source = LatencySource.from_profile_file(args.profile, load_catalog())
    settings = Settings(num_requests=2000, seed=args.seed)
    planner = planner_for(plan, settings, source, workload=bench.workload)
    rates = sorted({p["rate"] for p in curve})
    if rates:
        rates = sorted(set(rates) | set(np.geomspace(rates[0] / 2, rates[-1] * 1.5, 8).tolist()))
    return [
        {"rate": r["rate"], "attainment": r["attainment"]}
        for r in simulate_plan(plan, rates, planner)
    ]


async def bench_one(
    args, target: str, backend_name: str, num_gpus: int | None, mode: str | None = None
) -> dict:
    backend = (
        OpenAIBackend(target, args.api_key)
        if backend_name == "openai"
        else GrpcBackend(target, args.api_key)
    )
    async with backend:
        info = await backend.model_info()
        if not info.get("vocab_size") or not info.get("max_model_len"):
            raise BenchError(f"{target} does not report vocab_size and max_model_len")
        roles = [role for role, _ in info["instances"]]
        mode = mode or info.get("mode") or "unknown"
        num_gpus = num_gpus or len(roles) or None
        bench = Benchmark(backend, args, info)
        await bench.warm_up()
        print(
            f"benchmarking {info['model_id']} at {target} ({mode}, {len(roles)} instances)",
            file=sys.stderr,
        )
        await measure(bench)
        return assemble(bench, target, num_gpus, mode)


# --- entry points ----------------------------------------------------------------------------


def _parse_target(target: str | None) -> tuple[str, str]:
    target = target or "127.0.0.1:50051"
    if target.startswith(("http://", "https://")):
        return target, "openai"
    return target.removeprefix("grpc://"), "grpc"


def _launch_config(args, mode: str) -> dict:
    config = _plain_launch_config(args, mode)
    if not args.emulate:
        return config
    from cluster.emulate import EmulationSettings, emulate
    from cluster.launch import DeploymentConfig

    if not args.model:
        raise BenchError("--emulate needs --model: a preset (e.g. OPT-13B) or a config.json")
    deployment = DeploymentConfig.from_dict(config)
    emulate(deployment, EmulationSettings(args.emulate, args.model, args.time_scale or 1.0))
    return dataclasses.asdict(deployment)


def _plain_launch_config(args, mode: str) -> dict:
    config: dict = {"mode": mode}
    if args.model:
        config["model"] = args.model
    if mode == "disaggregated":
        config["prefill"] = {"num_instances": args.num_prefill}
        config["decode"] = {"num_instances": args.num_decode}
    else:
        n = args.num_colocated or args.num_prefill + args.num_decode
        config["colocated"] = {"num_instances": n}
    return config


def _num_instances(config: dict) -> int:
    roles = ("colocated",) if config.get("mode") == "colocated" else ("prefill", "decode")
    return sum(config[role]["num_instances"] for role in roles if role in config)


def _finish(result: dict, args) -> None:
    from cluster.bench.html_report import write_reports

    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result))
        paths = write_reports(result, out)
        print(f"wrote {out / 'result.json'}, {paths['html']}, {paths['md']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


def _validate(args) -> None:
    if args.ttft <= 0 or args.tpot <= 0 or not 0 < args.attainment <= 1:
        raise BenchError("--ttft and --tpot must be > 0 and --attainment in (0, 1]")
    if args.rate is not None and args.rate <= 0:
        raise BenchError("--rate must be > 0")


def run_serve(args) -> int:
    _validate(args)
    if args.launch:
        from cluster.bench.local_cluster import LocalCluster

        with LocalCluster(_launch_config(args, args.launch)) as cluster:
            openai = args.backend == "openai"
            target = cluster.http_url if openai else cluster.target
            gpus = args.num_gpus or _num_instances(cluster.config)
            result = asyncio.run(bench_one(args, target, args.backend or "grpc", gpus, args.launch))
    else:
        target, backend = _parse_target(args.target)
        result = asyncio.run(bench_one(args, target, backend, args.num_gpus))
    print(summary_line(result), file=sys.stderr)
    _finish(result, args)
    return 0


def run_compare(args) -> int:
    _validate(args)
    if args.emulate:
        from cluster.bench.emulated_bench import run_emulated_compare

        return run_emulated_compare(args)
    from cluster.bench.local_cluster import LocalCluster

    results = {}
    for mode in ("disaggregated", "colocated"):
        with LocalCluster(_launch_config(args, mode)) as cluster:
            target = cluster.http_url if args.backend == "openai" else cluster.target
            gpus = _num_instances(cluster.config)
            results[mode] = asyncio.run(bench_one(args, target, args.backend, gpus, mode))
        print(summary_line(results[mode]), file=sys.stderr)
    disagg, coloc = (results[m]["goodput_per_gpu"] for m in ("disaggregated", "colocated"))
    ratio = disagg / coloc if disagg is not None and coloc else None
    result = {
        "compare": True,
        "date": results["colocated"]["date"],
        "results": results,
        "goodput_per_gpu_ratio": ratio,
    }
    print(
        f"goodput per GPU, disaggregated / colocated: "
        f"{'n/a' if ratio is None else f'{ratio:.2f}x'}",
        file=sys.stderr,
    )
    _finish(result, args)
    return 0


def summary_line(result: dict) -> str:
    per_gpu = result["goodput_per_gpu"]
    return (
        f"{result['mode']}: goodput {result['goodput_rps']:.3f} req/s"
        f"{'' if per_gpu is None else f', {per_gpu:.3f} per GPU'} over {result['num_gpus']} "
        f"devices at {result['slo']['attainment']:.0%} of TTFT <= "
        f"{result['slo']['ttft_s'] * 1e3:g} ms and TPOT <= {result['slo']['tpot_s'] * 1e3:g} "
        f"ms ({len(result['runs'])} runs)"
    )


def run(args) -> int:
    try:
        return run_compare(args) if args.command == "compare" else run_serve(args)
    except (BenchError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
