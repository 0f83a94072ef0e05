"""What the autoscaler does each interval: a pure function of what the router saw and the
pools as they are (no clock, no I/O: tests script it).

    forecast     the arrival rate of the last few intervals x headroom (in the model's
                 seconds: router seconds x time_scale under emulation)
    model        the smallest pools that meet the SLOs at that rate over the recent prompt
                 and output length distributions (placement/sizing.py), when there is a
                 model and enough samples; else the pools stay as they are
    correction   an SLO breach in the last few intervals grows the pool that misses it by
                 one now, whatever the model says (TPOT: decode; TTFT: prefill, or decode
                 when the late requests spent most of their wait on the decode side);
                 requests still waiting for a first token past the TTFT target are misses.
                 One at a time: none while the last one starts, and a TTFT breach only on
                 the requests that arrived once the pool's last growth was serving
    hysteresis   a pool shrinks by one, only after `scale_down_after` decisions in a row
                 wanted it smaller and none breached, and `cooldown_s` after it last grew,
                 and only to a size the model finds enough at the forecast x
                 `scale_down_margin` (a band against the forecast's noise) and the largest
                 recommended over the last `scale_down_window_s`; it grows at once
    bounds       one instance per role at least; the devices within [min_gpus, max_gpus].
                 At max_gpus, a pool that must grow takes from the other's slack (what the
                 model says it does not need) at once, hysteresis or not
    flips        a pool that grows while the other shrinks takes the other's instance:
                 a flip (drain, change role), not a stop and a start
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.elastic.settings import AutoscaleSettings
from cluster.elastic.window import Observation

ROLES = ("prefill", "decode")
_OTHER = {"prefill": "decode", "decode": "prefill"}


@dataclass(slots=True, frozen=True)
class Action:
    kind: str  # add | remove | flip (from the other role)
    role: str  # the pool that grows (add, flip) or shrinks (remove)
    cause: str  # forecast | ttft_breach | tpot_breach | slack | bounds


@dataclass(slots=True, frozen=True)
class Decision:
    current: dict[str, int]
    target: dict[str, int]
    actions: tuple[Action, ...]
    reason: str  # one line, for the log
    forecast_rate: float  # requests/s, model seconds
    attainment: tuple[float | None, float | None]  # (TTFT, TPOT) of the last interval


@dataclass(slots=True)
class Controller:
    settings: AutoscaleSettings
    gpus: dict[str, int]  # devices per instance of each role
    # (rate, input lengths, output lengths) -> sizes with num_prefill, num_decode (the
    # planner's model: autoscaler.py makes it from placement/sizing.py)
    sizer: Callable | None = None
    time_scale: float = 1.0  # router seconds per model second (emulation)
    can_flip: bool = True  # settings.flip, and the instances can (workers/elastic.py)
    _slack: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    _grew_at: dict[str, float] = field(default_factory=dict)  # when each pool last grew
    _growing: set[str] = field(default_factory=set)  # grew, the new instance not serving yet
    _ready_at: dict[str, float] = field(default_factory=dict)  # ... and when it was
    _recommended: deque = field(default_factory=deque)  # (when, sizes) of recent decisions

    def decide(self, recent: Observation, rate: float, history: Observation,
               current: dict[str, int], pending: dict[str, int] | None = None
               ) -> Decision:  # fmt: skip
        """`recent`: the last few intervals (attainment, and the prompt lengths arriving
        now); `rate`: arrivals per router second; `history`: the longer past's lengths;
        `current`: the instances of each pool, counting those starting and not those
        draining; `pending`: of those, the ones still starting (or flipping in). `recent.end`
        is now."""
        s = self.settings
        forecast = rate * self.time_scale * s.headroom
        why: list[str] = []
        model = self._model(forecast, recent, history, current, why)
        target = dict(model)
        if s.scale_down_margin > 1 and any(model[r] < current[r] for r in ROLES):
            # A pool shrinks only to what still suffices at a higher rate: a band against
            # flapping on the forecast's noise (HPA's tolerance, in the model's terms).
            band = self._model(forecast * s.scale_down_margin, recent, history, current, [])
            for role in ROLES:
                target[role] = max(target[role], min(band[role], current[role]))
        # ... and only to the largest size recommended over the last scale_down_window_s
        # (HPA's scale-down stabilization): one low forecast does not shrink a pool.
        now = recent.end
        self._recommended.append((now, dict(target)))
        while now - self._recommended[0][0] > s.scale_down_window_s:
            self._recommended.popleft()
        for role in ROLES:
            highest = max(r[role] for _, r in self._recommended)
            target[role] = max(target[role], min(highest, current[role]))
        causes = dict.fromkeys(ROLES, "forecast")
        attained = recent.attainment(s.ttft_s, s.tpot_s, self.time_scale)
        judged = recent.num_judged >= s.min_samples
        breached = False
        span = recent.end - recent.start
        for role in list(self._growing):  # its last growth is serving now
            if not (pending or {}).get(role, 0):
                self._ready_at[role] = now
                self._growing.discard(role)
        ttft_pool = self._ttft_pool(recent)
        for role, value, name in ((ttft_pool, attained[0], "ttft"), ("decode", attained[1],
                                  "tpot")):  # fmt: skip
            if not (judged and value is not None and value < s.attainment):
                continue
            breached = True
            why.append(f"{name.upper()} attainment {value:.0%} < {s.attainment:.0%}")
            # One correction at a time: not while the last one still starts, and only on
            # requests that could have seen it.
            if (pending or {}).get(role, 0) > 0 or target[role] > current[role]:
                continue
            if name == "ttft" and not self._misses_since_ready(recent, role):
                why.append(f"the misses queued before {role} last grew: no correction")
                continue
            if name == "tpot" and now - self._grew_at.get(role, -math.inf) < span:
                continue
            target[role] = current[role] + 1
            causes[role] = f"{name}_breach"
        for role in ROLES:  # grow at once; shrink by one after enough slack, never on a breach
            if target[role] > current[role]:
                self._grew_at[role] = now
                self._growing.add(role)
            if target[role] >= current[role] or breached:
                self._slack[role] = 0
                target[role] = max(target[role], current[role])
                continue
            self._slack[role] += 1
            cooling = now - self._grew_at.get(role, -math.inf) < s.cooldown_s
            if self._slack[role] < s.scale_down_after or cooling:
                target[role] = current[role]
            else:
                target[role], causes[role] = current[role] - 1, "slack"
                self._slack[role] = 0
        self._bound(target, model, current, causes, why)
        actions = self._actions(current, target, causes)
        reason = "; ".join(why) or "holding"
        return Decision(dict(current), target, actions, reason, forecast, attained)

    def _misses_since_ready(self, recent: Observation, role: str) -> bool:
        """Whether the TTFT target is still missed by the requests that arrived after `role`
        last grew and its instance was serving: a queue from before it (a step in load, the
        instance's start) drains on the capacity there is now, and a correction for it would
        overshoot."""
        s = self.settings
        ready = self._ready_at.get(role)
        fresh = recent if ready is None else recent.arrived_since(ready)
        if fresh.num_judged < s.min_samples:
            return False
        value = fresh.attainment(s.ttft_s, s.tpot_s, self.time_scale)[0]
        return value is not None and value < s.attainment

    def _ttft_pool(self, recent: Observation) -> str:
        """The pool a TTFT breach grows: decode when the requests that missed spent most of
        their time to first token on the decode side (no decode instance free, no KV room,
        the pull), else prefill (its queue and compute)."""
        limit = self.settings.ttft_s * self.time_scale
        missed = [(t, d) for t, d in recent.ttft_splits if t > limit]
        if missed and sum(d for _, d in missed) > 0.5 * sum(t for t, _ in missed):
            return "decode"
        return "prefill"

    def _model(self, forecast: float, recent: Observation, history: Observation,
               current: dict[str, int], why: list[str]) -> dict[str, int]:  # fmt: skip
        """The model's pools at the forecast rate, over the prompt lengths arriving now (the
        history's when few arrived) and the history's output lengths (known only when
        requests finish); the current pools without a model or samples."""
        least = self.settings.min_samples
        inputs = recent.input_lens if len(recent.input_lens) >= least else history.input_lens
        outputs = history.output_lens
        if self.sizer is None or min(len(inputs), len(outputs)) < least or forecast <= 0:
            return dict(current)
        sizes = self.sizer(forecast, inputs, outputs)
        why.append(f"model at {forecast:.2f} req/s: {sizes.num_prefill} prefill + "
                   f"{sizes.num_decode} decode")  # fmt: skip
        return {"prefill": sizes.num_prefill, "decode": sizes.num_decode}

    def _devices(self, counts: dict[str, int]) -> int:
        return sum(counts[r] * self.gpus[r] for r in ROLES)

    def _bound(self, target: dict[str, int], model: dict[str, int], current: dict[str, int],
               causes: dict[str, str], why: list[str]) -> None:  # fmt: skip
        s = self.settings
        for role in ROLES:
            target[role] = max(1, target[role])
        while self._devices(target) > s.max_gpus:
            growing = [r for r in ROLES if target[r] > current[r]]
            role = max(growing or ROLES, key=lambda r: target[r] - current[r])
            other = _OTHER[role]
            if growing and target[other] > max(1, model[other]):  # take the other's slack
                target[other] -= 1
                causes[other] = "slack"
                continue
            if target[role] > 1:
                target[role] -= 1
            elif target[other] > 1:
                target[other] -= 1
            else:
                break  # one instance per role is the least there is
            why.append(f"capped at {s.max_gpus} devices")
        while self._devices(target) < s.min_gpus:
            role = min(ROLES, key=lambda r: target[r] * self.gpus[r])
            target[role] += 1
            causes[role] = "bounds"

    def _actions(self, current: dict[str, int], target: dict[str, int],
                 causes: dict[str, str]) -> tuple[Action, ...]:  # fmt: skip
        delta = {r: target[r] - current[r] for r in ROLES}
        actions: list[Action] = []
        up = next((r for r in ROLES if delta[r] > 0), None)
        if up is not None and self.can_flip and self.gpus["prefill"] == self.gpus["decode"]:
            down = _OTHER[up]
            flips = min(delta[up], -delta[down]) if delta[down] < 0 else 0
            actions += [Action("flip", up, causes[up])] * flips
            delta[up] -= flips
            delta[down] += flips
        for role in ROLES:  # capacity comes before capacity goes
            actions += [Action("add", role, causes[role])] * max(0, delta[role])
        for role in ROLES:
            actions += [Action("remove", role, causes[role])] * max(0, -delta[role])
        return tuple(actions)
