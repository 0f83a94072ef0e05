"""The placement search (DistServe §4, done to the letter, plus Splitwise's cost sweep).

    per-phase search          for every device type and TP × PP that fits: the goodput of one
                              prefill instance on TTFT alone, one decode instance on TPOT alone
          │                   (simulated), ranked per GPU / per dollar / per watt
          ▼
    instance counts           maximise: the smallest prefill:decode units near the goodput
                              ratio; a target rate: the fewest instances per phase that meet it
          │
          ▼
    end-to-end check          the combined plan in the simulator, joint TTFT-and-TPOT
                              attainment, KV transfer over the link between the placements,
                              counts raised until it passes (DistServe's code checks neither)

High affinity places the pools anywhere (KV crosses the network); low affinity builds units of
PP nodes whose every node holds one pipeline stage of each prefill and decode instance in the
unit, so the KV of a stage moves over NVLink. `exhaustive()` is the brute force over every
plan that fits, used by the tests and `--exhaustive`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from cluster.placement.hardware import Hardware
from cluster.placement.instance import LatencySource, ParallelConfig, instance_spec, why_invalid
from cluster.placement.model_spec import ModelSpec
from cluster.placement.packing import pack
from cluster.placement.simulator import (
    InstanceSpec,
    Requests,
    SimResult,
    run_prefill,
    simulate_colocated,
    simulate_decode_only,
    simulate_disaggregated,
    simulate_prefill_only,
)
from cluster.placement.types import Candidate, ClusterSpec
from cluster.placement.workload import Trace, Workload, unit_arrivals

TRANSFER_FIXED_S = 200e-6  # per request: NIXL handshake-free READ set-up + notification


class PlanningError(ValueError):
    """The inputs admit no plan; the message says why and what to change."""


def kv_bandwidth(prefill: ParallelConfig, decode: ParallelConfig, affinity: str) -> float:
    """Bytes/s of one request's KV transfer: every rank pulls its own shard, so the bandwidth
    adds up over the ranks of the smaller side; NVLink when the stages share nodes (low
    affinity), the network otherwise."""
    if affinity == "low":
        per_rank = prefill.hardware.intra_node_bandwidth
    else:
        per_rank = min(prefill.hardware.inter_node_bandwidth,
                       decode.hardware.inter_node_bandwidth)  # fmt: skip
    return per_rank * min(prefill.num_devices, decode.num_devices)


@dataclass(slots=True, frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise PlanningError("TTFT and TPOT targets must be > 0 seconds")
        if not 0 < self.attainment <= 1:
            raise PlanningError("attainment must be in (0, 1]")


@dataclass(slots=True)
class Settings:
    num_requests: int = 1500  # the end-to-end check's sample
    search_requests: int = 500  # the per-phase search's sample
    seed: int = 0
    top_k: int = 3  # configurations per phase carried into the end-to-end stage
    affinity: str = "auto"  # high | low | auto (both, keep the better)
    objective: str = "gpus"  # gpus | cost | power
    arrival: str = "poisson"
    arrival_cv: float = 1.0
    tolerance: float = 0.02  # relative width at which a goodput bisection stops
    chunk_tokens: int = 2048  # colocated step budget (vLLM's max_num_batched_tokens)
    # Colocated scheduling: chunked prefill (vLLM today), or prefill-first without chunking
    # (vLLM v0, DistServe's baseline).
    chunked_prefill: bool = True
    prefill_max_tokens: int | None = None  # None: per shape, see prefill_batch_tokens
    tp: tuple[int, ...] | None = None  # restrict TP (both phases) to these
    pp: tuple[int, ...] | None = None
    max_units: int = 3  # maximise: largest prefill (and decode) count in one unit


def max_rate(attain: Callable[[float], float], target: float, hint: float, tol: float) -> float:
    """The highest rate with attain(rate) >= target, by bracketing then geometric bisection
    (attainment falls as the rate rises). 0 if even an idle system misses the target."""
    if attain(1e-6) < target:
        return 0.0
    lo, hi = 0.0, max(hint, 1e-3)
    for _ in range(40):
        if attain(hi) < target:
            break
        lo, hi = hi, hi * 2
    else:
        return hi
    if lo == 0.0:
        lo = hi / 2
        for _ in range(40):
            if attain(lo) >= target:
                break
            hi, lo = lo, lo / 2
        else:
            return 0.0
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if attain(mid) >= target else (lo, mid)
    return lo


class Planner:
    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        slo: SLO,
        workload: Workload | Trace,
        settings: Settings | None = None,
        source: LatencySource | None = None,
    ):
        self.model, self.cluster, self.slo, self.workload = model, cluster, slo, workload
        self.settings = settings or Settings()
        self.source = source or LatencySource()
        if self.settings.objective not in ("gpus", "cost", "power"):
            raise PlanningError("objective must be gpus, cost or power")
        if self.settings.affinity not in ("high", "low", "auto"):
            raise PlanningError("affinity must be high, low or auto")
        self.requests = self._sample(self.settings.num_requests)
        self.search_requests = self._sample(self.settings.search_requests)
        self._phase: dict = {}
        self._prefill_memo: dict = {}
        self.num_simulations = 0

    def _sample(self, n: int) -> Requests:
        s = self.settings
        if isinstance(self.workload, Trace):
            t = self.workload
            # A trace keeps its own arrival pattern, scaled to rate 1 (then to any rate).
            return Requests(t.arrival_s * t.rate, t.input_lens, t.output_lens)
        inputs, outputs = self.workload.sample(n, seed=s.seed)
        # Requests must fit the model's context, as the load generator clips them.
        context = self.model.max_position_embeddings
        outputs = np.minimum(outputs, context - 1)
        inputs = np.minimum(inputs, context - outputs)
        return Requests(unit_arrivals(n, s.arrival, s.arrival_cv, s.seed), inputs, outputs)

    # --- shapes ------------------------------------------------------------------------------

    def configs(self, hw: Hardware) -> list[ParallelConfig]:
        """Every valid TP × PP of this device type that fits the cluster."""
        s, gpus = self.settings, self.cluster.num_gpus(hw)
        tps = s.tp or [t for t in (1, 2, 4, 8, 16) if t <= hw.gpus_per_node]
        pps = s.pp or [p for p in range(1, self.model.num_layers + 1) if p <= gpus]
        out = []
        for tp, pp in itertools.product(tps, pps):
            config = ParallelConfig(hw, tp, pp)
            if tp * pp <= gpus and why_invalid(self.model, config) is None:
                out.append(config)
        return out

    def all_configs(self) -> list[ParallelConfig]:
        configs = [c for hw in self.cluster.hardware for c in self.configs(hw)]
        if not configs:
            raise PlanningError(self._why_no_config())
        return configs

    def _why_no_config(self) -> str:
        s, reasons = self.settings, []
        for hw in self.cluster.hardware:
            gpus = self.cluster.num_gpus(hw)
            for tp in s.tp or [t for t in (1, 2, 4, 8) if t <= hw.gpus_per_node] or [1]:
                pp = (s.pp or [max(1, gpus // tp)])[0]
                reason = why_invalid(self.model, ParallelConfig(hw, tp, pp))
                if reason is None and tp * pp > gpus:
                    reason = f"TP{tp}xPP{pp} needs {tp * pp} devices, the cluster has {gpus}"
                reasons.append(reason or f"{hw.name} TP{tp}xPP{pp}: no valid pipeline split")
        return f"no instance shape can run {self.model.name}: " + "; ".join(dict.fromkeys(reasons))

    def spec(self, role: str, config: ParallelConfig, batch: dict | None = None):
        """`batch`: per-role batch token limits that override the settings (a plan file's)."""
        tokens = self.settings.chunk_tokens if role == "colocated" else None
        tokens = self.settings.prefill_max_tokens if role == "prefill" else tokens
        tokens = (batch or {}).get(role, tokens)
        spec = instance_spec(self.model, config, self.source, role, tokens)
        if role == "colocated" and not self.settings.chunked_prefill:
            spec = replace(spec, chunked_prefill=False)
        return spec

    def transfer_s(self, prefill: ParallelConfig, decode: ParallelConfig, affinity: str):
        bandwidth = kv_bandwidth(prefill, decode, affinity)
        kv = self.model.kv_bytes_per_token
        return lambda reqs: TRANSFER_FIXED_S + reqs.input_lens * (kv / bandwidth)

    # --- per-phase search --------------------------------------------------------------------

    def phase_goodput(self, role: str, config: ParallelConfig, affinity: str = "high") -> float:
        """Goodput of one instance of one phase on its own SLO (DistServe's Algorithm 1)."""
        key = (role, config, affinity)
        if key not in self._phase:
            spec, slo, reqs = self.spec(role, config), self.slo, self.search_requests
            if role == "prefill":
                transfer = self.transfer_s(config, config, affinity)(reqs)

                def attain(rate: float) -> float:
                    times = self._prefill_times(reqs, rate, [spec])
                    res = simulate_prefill_only(reqs.at_rate(rate), [spec], transfer, times)
                    return res.attainment(slo.ttft_s, None)
            else:

                def attain(rate: float) -> float:
                    # The wait for a decode slot is part of TTFT: past the whole TTFT budget
                    # the request has failed whatever its TPOT.
                    res = simulate_decode_only(reqs.at_rate(rate), [spec])
                    return res.attainment(slo.ttft_s, slo.tpot_s)

            self._phase[key] = max_rate(self._counted(attain), slo.attainment, 1.0,
                                        self.settings.tolerance)  # fmt: skip
        return self._phase[key]

    def _prefill_times(self, base: Requests, rate: float, specs: list[InstanceSpec]):
        """run_prefill of one of the planner's own samples at `rate`, memoised: plans sharing
        a prefill pool (shape and count), whatever their decode side or affinity, see the
        same batches; the search asks for the same ones again and again."""
        reqs = base.at_rate(rate)
        if base is not self.requests and base is not self.search_requests:
            return run_prefill(reqs, specs)
        key = (id(base), rate, tuple(specs))
        if key not in self._prefill_memo:
            start, done = run_prefill(reqs, specs)
            self._prefill_memo[key] = (np.array(start), np.array(done))
        start, done = self._prefill_memo[key]
        return start.tolist(), done.tolist()

    def _counted(self, attain: Callable[[float], float]) -> Callable[[float], float]:
        def wrapped(rate: float) -> float:
            self.num_simulations += 1
            return attain(rate)

        return wrapped

    def ranked(self, role: str, affinity: str = "high") -> list[tuple[ParallelConfig, float]]:
        """Shapes of one phase by goodput per objective unit, best first, zero-goodput ones
        dropped."""
        objective = self.settings.objective
        scored = []
        for config in self.all_configs():
            rate = self.phase_goodput(role, config, affinity)
            if rate > 0:
                one = Candidate("disaggregated", ((role, config, 1),), goodput_rps=rate)
                scored.append((one.per_unit(objective), config, rate))
        scored.sort(key=lambda x: -x[0])
        if not scored:
            raise PlanningError(self._why_slo_unreachable(role))
        return [(config, rate) for _, config, rate in scored]

    def _why_slo_unreachable(self, role: str) -> str:
        """Explain a phase no shape can serve even at zero load."""
        reqs, q = self.search_requests.at_rate(1e-6), self.slo.attainment
        best = math.inf
        for config in self.all_configs():
            if role == "prefill":
                res = simulate_prefill_only(reqs, [self.spec(role, config)])
                best = min(best, float(np.quantile(res.ttft_s, q)))
            else:
                res = simulate_decode_only(reqs, [self.spec(role, config)])
                best = min(best, float(np.quantile(res.tpot_s, q)))
        name, target = ("TTFT", self.slo.ttft_s) if role == "prefill" else ("TPOT", self.slo.tpot_s)
        return (
            f"the {name} target of {target * 1e3:.0f} ms cannot be met even at zero load: the "
            f"fastest {role} shape for {self.model.name} gives a P{q * 100:.0f} {name} of "
            f"{best * 1e3:.0f} ms on this workload; relax --{name.lower()} or add faster hardware"
        )

    # --- end-to-end ----------------------------------------------------------------------------

    def simulate(self, cand: Candidate, reqs: Requests, batch: dict | None = None) -> SimResult:
        if cand.mode == "colocated":
            (_, config, n), = cand.pools  # fmt: skip
            return simulate_colocated(reqs, [self.spec("colocated", config, batch)] * n)
        (_, pc, n_p), (_, dc, n_d) = cand.pools
        transfer = self.transfer_s(pc, dc, cand.affinity)(reqs)
        prefill, decode = self.spec("prefill", pc, batch), self.spec("decode", dc, batch)
        return simulate_disaggregated(reqs, [prefill] * n_p, [decode] * n_d, transfer)

    def attainment(
        self,
        cand: Candidate,
        rate: float,
        reqs: Requests | None = None,
        floor: float | None = None,
    ) -> float:
        """Joint attainment of a plan at `rate`. With `floor`, a plan whose prefill pool alone
        already makes it miss `floor` skips its decode pool: the value returned is then an
        upper bound below `floor` (enough for the searches, which only ask pass or fail)."""
        self.num_simulations += 1
        slo, base = self.slo, reqs or self.requests
        if cand.mode == "colocated":
            return self.simulate(cand, base.at_rate(rate)).attainment(slo.ttft_s, slo.tpot_s)
        reqs = base.at_rate(rate)
        (_, pc, n_p), (_, dc, n_d) = cand.pools
        transfer = self.transfer_s(pc, dc, cand.affinity)(reqs)
        prefill = [self.spec("prefill", pc)] * n_p
        times = self._prefill_times(base, rate, prefill)
        if floor is not None:
            # A request's TTFT is at least its prefill's end plus its transfer, less arrival.
            bound = simulate_prefill_only(reqs, prefill, transfer, times).attainment(
                slo.ttft_s, None
            )
            if bound < floor:
                return bound
        decode = [self.spec("decode", dc)] * n_d
        res = simulate_disaggregated(reqs, prefill, decode, transfer, times)
        return res.attainment(slo.ttft_s, slo.tpot_s)

    def goodput(self, cand: Candidate, hint: float = 1.0) -> Candidate:
        target = self.slo.attainment
        rate = max_rate(lambda r: self.attainment(cand, r, floor=target), target, hint,
                        self.settings.tolerance)  # fmt: skip
        return replace(cand, goodput_rps=rate, attainment=self.slo.attainment)

    def fits(self, cand: Candidate) -> bool:
        return pack(cand, self.cluster) is not None

    # --- strategies ----------------------------------------------------------------------------

    def _better(self, a: Candidate, b: Candidate | None, rate: float | None) -> bool:
        if b is None:
            return True
        objective = self.settings.objective
        if rate is None:
            return a.per_unit(objective) > b.per_unit(objective) * (1 + 1e-9)
        if a.amount(objective) != b.amount(objective):
            return a.amount(objective) < b.amount(objective)
        return a.attainment > b.attainment

    def _sorted(self, cands: list[Candidate], rate: float | None) -> list[Candidate]:
        """Best first, each plan once."""
        objective = self.settings.objective
        cands = list({(c.describe(), c.affinity): c for c in cands}.values())
        if rate is None:
            return sorted(cands, key=lambda c: -c.per_unit(objective))
        return sorted(cands, key=lambda c: (c.amount(objective), -c.attainment))

    def _pair(self, pc, n_p, dc, n_d, affinity="high", units=0) -> Candidate:
        pools = (("prefill", pc, n_p), ("decode", dc, n_d))
        return Candidate("disaggregated", pools, affinity, units=units)

    def _min_count(self, passes: Callable[[int], bool], hint: int, limit: int) -> int | None:
        """Smallest n in [1, limit] with passes(n), assuming more instances never hurt."""
        hi = max(1, min(hint, limit))
        while not passes(hi):
            if hi >= limit:
                return None
            hi = min(limit, hi * 2)
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if passes(mid) else (mid + 1, hi)
        return lo

    def _phase_count(self, role: str, config: ParallelConfig, rate: float, one: float):
        """Fewest instances of one phase meeting its own SLO at `rate`: a lower bound for the
        combined plan (its TTFT adds transfer and decode waits to the prefill's)."""
        spec, reqs, slo = self.spec(role, config), self.requests.at_rate(rate), self.slo
        transfer = self.transfer_s(config, config, "high")(reqs)

        def passes(n: int) -> bool:
            self.num_simulations += 1
            if role == "prefill":
                times = self._prefill_times(self.requests, rate, [spec] * n)
                res = simulate_prefill_only(reqs, [spec] * n, transfer, times)
                return res.attainment(slo.ttft_s, None) >= slo.attainment
            res = simulate_decode_only(reqs, [spec] * n)
            return res.attainment(slo.ttft_s, slo.tpot_s) >= slo.attainment

        limit = self.cluster.num_gpus(config.hardware) // config.num_devices
        return self._min_count(passes, math.ceil(rate / one), limit)

    def pairs(self, affinity: str = "high") -> list[tuple]:
        """(prefill shape, its goodput, decode shape, its goodput) for the top_k² pairs that
        fit the cluster together, by the goodput per objective unit of an ideally balanced
        unit: 1 / (amount_p / R_p + amount_d / R_d)."""
        objective = self.settings.objective
        scored = []
        for (pc, rp), (dc, rd) in itertools.product(self.ranked("prefill", affinity),
                                                    self.ranked("decode", affinity)):  # fmt: skip
            unit = self._pair(pc, 1, dc, 1, affinity)
            if not self.fits(unit):
                continue
            a_p = Candidate("disaggregated", (("prefill", pc, 1),)).amount(objective)
            a_d = Candidate("disaggregated", (("decode", dc, 1),)).amount(objective)
            scored.append((1 / (a_p / rp + a_d / rd), pc, rp, dc, rd))
        scored.sort(key=lambda x: -x[0])
        return [x[1:] for x in scored[: self.settings.top_k**2]]

    def high_affinity(self, rate: float | None) -> list[Candidate]:
        out = []
        for pc, rp, dc, rd in self.pairs():
            if rate is None:
                out += self._units(pc, rp, dc, rd)
            else:
                best = self._counts(pc, rp, dc, rd, rate)
                out += [best] if best else []
        return out

    def _units(self, pc, rp, dc, rd) -> list[Candidate]:
        """Maximise: units of n_p prefill and n_d decode instances near the goodput ratio."""
        out = []
        for n_p in range(1, self.settings.max_units + 1):
            ideal = n_p * rp / rd
            for n_d in sorted({max(1, math.floor(ideal)), max(1, math.ceil(ideal))}):
                while n_d > 0 and not self.fits(self._pair(pc, n_p, dc, n_d)):
                    n_d -= 1  # the cluster is smaller than the ideal ratio: the most that fit
                if n_d and all(c.pools[1][2] != n_d or c.pools[0][2] != n_p for c in out):
                    cand = self._pair(pc, n_p, dc, n_d)
                    out.append(self.goodput(cand, hint=min(n_p * rp, n_d * rd)))
        return out

    def _counts(self, pc, rp, dc, rd, rate: float) -> Candidate | None:
        """A target rate: from each phase's own minimum count upwards until the combined plan
        passes; the cheapest passing plan of this pair of shapes."""
        n_p_min = self._phase_count("prefill", pc, rate, rp)
        n_d_min = self._phase_count("decode", dc, rate, rd)
        if n_p_min is None or n_d_min is None:
            return None
        best = None
        objective = self.settings.objective
        for n_p in range(n_p_min, n_p_min + 3):
            for n_d in range(n_d_min, n_d_min + 4):
                cand = self._pair(pc, n_p, dc, n_d)
                if best and cand.amount(objective) > best.amount(objective):
                    break
                if not self.fits(cand):
                    break
                cand.attainment = self.attainment(cand, rate, floor=self.slo.attainment)
                if cand.attainment >= self.slo.attainment:
                    cand.goodput_rps = rate
                    best = cand if self._better(cand, best, rate) else best
                    break
        return best

    def low_affinity(self, rate: float | None) -> list[Candidate]:
        """Units of PP nodes; each node holds one stage of k_p prefill and k_d decode
        instances (TP devices each), so KV moves over NVLink."""
        estimates = []
        for hw in self.cluster.hardware:
            for pc, dc, k_p, k_d in self._low_units(hw):
                rp = self.phase_goodput("prefill", pc, "low")
                rd = self.phase_goodput("decode", dc, "low")
                if rp > 0 and rd > 0:
                    cand = self._pair(pc, k_p, dc, k_d, "low", units=1)
                    cand.goodput_rps = min(k_p * rp, k_d * rd)
                    estimates.append(cand)
        estimates = self._sorted(estimates, None)[: self.settings.top_k**2]
        out = []
        for est in estimates:
            unit = self.goodput(est, hint=est.goodput_rps)
            if unit.goodput_rps <= 0:
                continue
            if rate is None:
                out.append(unit)
            else:
                scaled = self._scale_to_rate(unit, rate)
                out += [scaled] if scaled else []
        return out

    def _low_units(self, hw: Hardware):
        nodes, m = self.cluster.num_nodes(hw), hw.gpus_per_node
        configs = [c for c in self.configs(hw) if c.pp <= nodes]
        for pc, dc in itertools.product(configs, configs):
            if pc.pp != dc.pp:
                continue
            for k_p in range(1, m // pc.tp + 1):
                for k_d in range(1, (m - k_p * pc.tp) // dc.tp + 1):
                    yield pc, dc, k_p, k_d

    def _scale_to_rate(self, unit: Candidate, rate: float) -> Candidate | None:
        (_, pc, k_p), (_, dc, k_d) = unit.pools
        for units in range(max(1, math.ceil(rate / unit.goodput_rps)), 10**6):
            cand = self._pair(pc, k_p * units, dc, k_d * units, "low", units=units)
            if not self.fits(cand):
                return None
            cand.attainment = self.attainment(cand, rate, floor=self.slo.attainment)
            if cand.attainment >= self.slo.attainment:
                cand.goodput_rps = rate
                return cand
        return None

    def replicate(self, unit: Candidate) -> Candidate:
        """Maximise: as many copies of a unit as the cluster holds, one pool per role."""
        copies = 1
        while self.fits(self._copies(unit, copies + 1)):
            copies += 1
        if copies == 1:
            return unit
        whole = self._copies(unit, copies)
        return self.goodput(whole, hint=unit.goodput_rps * copies)

    def _copies(self, unit: Candidate, copies: int) -> Candidate:
        pools = tuple((role, c, n * copies) for role, c, n in unit.pools)
        units = unit.units * copies if unit.units else 0
        return Candidate(unit.mode, pools, unit.affinity, units=units)

    def disaggregated(self, rate: float | None) -> list[Candidate]:
        """Every plan the search examined end to end, best first."""
        affinity = self.settings.affinity
        cands = []
        if affinity in ("high", "auto"):
            cands += self.high_affinity(rate)
        if affinity in ("low", "auto"):
            cands += self.low_affinity(rate)
        cands = self._sorted(cands, rate)
        if rate is None and cands:  # the best few units, scaled to the whole cluster
            cands = self._sorted([self.replicate(c) for c in cands[:3]] + cands, None)
        return cands

    def colocated(self, rate: float | None) -> list[Candidate]:
        """The baseline: colocated instances with chunked prefill, same search."""
        scored = []
        for config in self.all_configs():
            one = Candidate("colocated", (("colocated", config, 1),))
            one = self.goodput(one, hint=1.0) if rate is None else self._coloc_count(one, rate)
            if one and one.goodput_rps > 0:
                scored.append(one)
        scored = self._sorted(scored, rate)
        if rate is None and scored:
            scored = self._sorted([self.replicate(c) for c in scored[:2]] + scored, None)
        return scored

    def _coloc_count(self, one: Candidate, rate: float) -> Candidate | None:
        (_, config, _), = one.pools  # fmt: skip

        def make(n: int) -> Candidate:
            return Candidate("colocated", (("colocated", config, n),))

        def passes(n: int) -> bool:
            return self.attainment(make(n), rate) >= self.slo.attainment

        limit = self.cluster.num_gpus(config.hardware) // config.num_devices
        n = self._min_count(passes, 1, limit)
        if n is None or not self.fits(make(n)):
            return None
        cand = make(n)
        cand.goodput_rps, cand.attainment = rate, self.attainment(cand, rate)
        return cand

    def exhaustive(self, rate: float | None) -> Candidate | None:
        """Brute force over every high-affinity plan that fits (tests, `--exhaustive`)."""
        configs, best = self.all_configs(), None
        for pc, dc in itertools.product(configs, configs):
            for n_p in itertools.count(1):
                if not self.fits(self._pair(pc, n_p, dc, 1)):
                    break
                for n_d in itertools.count(1):
                    cand = self._pair(pc, n_p, dc, n_d)
                    if not self.fits(cand):
                        break
                    if rate is None:
                        cand = self.goodput(cand)
                    else:
                        cand.attainment = self.attainment(cand, rate, floor=self.slo.attainment)
                        if cand.attainment < self.slo.attainment:
                            continue
                        cand.goodput_rps = rate
                    best = cand if self._better(cand, best, rate) else best
        return best
