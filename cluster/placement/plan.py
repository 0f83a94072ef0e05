"""The plan file: what `placement plan` writes and `cluster serve --plan`, `placement
simulate` and the KubeRay generator read. YAML (or JSON), validated on load so that a hand
edit that breaks a constraint is refused with the field that is wrong.

    version: 1
    mode: disaggregated                 # or colocated
    affinity: high                      # high | low (stage-sharing nodes)
    model: {name, num_layers, ...}      # ModelSpec
    hardware: {A100-80GB: {...}}        # the catalog entries the plan uses
    slo: {ttft_s, tpot_s, attainment}
    workload: {name, mean_input_len, mean_output_len, ...}
    prefill: {hardware, tensor_parallel_size, pipeline_parallel_size, num_instances, ...}
    decode:  {...}                      # (colocated plans: one `colocated` pool)
    placement: [{node, hardware, groups: [{role, instance, stage, gpu_ids}]}]
    predicted: {goodput_rps, goodput_per_gpu, num_gpus, cost_per_hour, power_w, ...}
    colocated_baseline: {...}           # the same numbers for the best colocated plan
    runner_ups: [{pools, goodput_per_gpu, ...}]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.placement.hardware import Hardware
from cluster.placement.model_spec import ModelSpec

ROLES = {"disaggregated": ("prefill", "decode"), "colocated": ("colocated",)}


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the field."""


@dataclass(slots=True)
class PoolPlan:
    role: str
    hardware: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    num_instances: int
    max_batch_tokens: int
    kv_capacity_tokens: int

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.num_instances


@dataclass(slots=True)
class Plan:
    mode: str
    affinity: str
    model: ModelSpec
    hardware: dict[str, Hardware]
    slo: dict[str, float]
    workload: dict[str, Any]
    pools: list[PoolPlan]
    placement: list[dict] = field(default_factory=list)
    predicted: dict[str, Any] = field(default_factory=dict)
    colocated_baseline: dict[str, Any] | None = None
    runner_ups: list[dict] = field(default_factory=list)
    planning_s: float = 0.0
    version: int = 1

    def pool(self, role: str) -> PoolPlan:
        return next(p for p in self.pools if p.role == role)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "mode": self.mode,
                               "affinity": self.affinity}  # fmt: skip
        for pool in self.pools:
            entry = asdict(pool)
            entry.pop("role")
            out[pool.role] = entry
        out.update(
            model={k: v for k, v in self.model.to_dict().items()},
            hardware={name: hw.to_entry() for name, hw in self.hardware.items()},
            slo=dict(self.slo),
            workload=dict(self.workload),
            placement=self.placement,
            predicted=self.predicted,
            colocated_baseline=self.colocated_baseline,
            runner_ups=self.runner_ups,
            planning_s=self.planning_s,
        )
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("a plan is a mapping (YAML or JSON object)")
        mode = data.get("mode")
        if mode not in ROLES:
            raise PlanError(f"mode must be disaggregated or colocated, got {mode!r}")
        model = _model(data.get("model"))
        hardware = _hardware(data.get("hardware"))
        pools = [_pool(role, data.get(role), model, hardware) for role in ROLES[mode]]
        slo = data.get("slo") or {}
        for key in ("ttft_s", "tpot_s"):
            if not isinstance(slo.get(key), int | float) or slo[key] <= 0:
                raise PlanError(f"slo.{key} must be a number of seconds > 0")
        affinity = data.get("affinity", "high")
        if affinity not in ("high", "low"):
            raise PlanError(f"affinity must be high or low, got {affinity!r}")
        return cls(
            mode=mode, affinity=affinity, model=model, hardware=hardware,
            slo={"attainment": 0.9, **slo}, workload=data.get("workload") or {}, pools=pools,
            placement=data.get("placement") or [], predicted=data.get("predicted") or {},
            colocated_baseline=data.get("colocated_baseline"),
            runner_ups=data.get("runner_ups") or [], planning_s=data.get("planning_s", 0.0),
            version=data.get("version", 1),
        )  # fmt: skip

    def save(self, path: str | Path) -> None:
        data = self.to_dict()
        text = json.dumps(data, indent=1) if str(path).endswith(".json") else _yaml(data)
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise PlanError(f"{path} is not valid YAML/JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e


def _yaml(data: dict) -> str:
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False, width=100)


def _model(data: Any) -> ModelSpec:
    if not isinstance(data, dict):
        raise PlanError("model must be a mapping of the model's shape (see `placement spec`)")
    try:
        return ModelSpec.from_dict(data)
    except (TypeError, ValueError) as e:
        raise PlanError(f"model: {e}") from e


def _hardware(data: Any) -> dict[str, Hardware]:
    if not isinstance(data, dict) or not data:
        raise PlanError("hardware must map each device type the plan uses to its figures")
    try:
        return {name: Hardware.from_entry(name, entry) for name, entry in data.items()}
    except (TypeError, ValueError) as e:
        raise PlanError(f"hardware: {e}") from e


def _pool(role: str, data: Any, model: ModelSpec, hardware: dict[str, Hardware]) -> PoolPlan:
    if not isinstance(data, dict):
        raise PlanError(f"the plan has no {role} pool")
    fields = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "num_instances": 1,
              "max_batch_tokens": 2048, "kv_capacity_tokens": 0}  # fmt: skip
    values = {}
    for key, default in fields.items():
        value = data.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (key != "kv_capacity_tokens")
        ):
            raise PlanError(f"{role}.{key} must be a positive integer, got {value!r}")
        values[key] = value
    name = data.get("hardware")
    if name not in hardware:
        raise PlanError(f"{role}.hardware {name!r} is not in the plan's hardware section")
    tp, pp = values["tensor_parallel_size"], values["pipeline_parallel_size"]
    if model.num_heads % tp:
        raise PlanError(
            f"{role}.tensor_parallel_size={tp} does not divide the model's "
            f"{model.num_heads} attention heads"
        )
    if model.num_layers % pp:
        raise PlanError(
            f"{role}.pipeline_parallel_size={pp} does not divide the model's "
            f"{model.num_layers} layers"
        )
    if tp > hardware[name].gpus_per_node:
        raise PlanError(
            f"{role}.tensor_parallel_size={tp} exceeds the {hardware[name].gpus_per_node} "
            f"devices of a {name} node: a tensor-parallel group must stay inside a node"
        )
    return PoolPlan(role=role, hardware=name, **values)
