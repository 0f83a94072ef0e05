"""Which devices of which node each instance stage gets. A tensor-parallel group (one
pipeline stage of one instance: TP devices) never spans nodes; stages of one instance may.
High affinity packs groups first-fit, largest first; low affinity fills each unit's PP
nodes with stage s of every prefill and decode instance of the unit on node s."""

from __future__ import annotations

from cluster.placement.types import Candidate, ClusterSpec


def pack(cand: Candidate, cluster: ClusterSpec) -> list[dict] | None:
    """Nodes with their assigned groups, or None when the plan does not fit."""
    nodes = []
    for hw, count in cluster.nodes:
        pools = [(role, c, n) for role, c, n in cand.pools if c.hardware.name == hw.name]
        if cand.affinity == "low" and cand.units:
            placed = _pack_units(pools, cand.units, hw, count)
        else:
            placed = _first_fit(pools, hw, count)
        if placed is None:
            return None
        nodes += placed
    known = {hw.name for hw, _ in cluster.nodes}
    if any(c.hardware.name not in known for _, c, _ in cand.pools):
        return None
    return nodes


def _node(hw, index: int) -> dict:
    return {"node": f"{hw.name}-{index}", "hardware": hw.name, "groups": []}


def _first_fit(pools, hw, count: int) -> list[dict] | None:
    groups = [
        (c.tp, role, i, stage) for role, c, n in pools for i in range(n) for stage in range(c.pp)
    ]
    if not groups:
        return []
    if sum(g[0] for g in groups) > count * hw.gpus_per_node:
        return None
    free = [hw.gpus_per_node] * count
    nodes = [_node(hw, j) for j in range(count)]
    for tp, role, i, stage in sorted(groups, key=lambda g: -g[0]):
        j = next((j for j, f in enumerate(free) if f >= tp), None)
        if j is None:
            return None
        first = hw.gpus_per_node - free[j]
        nodes[j]["groups"].append(_group(role, i, stage, range(first, first + tp)))
        free[j] -= tp
    return [node for node in nodes if node["groups"]]


def _pack_units(pools, units: int, hw, count: int) -> list[dict] | None:
    if not pools:
        return []
    pp = pools[0][1].pp
    per_unit = [(role, c, n // units) for role, c, n in pools]
    per_node = sum(c.tp * k for _, c, k in per_unit)
    if units * pp > count or per_node > hw.gpus_per_node:
        return None
    nodes = []
    for u in range(units):
        for stage in range(pp):
            node, gpu = _node(hw, u * pp + stage), 0
            for role, c, k in per_unit:
                for j in range(k):
                    node["groups"].append(_group(role, u * k + j, stage, range(gpu, gpu + c.tp)))
                    gpu += c.tp
            nodes.append(node)
    return nodes


def _group(role: str, instance: int, stage: int, gpus: range) -> dict:
    return {"role": role, "instance": instance, "stage": stage, "gpu_ids": list(gpus)}
