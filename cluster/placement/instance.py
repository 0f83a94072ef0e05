"""One candidate instance shape: a device type, TP × PP, and what follows from them (latency
model, KV capacity, prefill batch limit), plus the checks that rule a shape out (TP must divide
the attention heads and stay in a node, PP must divide the layers, weights + KV must fit)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cluster.placement.hardware import GiB, Hardware, get_hardware
from cluster.placement.latency import AnalyticLatency, FittedLatency, fitted_from_profile
from cluster.placement.model_spec import ModelSpec
from cluster.placement.simulator import InstanceSpec

MEMORY_UTILIZATION = 0.9  # share of device memory for weights + KV (vLLM's default)
ACTIVATION_RESERVE_BYTES = 2 * GiB  # per device: activations, CUDA graphs, fragmentation


@dataclass(slots=True, frozen=True)
class ParallelConfig:
    hardware: Hardware
    tp: int
    pp: int

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        return f"{self.hardware.name} TP{self.tp}xPP{self.pp}"


def why_invalid(model: ModelSpec, config: ParallelConfig) -> str | None:
    """None if the shape can run the model, else the reason it cannot."""
    hw, tp, pp = config.hardware, config.tp, config.pp
    if tp < 1 or pp < 1:
        return "TP and PP must be >= 1"
    if model.num_heads % tp:
        return f"TP={tp} does not divide the model's {model.num_heads} attention heads"
    if tp > hw.gpus_per_node:
        return f"TP={tp} does not fit in one {hw.name} node of {hw.gpus_per_node} devices"
    if model.num_layers % pp:
        return f"PP={pp} does not divide the model's {model.num_layers} layers"
    if kv_capacity_tokens(model, config) < 1:
        need = model.weight_bytes / config.num_devices / GiB
        usable = hw.memory_bytes * MEMORY_UTILIZATION / GiB - ACTIVATION_RESERVE_BYTES / GiB
        return (
            f"the weights need {need:.1f} GiB per device on {config.describe()}, more than "
            f"the {usable:.1f} GiB usable of a {hw.name}"
        )
    return None


def kv_capacity_tokens(model: ModelSpec, config: ParallelConfig) -> int:
    """Tokens of KV cache the instance holds after its weights (KV heads replicate once TP
    exceeds their number, so that share of memory holds fewer tokens)."""
    hw, devices = config.hardware, config.num_devices
    usable = devices * (hw.memory_bytes * MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES)
    free = usable - model.weight_bytes
    replication = config.tp / min(config.tp, model.num_kv_heads)
    return max(0, int(free / (model.kv_bytes_per_token * replication)))


def prefill_batch_tokens(model: ModelSpec, config: ParallelConfig) -> int:
    """DistServe batches prefills up to the length L_m where the device saturates: past it a
    bigger batch only adds latency. We take twice the roofline ridge point (FLOPs per token
    against the stage's weight bytes), as a power of two in [512, 8192]."""
    hw = config.hardware
    per_token = model.flops_per_token / (hw.peak_flops * hw.compute_efficiency)
    weights = model.weight_bytes / (hw.mem_bandwidth * hw.memory_efficiency)
    ridge = 2 * weights / per_token
    tokens = 512
    while tokens < ridge and tokens < 8192:
        tokens *= 2
    return tokens


@dataclass(slots=True)
class LatencySource:
    """Where latencies come from: the analytic model, or a measured profile on one device
    type scaled to other shapes by the analytic ratio."""

    fitted: FittedLatency | None = None
    profile_hardware: str | None = None
    profile_model: dict | None = None  # ModelSpec.to_dict() of the profiled model
    _cache: dict = field(default_factory=dict)

    @classmethod
    def from_profile_file(cls, path: str | None, catalog: dict) -> LatencySource:
        """Fitted latencies from a `placement profile` file; the analytic model without one."""
        if not path:
            return cls()
        with open(path, encoding="utf-8") as f:
            prof = json.load(f)
        get_hardware(prof["hardware"], catalog)  # a profile of unknown hardware is refused
        return cls(fitted_from_profile(prof), prof["hardware"], prof["model"])

    def check_model(self, model: ModelSpec) -> None:
        """A profile measures one model: planning another with it would be fiction."""
        if self.profile_model is None:
            return
        keys = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
        differs = [k for k in keys if self.profile_model.get(k) != getattr(model, k)]
        if differs:
            raise ValueError(
                f"the profile measured {self.profile_model.get('name')}, not {model.name} "
                f"({', '.join(differs)} differ): profile the model you plan for"
            )

    def latency(self, model: ModelSpec, config: ParallelConfig):
        key = (config.hardware.name, config.tp, config.pp)
        if key not in self._cache:
            target = AnalyticLatency(model, config.hardware, config.tp, config.pp)
            if self.fitted is not None and config.hardware.name == self.profile_hardware:
                if config.num_devices == 1:
                    target = self.fitted
                else:
                    base = AnalyticLatency(model, config.hardware, 1, 1)
                    target = self.fitted.for_parallelism(target, base)
            self._cache[key] = target
        return self._cache[key]


def instance_spec(
    model: ModelSpec,
    config: ParallelConfig,
    source: LatencySource,
    role: str,
    max_batch_tokens: int | None = None,
) -> InstanceSpec:
    if max_batch_tokens is None:
        max_batch_tokens = 2048 if role == "colocated" else prefill_batch_tokens(model, config)
    return InstanceSpec(
        latency=source.latency(model, config),
        kv_capacity_tokens=kv_capacity_tokens(model, config),
        max_batch_tokens=max_batch_tokens,
    )
