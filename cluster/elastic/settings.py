"""The autoscaler's settings (`autoscale:` in a deployment config; `cluster serve --autoscale`).

autoscale:
  interval_s: 5          # decide this often (real seconds)
  min_gpus: 2            # devices the pools keep at least (one instance per role anyway)
  max_gpus: 16           # ... and take at most (on KubeRay: what maxReplicas allows)
  ttft_s: 1.0            # the SLOs it keeps (emulated seconds under --emulate)
  tpot_s: 0.1
  attainment: 0.9        # share of requests within both
  headroom: 1.2          # size for the forecast rate times this
  flip: true             # move an instance between prefill and decode, not stop + start
  scale_down_after: 3    # decisions in a row with slack before a pool shrinks
  scale_down_margin: 1.15  # ... to a size that would still do at the forecast x this
  scale_down_window_s: 60  # ... and to the largest size recommended over this long
  drain_timeout_s: 120   # then the streams still open move by the failure policy
  history_s: 60          # lengths and rates are taken over this much of the past
  profile: null          # `placement profile` output: the latency model of real engines
                         # (or {hardware name: path}, one per type listed below)
  hardware:              # mixed pools: the device types each role may run on (optional;
    prefill: [A100-80GB, H100-80GB]  # default: the config's own one type per role);
    decode: [A100-80GB]  # the first of each list is where the pools start
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class AutoscaleSettings:
    interval_s: float = 5.0
    min_gpus: int = 0  # 0: one instance per role
    max_gpus: int = 16
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    attainment: float = 0.9
    headroom: float = 1.2
    flip: bool = True
    scale_down_after: int = 3
    scale_down_margin: float = 1.15
    scale_down_window_s: float = 60.0
    cooldown_s: float = 30.0  # a pool shrinks no sooner than this after it grew
    drain_timeout_s: float = 120.0
    history_s: float = 60.0
    min_samples: int = 10  # finished requests a window needs before its attainment counts
    profile: str | dict[str, str] | None = None
    # role -> device type names (catalog names when emulated, Ray accelerator types else)
    hardware: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        self._check_hardware()
        for name in ("interval_s", "ttft_s", "tpot_s", "history_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"autoscale.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"autoscale.attainment must be in (0, 1], got {self.attainment!r}")
        if not self.scale_down_margin >= 1:
            raise ValueError(
                f"autoscale.scale_down_margin must be >= 1, got {self.scale_down_margin!r}"
            )
        if not self.headroom >= 1:
            raise ValueError(f"autoscale.headroom must be >= 1, got {self.headroom!r}")
        if self.min_gpus < 0 or self.max_gpus < max(1, self.min_gpus):
            raise ValueError(
                f"autoscale needs 0 <= min_gpus <= max_gpus, got {self.min_gpus} and "
                f"{self.max_gpus}"
            )
        if self.scale_down_after < 1 or self.min_samples < 1:
            raise ValueError("autoscale.scale_down_after and min_samples must be >= 1")
        if self.scale_down_window_s < 0:
            raise ValueError(
                f"autoscale.scale_down_window_s must be >= 0, got {self.scale_down_window_s}"
            )
        if self.cooldown_s < 0:
            raise ValueError(f"autoscale.cooldown_s must be >= 0, got {self.cooldown_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"autoscale.drain_timeout_s must be >= 0, got {self.drain_timeout_s}")

    def _check_hardware(self) -> None:
        """The shape of `hardware` and `profile` (names against the catalog: elastic/hardware.py,
        once the deployment's engines are known)."""
        if self.hardware is not None:
            if not isinstance(self.hardware, dict) or not self.hardware:
                raise ValueError("autoscale.hardware is a mapping {prefill: [names], decode: "
                                 f"[names]}}, got {self.hardware!r}")  # fmt: skip
            unknown = sorted(set(self.hardware) - {"prefill", "decode"})
            if unknown:
                raise ValueError(f"autoscale.hardware: unknown roles {unknown}: list types under "
                                 "prefill and decode only")  # fmt: skip
            for role, names in self.hardware.items():
                if isinstance(names, str):
                    names = [names]
                if not isinstance(names, list | tuple) or not names or \
                        not all(isinstance(n, str) and n for n in names):  # fmt: skip
                    raise ValueError(f"autoscale.hardware.{role} must be a non-empty list of "
                                     f"device type names, got {names!r}")  # fmt: skip
                if len(set(names)) != len(names):
                    raise ValueError(f"autoscale.hardware.{role} lists a type twice: {names}")
                self.hardware[role] = list(names)
        if isinstance(self.profile, dict):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.profile.items()):
                raise ValueError("autoscale.profile as a mapping is {hardware name: profile path}")
            listed = {n for names in (self.hardware or {}).values() for n in names}
            if not listed:
                raise ValueError(
                    "autoscale.profile maps hardware names to profiles: list those "
                    "names under autoscale.hardware (prefill: [...], decode: [...])"
                )
            missing = sorted(listed - set(self.profile))
            if missing:
                raise ValueError(
                    f"autoscale.profile has no profile for {missing}: give one "
                    "`placement profile` file per type in autoscale.hardware"
                )
        elif self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"autoscale.profile is a path or a mapping {{hardware name: path}}, "
                             f"got {self.profile!r}")  # fmt: skip

    def hardware_names(self, role: str) -> tuple[str, ...]:
        """The types `role` may run on (empty: the config's own one type)."""
        return tuple((self.hardware or {}).get(role, ()))
