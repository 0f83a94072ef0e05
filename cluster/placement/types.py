"""What the planner's parts pass each other: the cluster to place on and a candidate plan
(search.py makes and scores them, packing.py places them on nodes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.placement.hardware import Hardware
from cluster.placement.instance import ParallelConfig
from cluster.placement.simulator import SimResult


@dataclass(slots=True, frozen=True)
class ClusterSpec:
    """Nodes per device type; every node of a type has that type's gpus_per_node."""

    nodes: tuple[tuple[Hardware, int], ...]

    def num_nodes(self, hw: Hardware) -> int:
        return sum(n for h, n in self.nodes if h.name == hw.name)

    def num_gpus(self, hw: Hardware) -> int:
        return self.num_nodes(hw) * hw.gpus_per_node

    @property
    def hardware(self) -> list[Hardware]:
        return [hw for hw, _ in self.nodes]


@dataclass(slots=True)
class Candidate:
    """A plan: the pools, and what the simulator said of it."""

    mode: str  # disaggregated | colocated
    pools: tuple[tuple[str, ParallelConfig, int], ...]  # (role, shape, instances)
    affinity: str = "high"
    units: int = 0  # low affinity: how many PP-node units the pools fill
    goodput_rps: float = 0.0
    attainment: float = 0.0  # at the target rate (rate mode)
    result: SimResult | None = field(default=None, repr=False)

    @property
    def num_gpus(self) -> int:
        return sum(c.num_devices * n for _, c, n in self.pools)

    @property
    def cost_per_hour(self) -> float:
        return sum(c.num_devices * n * c.hardware.price_per_hour for _, c, n in self.pools)

    @property
    def power_w(self) -> float:
        return sum(c.num_devices * n * c.hardware.power_w for _, c, n in self.pools)

    def amount(self, objective: str) -> float:
        return {"gpus": self.num_gpus, "cost": self.cost_per_hour, "power": self.power_w}[objective]

    def per_unit(self, objective: str) -> float:
        """Goodput per GPU, per dollar-hour or per watt."""
        return self.goodput_rps / max(self.amount(objective), 1e-12)

    def describe(self) -> str:
        return " + ".join(f"{n}x {role} {c.describe()}" for role, c, n in self.pools)
