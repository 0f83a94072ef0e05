"""A planned cluster on this machine: every instance of a deployment becomes one emulated
instance (engine/emulation.py) standing for its TP x PP devices of the emulated hardware, so
the router, scheduler, KV transfers and failure handling run for real at the step times the
placement model predicts, `time_scale` times slower. `cluster serve --emulate` and
`cluster bench compare --emulate` use it.

Each pool's engine gets `model_runner: emulated` and an `emulation` entry: the hardware, the
model (preset or config.json), the instance's TP x PP (taken out of tensor_parallel_size /
pipeline_parallel_size: the emulated instance is one process), the time scale, and for the
decode pool the KV link bandwidth the planner assumes for the deployment's affinity. The
tokenizer and vocabulary are the tiny default's (outputs are deterministic hash tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.engine.emulation import Emulation
from cluster.launch import DeploymentConfig
from cluster.placement.search import kv_bandwidth

PARALLEL_KEYS = ("tensor_parallel_size", "pipeline_parallel_size")


@dataclass(slots=True, frozen=True)
class EmulationSettings:
    hardware: str
    model: str  # preset name or config.json
    time_scale: float = 1.0
    affinity: str = "high"  # the plan's: low = the KV moves over NVLink
    catalog: str | None = None
    # Per role: the plan's prefill batch limit or colocated step budget, as the planner
    # simulated it (max_num_batched_tokens).
    batch_tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.time_scale >= 1.0:
            raise ValueError(f"--time-scale must be >= 1, got {self.time_scale}")
        if self.affinity not in ("high", "low"):
            raise ValueError(f"affinity must be high or low, got {self.affinity!r}")


def shapes(config: DeploymentConfig) -> dict[str, tuple[int, int]]:
    """(TP, PP) of each pool of the deployment, as configured."""
    out = {}
    for role in config.roles():
        options = {**config.engine, **getattr(config, role).engine}
        out[role] = (int(options.get(PARALLEL_KEYS[0], 1)), int(options.get(PARALLEL_KEYS[1], 1)))
    return out


def emulate(config: DeploymentConfig, settings: EmulationSettings) -> DeploymentConfig:
    """Turn every pool of `config` into emulated instances of its TP x PP (in place; also
    returned). ValueError for an unknown model or hardware, or a shape the model cannot take.
    """
    sizes = shapes(config)
    config.engine = {k: v for k, v in config.engine.items() if k not in PARALLEL_KEYS}
    config.model = None  # the tiny default's tokenizer; the emulated model is in `emulation`
    parallel = {}
    for role, (tp, pp) in sizes.items():
        emulation = Emulation(settings.hardware, settings.model, tp, pp, settings.time_scale,
                              catalog=settings.catalog)  # fmt: skip
        spec, _, parallel[role] = emulation.resolve()
        config.served_model_name = config.served_model_name or spec.name
    for role, (tp, pp) in sizes.items():
        entry = {
            "hardware": settings.hardware, "model": settings.model, "tp": tp, "pp": pp,
            "time_scale": settings.time_scale, "catalog": settings.catalog,
        }  # fmt: skip
        if role == "decode":
            entry["kv_bandwidth"] = kv_bandwidth(
                parallel["prefill"], parallel["decode"], settings.affinity
            )
        pool = getattr(config, role)
        engine = {k: v for k, v in pool.engine.items() if k not in PARALLEL_KEYS}
        engine.update(model_runner="emulated", emulation=entry)
        if role in settings.batch_tokens:
            engine["max_num_batched_tokens"] = settings.batch_tokens[role]
        if role == "prefill":  # whole prompts batched up to the limit, as the planner models
            engine["chunked_prefill"] = False
        pool.engine = engine
    return config


def num_devices(config: DeploymentConfig) -> int:
    """Emulated devices of a deployment: TP x PP per instance, summed."""
    return sum(
        tp * pp * getattr(config, role).num_instances for role, (tp, pp) in _emulated(config)
    )


def _emulated(config: DeploymentConfig):
    for role in config.roles():
        options = {**config.engine, **getattr(config, role).engine}
        entry = options.get("emulation") or {}
        yield role, (int(entry.get("tp", 1)), int(entry.get("pp", 1)))


def describe(config: DeploymentConfig) -> str:
    """'emulated A100-80GB x8 (2 prefill TP2, 1 decode TP4), time scale 8' for logs."""
    parts, first = [], None
    for role, (tp, pp) in _emulated(config):
        entry = {**config.engine, **getattr(config, role).engine}["emulation"]
        first = first or entry
        shape = f"TP{tp}" + (f"xPP{pp}" if pp > 1 else "")
        parts.append(f"{getattr(config, role).num_instances} {role} {shape}")
    return (
        f"emulated {first['model']} on {num_devices(config)}x {first['hardware']} "
        f"({', '.join(parts)}), time scale {first['time_scale']:g}"
    )
