"""From a search to a plan, and from a plan to what users read: the chosen pools, their
predicted goodput per GPU beside the best colocated plan, the runner-ups (`placement plan`),
and attainment against rate for a saved plan (`placement simulate`)."""

from __future__ import annotations

import time

import numpy as np

from cluster.placement.instance import ParallelConfig
from cluster.placement.packing import pack
from cluster.placement.plan import Plan, PoolPlan
from cluster.placement.search import SLO, Candidate, ClusterSpec, Planner, PlanningError, Settings
from cluster.placement.workload import LengthDist, Trace, Workload, load_workload


def build_plan(planner: Planner, rate: float | None, baseline: bool, exhaustive: bool) -> Plan:
    start = time.perf_counter()
    if exhaustive:
        best = planner.exhaustive(rate)
        cands = [best] if best else []
    else:
        cands = planner.disaggregated(rate)
    if not cands:
        raise PlanningError(_why_none(planner, rate))
    coloc = planner.colocated(rate) if baseline else []
    chosen = cands[0]
    plan = Plan(
        mode=chosen.mode,
        affinity=chosen.affinity,
        model=planner.model,
        hardware={c.hardware.name: c.hardware for _, c, _ in chosen.pools},
        slo={
            "ttft_s": planner.slo.ttft_s,
            "tpot_s": planner.slo.tpot_s,
            "attainment": planner.slo.attainment,
        },  # fmt: skip
        workload=planner.workload.to_dict(),
        pools=[_pool(planner, role, c, n) for role, c, n in chosen.pools],
        placement=pack(chosen, planner.cluster) or [],
        predicted=summary(planner, chosen, rate),
        colocated_baseline=summary(planner, coloc[0], rate) if coloc else None,
        runner_ups=[summary(planner, c, rate) for c in cands[1:4]],
    )
    if coloc:
        plan.hardware.update({c.hardware.name: c.hardware for _, c, _ in coloc[0].pools})
    plan.planning_s = time.perf_counter() - start
    plan.predicted["num_simulations"] = planner.num_simulations
    return plan


def _why_none(planner: Planner, rate: float | None) -> str:
    if rate is None:
        return "no disaggregated plan fits the cluster: it needs at least two instances"
    return (
        f"no plan within the cluster reaches {rate:g} req/s at {planner.slo.attainment:.0%} "
        f"attainment: lower --rate, add nodes, or drop --rate to see the best goodput"
    )


def _pool(planner: Planner, role: str, config: ParallelConfig, n: int) -> PoolPlan:
    spec = planner.spec(role, config)
    return PoolPlan(role, config.hardware.name, config.tp, config.pp, n,
                    spec.max_batch_tokens, spec.kv_capacity_tokens)  # fmt: skip


def summary(planner: Planner, cand: Candidate, rate: float | None) -> dict:
    return {
        "mode": cand.mode,
        "affinity": cand.affinity if cand.mode == "disaggregated" else "-",
        "pools": [
            {
                "role": role,
                "hardware": c.hardware.name,
                "tensor_parallel_size": c.tp,
                "pipeline_parallel_size": c.pp,
                "num_instances": n,
            }
            for role, c, n in cand.pools
        ],  # fmt: skip
        "goodput_rps": round(cand.goodput_rps, 4),
        "goodput_per_gpu": round(cand.goodput_rps / cand.num_gpus, 4),
        "attainment_at_rate": round(cand.attainment, 4) if rate is not None else None,
        "target_rate": rate,
        "num_gpus": cand.num_gpus,
        "cost_per_hour": round(cand.cost_per_hour, 2),
        "power_w": cand.power_w,
    }


def describe_pools(entry: dict) -> str:
    return " + ".join(
        f"{p['num_instances']}x {p['role']} {p['hardware']} TP{p['tensor_parallel_size']}"
        f"xPP{p['pipeline_parallel_size']}"
        for p in entry["pools"]
    )


def render_table(plan: Plan) -> str:
    slo = plan.slo
    lines = [
        f"model {plan.model.name}  workload {plan.workload.get('name')}  "
        f"TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.0f} ms "
        f"at {slo['attainment']:.0%}  (planned in {plan.planning_s:.2f} s)",
        "",
        f"{'':12s} {'pools':58s} {'aff':4s} {'GPUs':>5s} {'goodput':>9s} {'per GPU':>8s} "
        f"{'$/h':>8s}",
    ]
    rows = [("chosen", plan.predicted)]
    if plan.colocated_baseline:
        rows.append(("colocated", plan.colocated_baseline))
    rows += [(f"runner-up {i}", r) for i, r in enumerate(plan.runner_ups, 1)]
    for label, entry in rows:
        lines.append(
            f"{label:12s} {describe_pools(entry)[:58]:58s} {entry['affinity'][:4]:4s} "
            f"{entry['num_gpus']:5d} "
            f"{entry['goodput_rps']:9.3f} {entry['goodput_per_gpu']:8.3f} "
            f"{entry['cost_per_hour']:8.2f}"
        )
    rate = plan.predicted.get("target_rate")
    if rate is not None:
        lines.append(f"\nall plans meet {rate:g} req/s; compare their GPUs and $/h")
    elif plan.colocated_baseline and plan.colocated_baseline["goodput_per_gpu"] > 0:
        ratio = plan.predicted["goodput_per_gpu"] / plan.colocated_baseline["goodput_per_gpu"]
        lines.append(f"\ndisaggregated / colocated goodput per GPU: {ratio:.2f}x")
    lines.append("goodput in requests/s; aff: high = pools anywhere, low = stages share nodes")
    return "\n".join(lines)


# --- placement simulate ----------------------------------------------------------------------


def workload_of(plan: Plan) -> Workload | Trace:
    name = plan.workload.get("name", "chatbot")
    try:
        return load_workload(name)
    except ValueError:
        w = plan.workload
        if "mean_input_len" not in w:
            raise
        return Workload(
            name,
            LengthDist(w["mean_input_len"], w.get("input_cv", 1.0)),
            LengthDist(w["mean_output_len"], w.get("output_cv", 1.0)),
        )


def planner_for(
    plan: Plan, settings: Settings | None = None, source=None, workload=None
) -> Planner:
    nodes: dict[str, int] = {}
    for node in plan.placement:
        nodes[node["hardware"]] = nodes.get(node["hardware"], 0) + 1
    cluster = ClusterSpec(
        tuple((hw, max(1, nodes.get(name, 1))) for name, hw in plan.hardware.items())
    )
    slo = SLO(plan.slo["ttft_s"], plan.slo["tpot_s"], plan.slo.get("attainment", 0.9))
    return Planner(plan.model, cluster, slo, workload or workload_of(plan), settings, source)


def candidate_of(plan: Plan) -> Candidate:
    pools = tuple(
        (p.role, ParallelConfig(plan.hardware[p.hardware], p.tensor_parallel_size,
                                p.pipeline_parallel_size), p.num_instances)
        for p in plan.pools
    )  # fmt: skip
    units = 1 if plan.affinity == "low" else 0
    return Candidate(plan.mode, pools, plan.affinity, units=units)


def simulate_plan(plan: Plan, rates: list[float], planner: Planner) -> list[dict]:
    """Attainment, P90 TTFT and TPOT of the plan at each rate."""
    cand = candidate_of(plan)
    batch = {p.role: p.max_batch_tokens for p in plan.pools}
    rows = []
    for rate in rates:
        reqs = planner.requests.at_rate(rate)
        res = planner.simulate(cand, reqs, batch)
        rows.append({
            "rate": rate,
            "attainment": res.attainment(planner.slo.ttft_s, planner.slo.tpot_s),
            "ttft_attainment": res.attainment(planner.slo.ttft_s, None),
            "tpot_attainment": res.attainment(None, planner.slo.tpot_s),
            "p90_ttft_s": float(np.quantile(res.ttft_s, 0.9)),
            "p90_tpot_s": float(np.quantile(res.tpot_s, 0.9)),
        })  # fmt: skip
    return rows
