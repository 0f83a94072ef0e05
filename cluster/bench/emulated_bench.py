"""`cluster bench compare --emulate HARDWARE --model PRESET`: DistServe's experiment on an
emulated cluster (engine/emulation.py). The planner plans the cluster; then each deployment
is served here, emulated, and measured at rates around its predicted goodput, each run beside
the simulator's attainment for exactly the requests that were sent (same arrivals, same
lengths), so that measurement and prediction differ only by what the simulator leaves out:

    planner disaggregated       the plan `placement plan` chooses
    planner colocated           its colocated baseline (chunked prefill)
    DistServe baseline          that colocated shape scheduled prefill-first without chunked
                                prefill (vLLM as DistServe measured it)
    DistServe placement         prefill TP2 + decode TP1, the counts filling the GPUs that
                                the simulator rates best (DistServe's placement for OPT-13B)
    --plan FILE                 any plan file, added

Rates and SLOs are scaled by --time-scale (the cluster runs that much slower) and every
number is reported in real-world units of the emulated hardware: emulated, not measured on it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import sys
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from cluster.bench.loadgen import BenchError, GrpcBackend
from cluster.bench.serve_bench import Benchmark, _finish, assemble, workload_of
from cluster.placement.instance import ParallelConfig
from cluster.placement.types import Candidate

DEFAULT_TIME_SCALE = 8.0


@dataclass(slots=True)
class Deployment:
    name: str
    candidate: Candidate
    planner: object  # the Planner whose simulator predicts it
    chunked_prefill: bool = True
    planner_goodput_rps: float = 0.0

    @property
    def num_gpus(self) -> int:
        return self.candidate.num_gpus

    @property
    def batch(self) -> dict[str, int]:
        """Per role, the batch limit the simulator uses (the engine gets the same)."""
        out = {}
        for role, config, _ in self.candidate.pools:
            out[role] = self.planner.spec(role, config).max_batch_tokens
            if role == "colocated" and not self.chunked_prefill:  # whole prompts must fit
                out[role] = max(out[role], self.planner.model.max_position_embeddings)
        return out

    def describe(self) -> str:
        parts = [f"{n}x {role} {c.describe()}" for role, c, n in self.candidate.pools]
        return " + ".join(parts)

    def predict(self, plans) -> float:
        """Joint attainment the simulator gives exactly these requests (real-world times)."""
        from cluster.placement.simulator import Requests

        reqs = Requests(
            np.array([p.arrival_s for p in plans], dtype=float),
            np.array([len(p.prompt_ids) for p in plans]),
            np.array([p.output_len for p in plans]),
        )
        res = self.planner.simulate(self.candidate, reqs, self.batch)
        return res.attainment(self.planner.slo.ttft_s, self.planner.slo.tpot_s)

    def serve_config(self, args) -> dict:
        from cluster.emulate import EmulationSettings, emulate
        from cluster.launch import DeploymentConfig

        # The router admits whatever arrives: the engines' seats and KV are the limits, as
        # in the simulator (its queues are unbounded).
        config = DeploymentConfig(
            mode=self.candidate.mode, router={"max_in_flight": 100_000, "max_queued": 100_000}
        )
        for role, c, n in self.candidate.pools:
            pool = getattr(config, role)
            pool.num_instances = n
            pool.engine = {"tensor_parallel_size": c.tp, "pipeline_parallel_size": c.pp}
            if role == "colocated" and not self.chunked_prefill:
                pool.engine["chunked_prefill"] = False
        affinity = self.candidate.affinity if self.candidate.mode == "disaggregated" else "high"
        settings = EmulationSettings(args.emulate, args.model, args.time_scale, affinity,
                                     batch_tokens=self.batch)  # fmt: skip
        return dataclasses.asdict(emulate(config, settings))


# --- the deployments ---------------------------------------------------------------------------


def plan_deployments(args) -> list[Deployment]:
    from cluster.placement.hardware import get_hardware, load_catalog
    from cluster.placement.model_spec import load_model_spec
    from cluster.placement.plan import Plan
    from cluster.placement.report import build_plan, candidate_of
    from cluster.placement.search import SLO, Planner, Settings
    from cluster.placement.types import ClusterSpec

    hardware = get_hardware(args.emulate, load_catalog())
    if args.gpus_per_node:
        hardware = hardware.with_gpus_per_node(args.gpus_per_node)
    model = load_model_spec(args.model)
    cluster = ClusterSpec(((hardware, args.nodes),))
    slo = SLO(args.ttft, args.tpot, args.attainment)
    workload = workload_of(args)

    def planner(chunked: bool = True) -> Planner:
        settings = Settings(seed=args.seed, chunked_prefill=chunked)
        return Planner(model, cluster, slo, workload, settings)

    chunked, prefill_first = planner(), planner(chunked=False)
    plan = build_plan(chunked, None, baseline=True, exhaustive=False)
    out = [Deployment("planner disaggregated", candidate_of(plan), chunked)]
    if plan.colocated_baseline:
        coloc = _candidate(plan.colocated_baseline, hardware)
        out.append(Deployment("planner colocated", coloc, chunked))
        out.append(Deployment("DistServe baseline (prefill-first)", coloc, prefill_first, False))
    distserve = _distserve_placement(chunked, hardware, cluster.num_gpus(hardware))
    if distserve is not None:
        out.append(Deployment("DistServe placement", distserve, chunked))
    if args.plan:
        extra = Plan.load(args.plan)
        out.append(Deployment(f"plan {extra.mode}", candidate_of(extra), chunked))
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        out = [d for d in out if any(d.name.lower().startswith(w) for w in wanted)]
        if not out:
            raise BenchError(f"--only {args.only!r} matches no deployment")
    for dep in out:
        dep.planner_goodput_rps = dep.planner.goodput(dep.candidate).goodput_rps
    return out


def _candidate(summary: dict, hardware) -> Candidate:
    pools = tuple(
        (p["role"], ParallelConfig(hardware, p["tensor_parallel_size"],
                                   p["pipeline_parallel_size"]), p["num_instances"])
        for p in summary["pools"]
    )  # fmt: skip
    return Candidate(summary["mode"], pools, summary.get("affinity") or "high")


def _distserve_placement(planner, hardware, num_gpus: int) -> Candidate | None:
    """Prefill TP2, decode TP1 (DistServe's OPT-13B placement), every GPU used: the split of
    counts the simulator rates best. Within one node the KV moves over NVLink (low
    affinity), as it would."""
    prefill, decode = ParallelConfig(hardware, 2, 1), ParallelConfig(hardware, 1, 1)
    affinity = "low" if num_gpus <= hardware.gpus_per_node else "high"
    best = None
    for n_p in range(1, num_gpus // 2):
        n_d = num_gpus - 2 * n_p
        pools = (("prefill", prefill, n_p), ("decode", decode, n_d))
        cand = Candidate("disaggregated", pools, affinity)
        try:
            scored = planner.goodput(cand)
        except ValueError:
            continue  # a shape the model cannot take
        if best is None or scored.goodput_rps > best.goodput_rps:
            best = scored
    return best and dataclasses.replace(best, goodput_rps=0.0)


# --- measuring ---------------------------------------------------------------------------------


def crossing(points: list[tuple[float, float]], target: float) -> float:
    """Goodput from (rate, attainment) points sorted by rate: the highest rate meeting the
    target with every lower one meeting it too, interpolated linearly to the first miss."""
    best = 0.0
    for i, (rate, value) in enumerate(points):
        if value >= target:
            best = rate
            continue
        if i:
            r0, a0 = points[i - 1]
            best = r0 + (rate - r0) * (a0 - target) / (a0 - value)
        break
    return best


async def _measure(args, target: str, dep: Deployment, rates: list[float]) -> tuple[dict, list]:
    async with GrpcBackend(target, args.api_key) as backend:
        info = await backend.model_info()
        bench = Benchmark(backend, args, info)
        await bench.warm_up()
        curve = []
        for rate in rates:
            run = await bench.run_at(rate)
            predicted = dep.predict(bench.last_plans)
            curve.append({
                "rate": rate, "attainment": run["attainment"], "predicted_attainment": predicted,
                "ttft_attainment": run["ttft_attainment"],
                "tpot_attainment": run["tpot_attainment"], "completed": run["completed"],
                "num_prompts": run["num_prompts"],
            })  # fmt: skip
            print(f"    predicted attainment {predicted:6.1%}", file=sys.stderr)
        return assemble(bench, target, dep.num_gpus, dep.candidate.mode), curve


def scrape_emulator(http_url: str) -> dict | None:
    """The emulated runners' own check (achieved / modelled step time) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = http_url.removesuffix("/v1") + "/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    per: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("pdcluster:emulated_"):
            continue
        for sample in family.samples:
            inst = per.setdefault(sample.labels.get("instance", "?"), {})
            key = family.name.removeprefix("pdcluster:emulated_")
            if "quantile" in sample.labels:
                key = f"ratio_{sample.labels['quantile']}"
            inst[key] = sample.value
    if not per:
        return None
    p50 = [v["ratio_p50"] for v in per.values() if "ratio_p50" in v]
    p99 = [v["ratio_p99"] for v in per.values() if "ratio_p99" in v]
    return {
        "instances": len(per),
        "steps": int(sum(v.get("num_steps", 0) for v in per.values())),
        "achieved_over_modelled": sum(v.get("achieved_s", 0) for v in per.values())
        / max(sum(v.get("modelled_s", 0) for v in per.values()), 1e-12),
        "step_ratio_p50_range": [min(p50), max(p50)] if p50 else None,
        "step_ratio_p99_max": max(p99) if p99 else None,
    }


def _cpu_busy() -> tuple[float, float]:
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, sum(t)


def _same(a: Deployment, b: Deployment) -> bool:
    ca, cb = a.candidate, b.candidate
    return (ca.mode, ca.pools, ca.affinity, a.chunked_prefill) == (
        cb.mode, cb.pools, cb.affinity, b.chunked_prefill)  # fmt: skip


def measure_deployment(args, dep: Deployment) -> dict:
    from cluster.bench.local_cluster import LocalCluster

    fractions = [float(x) for x in args.rate_fractions.split(",")]
    if args.rates:
        rates = sorted(float(x) for x in args.rates.split(","))
    else:
        rates = [round(dep.planner_goodput_rps * f, 3) for f in fractions]
    if not rates or rates[0] <= 0:
        raise BenchError(f"{dep.name}: the planner predicts no goodput; nothing to measure")
    print(f"{dep.name}: {dep.describe()}, {dep.num_gpus} GPUs, rates {rates}", file=sys.stderr)
    with LocalCluster(dep.serve_config(args)) as cluster:
        busy0, total0 = _cpu_busy()
        result, curve = asyncio.run(_measure(args, cluster.target, dep, rates))
        busy1, total1 = _cpu_busy()
        emulator = scrape_emulator(cluster.http_url)
    target = args.attainment
    measured = crossing([(p["rate"], p["attainment"]) for p in curve], target)
    predicted = crossing([(p["rate"], p["predicted_attainment"]) for p in curve], target)
    return {
        "name": dep.name,
        "pools": dep.describe(),
        "mode": dep.candidate.mode,
        "num_gpus": dep.num_gpus,
        "goodput_rps": measured,
        "goodput_per_gpu": measured / dep.num_gpus,
        "predicted_goodput_per_gpu": predicted / dep.num_gpus,
        "planner_goodput_per_gpu": dep.planner_goodput_rps / dep.num_gpus,
        "curve": curve,
        "max_gap_points": max(abs(p["attainment"] - p["predicted_attainment"]) for p in curve)
        * 100,
        "emulator": emulator,
        "cpu_busy_share": (busy1 - busy0) / max(total1 - total0, 1e-9),
        "result": result,
    }


def run_emulated_compare(args: argparse.Namespace) -> int:
    if not args.model:
        raise BenchError("--emulate needs --model: a preset (e.g. OPT-13B) or a config.json")
    args.time_scale = args.time_scale or DEFAULT_TIME_SCALE
    if args.time_scale < 1:
        raise BenchError("--time-scale must be >= 1")
    started = time.monotonic()
    deployments = plan_deployments(args)
    bench_args = argparse.Namespace(**{**vars(args), "plan": None})  # predictions are ours
    measured = []
    for i, dep in enumerate(deployments):
        twin = next((j for j in range(i) if _same(deployments[j], dep)), None)
        if twin is None:
            measured.append(measure_deployment(bench_args, dep))
            continue
        # The same pools, shapes and scheduling as one measured already: not run twice.
        first = measured[twin]
        print(f"{dep.name}: the same deployment as {first['name']}", file=sys.stderr)
        measured.append({**first, "name": dep.name, "same_as": first["name"]})
    for entry in measured:
        print(
            f"{entry['name']}: {entry['goodput_per_gpu']:.3f} req/s/GPU measured (emulated), "
            f"{entry['predicted_goodput_per_gpu']:.3f} predicted, largest attainment gap "
            f"{entry['max_gap_points']:.1f} points",
            file=sys.stderr,
        )

    def ranking(key: str) -> list[str]:
        return [e["name"] for e in sorted(measured, key=lambda e: -e[key])]

    result = {
        "compare": True,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "emulated": {
            "hardware": args.emulate,
            "model": args.model,
            "time_scale": args.time_scale,
            "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node,
        },  # fmt: skip
        "slo": {"ttft_s": args.ttft, "tpot_s": args.tpot, "attainment": args.attainment},
        "results": {
            e["name"]: r for e in measured if (r := e.pop("result")) and not e.get("same_as")
        },  # fmt: skip
        "deployments": measured,
        "ranking": {
            "measured": ranking("goodput_per_gpu"),
            "predicted": ranking("predicted_goodput_per_gpu"),
        },  # fmt: skip
        "wall_s": time.monotonic() - started,
    }
    by_name = {e["name"]: e for e in measured}
    disagg, coloc = by_name.get("planner disaggregated"), by_name.get("planner colocated")
    if disagg and coloc and coloc["goodput_per_gpu"]:
        result["goodput_per_gpu_ratio"] = disagg["goodput_per_gpu"] / coloc["goodput_per_gpu"]
    _finish(result, args)
    return 0
