"""The hardware catalog: what one device of each type can do and costs. The numbers live in
data/hardware.yaml with their sources; users add or override types with a YAML of the same
shape. The analytic latency model reads these figures; nothing here is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

GB = 1e9
GiB = 1 << 30


@dataclass(slots=True, frozen=True)
class Hardware:
    """One device type. Bandwidths in bytes/s one direction, memory in bytes."""

    name: str
    peak_flops: float
    mem_bandwidth: float
    memory_bytes: int
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int
    price_per_hour: float
    power_w: float
    kind: str = "gpu"
    # Achievable share of peak: compute for big matmuls, memory for streaming reads.
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    step_overhead_s: float = 0.002  # scheduling, launches and sampling per engine step
    link_latency_s: float = 10e-6  # one collective or one point-to-point hop
    gpu_product: str = ""  # Kubernetes node label nvidia.com/gpu.product of this type

    def __post_init__(self) -> None:
        for key in ("peak_flops", "mem_bandwidth", "memory_bytes", "intra_node_bandwidth",
                    "inter_node_bandwidth", "gpus_per_node"):  # fmt: skip
            if getattr(self, key) <= 0:
                raise ValueError(f"hardware {self.name}: {key} must be > 0")
        if self.kind not in ("gpu", "cpu"):
            raise ValueError(f"hardware {self.name}: kind must be gpu or cpu")
        for key in ("compute_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"hardware {self.name}: {key} must be in (0, 1]")

    @classmethod
    def from_entry(cls, name: str, entry: dict[str, Any]) -> Hardware:
        try:
            return cls(
                name=name,
                peak_flops=float(entry["peak_tflops"]) * 1e12,
                mem_bandwidth=float(entry["hbm_gb_s"]) * GB,
                memory_bytes=int(float(entry["memory_gib"]) * GiB),
                intra_node_bandwidth=float(entry["nvlink_gb_s"]) * GB,
                inter_node_bandwidth=float(entry["network_gb_s"]) * GB,
                gpus_per_node=int(entry.get("gpus_per_node", 8)),
                price_per_hour=float(entry.get("price_per_hour", 0.0)),
                power_w=float(entry.get("power_w", 0.0)),
                kind=entry.get("kind", "gpu"),
                compute_efficiency=float(entry.get("compute_efficiency", 0.6)),
                memory_efficiency=float(entry.get("memory_efficiency", 0.8)),
                step_overhead_s=float(entry.get("step_overhead_ms", 2.0)) / 1e3,
                link_latency_s=float(entry.get("link_latency_us", 10.0)) / 1e6,
                gpu_product=str(entry.get("gpu_product", "")),
            )
        except KeyError as e:
            raise ValueError(f"hardware {name}: missing {e.args[0]!r}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_entry(self) -> dict[str, Any]:
        """from_entry's inverse: the catalog's units (TFLOP/s, GB/s, GiB), as a plan file
        records the hardware it was made for."""
        return {
            "kind": self.kind, "peak_tflops": self.peak_flops / 1e12,
            "hbm_gb_s": self.mem_bandwidth / GB, "memory_gib": self.memory_bytes / GiB,
            "nvlink_gb_s": self.intra_node_bandwidth / GB,
            "network_gb_s": self.inter_node_bandwidth / GB, "gpus_per_node": self.gpus_per_node,
            "price_per_hour": self.price_per_hour, "power_w": self.power_w,
            "compute_efficiency": self.compute_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "step_overhead_ms": self.step_overhead_s * 1e3,
            "link_latency_us": self.link_latency_s * 1e6, "gpu_product": self.gpu_product,
        }  # fmt: skip

    def with_gpus_per_node(self, gpus_per_node: int) -> Hardware:
        if gpus_per_node < 1:
            raise ValueError("--gpus-per-node must be >= 1")
        return replace(self, gpus_per_node=gpus_per_node)


def load_catalog(extra: str | Path | None = None) -> dict[str, Hardware]:
    """The built-in catalog, plus (overriding by name) the entries of `extra`."""
    text = resources.files("cluster.placement").joinpath("data/hardware.yaml").read_text()
    entries = yaml.safe_load(text)
    if extra is not None:
        more = yaml.safe_load(Path(extra).read_text())
        if not isinstance(more, dict):
            raise ValueError(f"{extra}: a hardware catalog is a mapping of name -> figures")
        entries.update(more)
    return {name: Hardware.from_entry(name, entry) for name, entry in entries.items()}


def get_hardware(name: str, catalog: dict[str, Hardware]) -> Hardware:
    by_lower = {key.lower(): hw for key, hw in catalog.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown hardware {name!r}: the catalog has {', '.join(catalog)}")
    return by_lower[name.lower()]
