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
    hardware     mixed pools (`autoscale.hardware`): the model sizes every pair of allowed
                 types and the cheapest meeting the SLOs is chosen, after it was the cheapest
                 `scale_down_after` decisions in a row and over `scale_down_window_s` (at once
                 when the chosen pair cannot meet them). Every rule above counts the chosen
                 type's instances; the others' count against max_gpus while they serve on.
                 A role whose chosen type changes migrates make-before-break: the new type
                 is added, and once none of it is starting and the target needs no more of
                 it, the other types' instances go (cause `migrate`). Flips only within one
                 type chosen by both roles
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
    cause: str  # forecast | ttft_breach | tpot_breach | slack | bounds | migrate
    hardware: str | None = None  # the type added, removed or flipped (None: the pool's one)


@dataclass(slots=True, frozen=True)
class Decision:
    current: dict[str, int]
    target: dict[str, int]
    actions: tuple[Action, ...]
    reason: str  # one line, for the log
    forecast_rate: float  # requests/s, model seconds
    attainment: tuple[float | None, float | None]  # (TTFT, TPOT) of the last interval
    hardware: dict[str, str] | None = None  # mixed pools: each role's chosen type


@dataclass(slots=True, frozen=True)
class TypedSizes:
    """A mixed-pools sizer's answer: the pools on a pair of named types (the cheapest pair
    when it was not asked for one) and whether they meet the SLOs."""

    num_prefill: int
    num_decode: int
    hardware: dict[str, str]  # role -> type
    meets_target: bool = True


@dataclass(slots=True)
class _Mix:
    """One decision's view of mixed pools: per role, the chosen type's instances and the
    others' ("legacy": what a migration replaces)."""

    chosen: dict[str, str]
    current: dict[str, int]  # of the chosen type, starting included
    pending: dict[str, int]  # ... still starting
    legacy: dict[str, dict[str, int]]  # other types, starting included
    serving: dict[str, dict[str, int]]  # ... those serving (what can be drained)

    @classmethod
    def of(cls, chosen: dict[str, str], counts: dict[str, dict[str, int]],
           starting: dict[str, dict[str, int]]) -> _Mix:  # fmt: skip
        legacy = {r: {t: n for t, n in counts[r].items() if t != chosen[r] and n > 0}
                  for r in ROLES}  # fmt: skip
        serving = {r: {t: n - starting[r].get(t, 0) for t, n in legacy[r].items()
                       if n > starting[r].get(t, 0)} for r in ROLES}  # fmt: skip
        return cls(
            chosen,
            {r: counts[r].get(chosen[r], 0) for r in ROLES},
            {r: starting[r].get(chosen[r], 0) for r in ROLES},
            legacy,
            serving,
        )

    def migrating(self, role: str, target: int) -> bool:
        """Whether `role`'s other types must stay: its chosen type still starts or grows."""
        return bool(self.pending[role]) or target > self.current[role]


@dataclass(slots=True)
class Controller:
    settings: AutoscaleSettings
    gpus: dict[str, int]  # devices per instance of each role
    # (rate, input lengths, output lengths) -> sizes with num_prefill, num_decode (the
    # planner's model: autoscaler.py makes it from placement/sizing.py)
    sizer: Callable | None = None
    time_scale: float = 1.0  # router seconds per model second (emulation)
    can_flip: bool = True  # settings.flip, and the instances can (workers/elastic.py)
    # Mixed pools: the types each role may run on; the sizer then takes hardware= (a role ->
    # type pair: the pools on it) and answers TypedSizes (the cheapest pair without it).
    hardware: dict[str, tuple[str, ...]] | None = None
    _chosen: dict[str, str] = field(default_factory=dict)  # each role's type (mixed pools)
    _votes: int = 0  # decisions in a row whose cheapest pair was not the chosen one
    _cheaper: tuple | None = None  # (that pair, when it first was the cheapest in the row)
    _slack: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    _grew_at: dict[str, float] = field(default_factory=dict)  # when each pool last grew
    _growing: set[str] = field(default_factory=set)  # grew, the new instance not serving yet
    _ready_at: dict[str, float] = field(default_factory=dict)  # ... and when it was
    _recommended: deque = field(default_factory=deque)  # (when, sizes) of recent decisions

    def decide(self, recent: Observation, rate: float, history: Observation,
               current: dict[str, int], pending: dict[str, int] | None = None,
               by_type: dict[str, dict[str, int]] | None = None,
               pending_by_type: dict[str, dict[str, int]] | None = None) -> Decision:  # fmt: skip
        """`recent`: the last few intervals (attainment, and the prompt lengths arriving
        now); `rate`: arrivals per router second; `history`: the longer past's lengths;
        `current`: the instances of each pool, counting those starting and not those
        draining; `pending`: of those, the ones still starting (or flipping in). Mixed pools
        (`hardware`): `by_type` and `pending_by_type` split both by type. `recent.end` is
        now."""
        s = self.settings
        forecast = rate * self.time_scale * s.headroom
        why: list[str] = []
        lens = self._lengths(recent, history, forecast)
        total, mix, sizes = current, None, None
        if self.hardware is not None:
            if by_type is None:
                raise ValueError("mixed pools: decide needs the counts by type (by_type)")
            sizes = self._choose(forecast, lens, by_type, recent.end, why)
            mix = _Mix.of(dict(self._chosen), by_type, pending_by_type or
                          {r: {} for r in ROLES})  # fmt: skip
            current = mix.current
        model = self._model(forecast, lens, current, why, sizes)
        target = dict(model)
        if s.scale_down_margin > 1 and any(model[r] < current[r] for r in ROLES):
            # A pool shrinks only to what still suffices at a higher rate: a band against
            # flapping on the forecast's noise (HPA's tolerance, in the model's terms).
            band = self._model(forecast * s.scale_down_margin, lens, current, [])
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
        if mix is None:
            self._bound(target, model, current, causes, why)
            actions = self._actions(current, target, causes)
            return Decision(dict(current), target, actions, "; ".join(why) or "holding",
                            forecast, attained)  # fmt: skip
        drops = self._make_room(target, mix, why)
        staying = sum(n * self.gpus[r] for r in ROLES if r in drops or mix.migrating(r, target[r])
                      for n in mix.legacy[r].values())  # fmt: skip
        floor = {r: 0 if r in drops else 1 for r in ROLES}  # (its other type serves on)
        self._bound(target, model, current, causes, why, staying, floor)
        return self._migrate(total, target, causes, why, forecast, attained, mix, drops)

    def _make_room(self, target: dict[str, int], mix: _Mix, why: list[str]
                   ) -> dict[str, str]:  # fmt: skip
        """Mixed pools at max_gpus: a role that migrates but has no room for one instance of
        its new type drains one of another type first (if it keeps a serving instance), and
        grows at a later decision. The roles and the type each drains."""
        held = self._devices(mix.current) + sum(
            n * self.gpus[r] for r in ROLES for n in mix.legacy[r].values())  # fmt: skip
        drops = {}
        for role in ROLES:
            serving = sum(mix.serving[role].values()) + mix.current[role] - mix.pending[role]
            if target[role] <= mix.current[role] or not mix.serving[role] or serving < 2:
                continue
            if held + self.gpus[role] > self.settings.max_gpus:
                drops[role] = min(mix.serving[role])
                target[role] = mix.current[role]
                why.append(f"no room for {role} on {mix.chosen[role]}: one on {drops[role]} "
                           "drains first")  # fmt: skip
        return drops

    def _migrate(self, total: dict[str, int], target: dict[str, int], causes: dict[str, str],
                 why: list[str], forecast: float, attained, mix: _Mix,
                 drops: dict[str, str]) -> Decision:  # fmt: skip
        """Mixed pools: the chosen types' actions, then the other types' instances that the
        target no longer needs (make-before-break: none while the chosen type starts or
        grows), or the one that makes room. The decision's target: each role's instances
        after its actions."""
        for role in ROLES:
            if mix.legacy[role] and causes[role] == "forecast":
                causes[role] = "migrate"
        actions = list(self._actions(mix.current, target, causes, mix.chosen))
        after = dict(target)
        for role in ROLES:
            after[role] += sum(mix.legacy[role].values())
            if role in drops:
                names = [drops[role]]
            elif mix.migrating(role, target[role]):
                continue
            else:
                names = [t for t, n in sorted(mix.serving[role].items()) for _ in range(n)]
                why.append(f"{role} on {mix.chosen[role]}: {', '.join(names)} not needed")
            actions += [Action("remove", role, "migrate", name) for name in names]
            after[role] -= len(names)
        return Decision(dict(total), after, tuple(actions), "; ".join(why) or "holding",
                        forecast, attained, dict(mix.chosen))  # fmt: skip

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

    def _lengths(self, recent: Observation, history: Observation, forecast: float
                 ) -> tuple | None:  # fmt: skip
        """The prompt lengths arriving now (the history's when few arrived) and the history's
        output lengths (known only when requests finish): what the model sizes for; None
        without a model, samples or load."""
        least = self.settings.min_samples
        inputs = recent.input_lens if len(recent.input_lens) >= least else history.input_lens
        outputs = history.output_lens
        if self.sizer is None or min(len(inputs), len(outputs)) < least or forecast <= 0:
            return None
        return inputs, outputs

    def _model(self, forecast: float, lens: tuple | None, current: dict[str, int],
               why: list[str], sizes=None) -> dict[str, int]:  # fmt: skip
        """The model's pools at the forecast rate (`sizes`: its answer already, mixed pools:
        on the chosen types); the current pools without a model or samples."""
        if lens is None:
            return dict(current)
        if sizes is None:
            sizes = (self.sizer(forecast, *lens) if self.hardware is None
                     else self.sizer(forecast, *lens, hardware=dict(self._chosen)))  # fmt: skip
        on = f" on {self._chosen['prefill']} + {self._chosen['decode']}" if self._chosen else ""
        why.append(f"model at {forecast:.2f} req/s: {sizes.num_prefill} prefill + "
                   f"{sizes.num_decode} decode{on}")  # fmt: skip
        return {"prefill": sizes.num_prefill, "decode": sizes.num_decode}

    def _choose(self, forecast: float, lens: tuple | None, by_type: dict[str, dict[str, int]],
                now: float, why: list[str]) -> TypedSizes | None:  # fmt: skip
        """Mixed pools: each role's type, and the model's pools on it. The cheapest pair
        replaces the chosen one once it was the cheapest for `scale_down_after` decisions in
        a row and over `scale_down_window_s` (a migration moves every instance: near the
        boundary between two pairs, the samples' noise alone makes either the cheapest), or
        at once when the chosen pair cannot meet the SLOs. At first, the types most
        instances run on."""
        s = self.settings
        if not self._chosen:
            self._chosen = {r: max(self.hardware[r], key=lambda t, r=r: (
                by_type[r].get(t, 0), -self.hardware[r].index(t))) for r in ROLES}  # fmt: skip
        if lens is None:
            return None
        best = self.sizer(forecast, *lens)
        if best.hardware == self._chosen:
            self._votes, self._cheaper = 0, None
            return best
        here = self.sizer(forecast, *lens, hardware=dict(self._chosen))
        if self._cheaper is None or self._cheaper[0] != best.hardware:
            self._votes, self._cheaper = 0, (dict(best.hardware), now)  # a new row
        self._votes += 1
        held = now - self._cheaper[1]
        new = f"{best.hardware['prefill']} + {best.hardware['decode']}"
        if (self._votes < s.scale_down_after or held < s.scale_down_window_s) and \
                here.meets_target:  # fmt: skip
            window = f", {held:.0f} of {s.scale_down_window_s:.0f} s" if s.scale_down_window_s \
                else ""  # fmt: skip
            why.append(f"cheaper on {new} ({self._votes}/{s.scale_down_after}{window})")
            return here
        why.append(f"hardware -> {new}" + ("" if here.meets_target else
                                          " (the chosen pair cannot meet the SLOs)"))  # fmt: skip
        self._chosen, self._votes, self._cheaper = dict(best.hardware), 0, None
        self._recommended.clear()  # (sizes of the other types)
        return best

    def _devices(self, counts: dict[str, int]) -> int:
        return sum(counts[r] * self.gpus[r] for r in ROLES)

    def _bound(self, target: dict[str, int], model: dict[str, int], current: dict[str, int],
               causes: dict[str, str], why: list[str], extra: int = 0,
               floor: dict[str, int] | None = None) -> None:  # fmt: skip
        """`extra`: devices held besides the targets' (mixed pools: other types that stay);
        `floor`: the least of each role (one instance, unless another type's serves it)."""
        s = self.settings
        floor = floor or dict.fromkeys(ROLES, 1)
        for role in ROLES:
            target[role] = max(floor[role], target[role])
        while self._devices(target) + extra > s.max_gpus:
            growing = [r for r in ROLES if target[r] > current[r]]
            role = max(growing or ROLES, key=lambda r: target[r] - current[r])
            other = _OTHER[role]
            if growing and target[other] > max(1, model[other]):  # take the other's slack
                target[other] -= 1
                causes[other] = "slack"
                continue
            if target[role] > floor[role]:
                target[role] -= 1
            elif target[other] > floor[other]:
                target[other] -= 1
            else:
                break  # one instance per role is the least there is
            why.append(f"capped at {s.max_gpus} devices")
        while self._devices(target) + extra < s.min_gpus:
            role = min(ROLES, key=lambda r: target[r] * self.gpus[r])
            target[role] += 1
            causes[role] = "bounds"

    def _actions(self, current: dict[str, int], target: dict[str, int],
                 causes: dict[str, str], chosen: dict[str, str] | None = None
                 ) -> tuple[Action, ...]:  # fmt: skip
        """`chosen`: mixed pools, each role's type (a flip keeps an instance's type: only
        when both roles chose the same)."""
        hw = chosen or dict.fromkeys(ROLES)
        delta = {r: target[r] - current[r] for r in ROLES}
        actions: list[Action] = []
        up = next((r for r in ROLES if delta[r] > 0), None)
        same = self.gpus["prefill"] == self.gpus["decode"] and hw["prefill"] == hw["decode"]
        if up is not None and self.can_flip and same:
            down = _OTHER[up]
            flips = min(delta[up], -delta[down]) if delta[down] < 0 else 0
            actions += [Action("flip", up, causes[up], hw[up])] * flips
            delta[up] -= flips
            delta[down] += flips
        for role in ROLES:  # capacity comes before capacity goes
            actions += [Action("add", role, causes[role], hw[role])] * max(0, delta[role])
        for role in ROLES:
            actions += [Action("remove", role, causes[role], hw[role])] * max(0, -delta[role])
        return tuple(actions)
