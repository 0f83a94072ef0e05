"""Mixed hardware pools: the device types each role may run on (`autoscale.hardware`), each
one's latency model for the sizer and its price, from the deployment's engines.

    emulated engines   names from the hardware catalog; each type's model is the catalog's
                       AnalyticLatency at the role's TP x PP (what the emulated instances of
                       that type step at), its price the catalog's
    real engines       names are Ray accelerator types; each type's model is its fitted
                       profile (`autoscale.profile: {name: path}`, or one path for one type)

Without `autoscale.hardware` each role has the config's own one type, as before: the emulated
hardware's name, or None for real engines (no accelerator type asked for).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.placement import sizing
from cluster.placement.hardware import load_catalog

ROLES = ("prefill", "decode")


@dataclass(slots=True, frozen=True)
class PoolHardware:
    """What the autoscaler may start, per role. `allowed[role]`: the type names, the first
    where the pools start (None: the config's own, unnamed); `kinds[role][name]`: the sizer's
    InstanceType of each (None: no model, the autoscaler scales on breaches alone); `prices`:
    $/device-hour of the types whose price is known."""

    allowed: dict[str, tuple[str | None, ...]]
    kinds: dict[str, dict[str | None, sizing.InstanceType]] | None
    prices: dict[str | None, float]
    is_mixed: bool  # autoscale.hardware given: the controller chooses among the types

    def start_type(self, role: str) -> str | None:
        """What the launcher starts `role`'s first instances on: its first listed type (None
        without a list: the config's own)."""
        return self.allowed[role][0] if self.is_mixed else None

    def default(self, role: str) -> str | None:
        """The type of an instance of `role` that was started without one, or at start-up."""
        return self.allowed[role][0]


def pool_hardware(config) -> PoolHardware:
    """The deployment's pool types (a DeploymentConfig under autoscale), checked: ValueError
    saying what to change for an unknown catalog name, a shape the model cannot take on a
    type, or real engines listing several types without a profile per type."""
    settings = config.autoscale
    shapes = {role: _shape(config.engine_config(role)) for role in ROLES}
    emulations = {role: config.engine_config(role).emulation for role in ROLES}
    if emulations["prefill"] is not None:
        return _emulated(settings, emulations, shapes)
    return _real(settings, shapes)


def _shape(engine) -> tuple[int, int]:
    if engine.emulation is not None:
        return engine.emulation.tp, engine.emulation.pp
    return engine.tensor_parallel_size, engine.pipeline_parallel_size


def _emulated(settings, emulations, shapes) -> PoolHardware:
    emulation = emulations["prefill"]
    catalog = load_catalog(emulation.catalog)
    by_lower = {name.lower(): name for name in catalog}
    allowed = {}
    for role in ROLES:
        names = settings.hardware_names(role) or (emulations[role].hardware,)
        unknown = [n for n in names if n.lower() not in by_lower]
        if unknown:
            raise ValueError(f"autoscale.hardware.{role}: unknown hardware {unknown}; the "
                             f"catalog has {', '.join(catalog)} (add others with a catalog "
                             "YAML: emulation.catalog)")  # fmt: skip
        allowed[role] = tuple(names)
    kinds = {role: {} for role in ROLES}
    for role, names in allowed.items():
        tp, pp = shapes[role]
        for name in names:
            try:
                kinds[role][name] = sizing.instance_type(emulation.model, name, tp, pp, catalog)
            except ValueError as e:
                raise ValueError(f"autoscale.hardware.{role}: {e}: drop {name} from the list or "
                                 "change the pool's TP x PP") from None  # fmt: skip
    prices = {n: k.cost_per_gpu_hour for role in ROLES for n, k in kinds[role].items()}
    return PoolHardware(allowed, kinds, prices, settings.hardware is not None)


def _real(settings, shapes) -> PoolHardware:
    """Real engines: a profile per listed type (a mapping), or the one profile for every
    instance (one type at most listed); no profile: no model."""
    is_mixed = settings.hardware is not None
    allowed = {role: settings.hardware_names(role) or (None,) for role in ROLES}
    names = {n for role in ROLES for n in allowed[role]}
    profile = settings.profile
    if len(names) > 1 and not isinstance(profile, dict):
        raise ValueError(
            f"autoscale.hardware lists several device types ({', '.join(map(str, names))}) for "
            "real engines: the sizer needs a fitted profile of each, so give autoscale.profile "
            "as a mapping {type: `placement profile` file}, or list one type"
        )
    if profile is None:
        return PoolHardware(allowed, None, {}, is_mixed)
    paths = {name: profile if isinstance(profile, str) else profile.get(name) for name in names}
    for role in ROLES:
        if any(paths[name] is None for name in allowed[role]):
            raise ValueError(
                f"autoscale.profile maps types to profiles, but the {role} pool's "
                f"type is not listed: list it under autoscale.hardware.{role}"
            )
    kinds = {role: {} for role in ROLES}
    for role in ROLES:
        tp, pp = shapes[role]
        for name in allowed[role]:
            try:
                kinds[role][name] = sizing.profile_type(paths[name], tp, pp)
            except OSError as e:
                raise ValueError(f"autoscale.profile of {name}: cannot read it ({e})") from None
    prices = {n: k.cost_per_gpu_hour for role in ROLES for n, k in kinds[role].items()}
    return PoolHardware(allowed, kinds, prices, is_mixed)
