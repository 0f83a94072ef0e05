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
    profile: str | None = None

    def __post_init__(self) -> None:
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
