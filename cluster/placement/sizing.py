"""Online pool sizing: the smallest prefill and decode pools that meet the TTFT/TPOT SLOs for
the load forecast for the next window. The SLO autoscaler (docs/architecture.md, "Pools are
elastic") calls it every few seconds; `placement plan` answers the offline question (which
shapes, which placement) and this one only how many instances of fixed shapes.

    size_pools(window: LoadWindow, prefill: InstanceType, decode: InstanceType,
               ttft_s: float, tpot_s: float, attainment: float = 0.9,
               max_instances: int = 64, transfer_s_per_token: float = 0.0, seed: int = 0,
               num_requests: int = 2000) -> PoolSizes
    choose_types(window, prefill_types, decode_types, ttft_s, tpot_s, **same) -> PoolSizes
    instance_type(model: str, hardware: str, tp: int, pp: int, catalog=None) -> InstanceType
    profile_type(path: str, tp: int = 1, pp: int = 1, catalog=None) -> InstanceType

    window sample ──resample──▶ num_requests requests, Poisson arrivals at window.rate
          │
          ├─ prefill: run_prefill on n instances (FCFS batches up to max_batch_tokens,
          │           least-pending routing); TTFT >= queue + prefill + KV transfer
          ├─ decode:  Little's-law fixed point B = λ/n · E[out−1] · step(B) → a first n;
          │           then simulate_decode_only decides (TPOT, and the wait for KV room)
          └─ joint:   simulate_disaggregated at (n_p, n_d), raised until joint attainment passes

The phases are the planner's simulator (simulator.py), so a size agrees with `placement
simulate` and with the emulated cluster, which runs the same AnalyticLatency. A window is
simulated from an empty cluster: no carried-over queue, so a backlog left by the previous
window is not seen (the controller sees it as missed attainment and scales on that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cluster.placement.hardware import Hardware, get_hardware, load_catalog
from cluster.placement.instance import (
    LatencySource,
    ParallelConfig,
    kv_capacity_tokens,
    prefill_batch_tokens,
    why_invalid,
)
from cluster.placement.model_spec import ModelSpec, load_model_spec
from cluster.placement.simulator import (
    InstanceSpec,
    LatencyModel,
    Requests,
    SimResult,
    run_prefill,
    simulate_decode_only,
    simulate_disaggregated,
    simulate_prefill_only,
)
from cluster.placement.workload import unit_arrivals

UNBOUNDED_KV_TOKENS = 10**12  # an InstanceType without a KV capacity: memory never binds
MAX_JOINT_STEPS = 6  # joint check: at most this many one-instance raises after the phases


@dataclass(frozen=True, slots=True)
class LoadWindow:
    """What the router observed or forecasts for the next window: a rate and samples of the
    lengths (their distribution is used, not their mean: heavy tails set the P90)."""

    rate: float  # requests per second
    input_lens: Sequence[int]  # a sample of prompt lengths, tokens
    output_lens: Sequence[int]  # a sample of output lengths, tokens

    def __post_init__(self) -> None:
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ValueError(f"rate must be a finite number >= 0 requests/s, got {self.rate}")
        for name in ("input_lens", "output_lens"):
            lens = getattr(self, name)
            if len(lens) == 0:
                raise ValueError(f"{name} is empty: size_pools needs a sample of lengths")
            if min(lens) < 1:
                raise ValueError(f"{name} must all be >= 1 token, got {min(lens)}")


@dataclass(frozen=True, slots=True)
class InstanceType:
    """One kind of instance a pool grows by: its latency model (TP x PP on its hardware),
    devices and price. kv_capacity_tokens: KV tokens one instance holds (None: memory never
    binds). max_batch_tokens: the prefill batch limit (None: no batching, one prompt per
    step: conservative, the wait behind a long prompt is never shared)."""

    latency: LatencyModel
    num_gpus: int
    cost_per_gpu_hour: float = 1.0
    kv_capacity_tokens: int | None = None
    max_batch_tokens: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if self.cost_per_gpu_hour < 0:
            raise ValueError("cost_per_gpu_hour must be >= 0")
        for name in ("kv_capacity_tokens", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    @property
    def spec(self) -> InstanceSpec:
        """The instance as the simulator sees it."""
        return InstanceSpec(
            latency=self.latency,
            kv_capacity_tokens=self.kv_capacity_tokens or UNBOUNDED_KV_TOKENS,
            max_batch_tokens=self.max_batch_tokens or 1,
        )

    def cost_per_hour(self, num_instances: int) -> float:
        return num_instances * self.num_gpus * self.cost_per_gpu_hour


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """The answer. The attainments are predicted at these sizes (simulated, joint plan);
    `reason` says in one line what bound each pool."""

    num_prefill: int
    num_decode: int
    ttft_attainment: float
    tpot_attainment: float
    attainment: float  # joint: TTFT and TPOT both met
    reason: str
    prefill_type: InstanceType | None = field(default=None, repr=False)
    decode_type: InstanceType | None = field(default=None, repr=False)

    @property
    def meets_target(self) -> bool:
        """False when no size up to max_instances reaches the target (the sizes returned are
        then where attainment stops improving)."""
        return not self.reason.startswith("unreachable")

    def cost_per_hour(self) -> float:
        if self.prefill_type is None or self.decode_type is None:
            return math.nan
        return self.prefill_type.cost_per_hour(self.num_prefill) + self.decode_type.cost_per_hour(
            self.num_decode
        )


def instance_type(
    model: str, hardware: str, tp: int, pp: int, catalog: dict[str, Hardware] | None = None
) -> InstanceType:
    """An InstanceType from names: a model preset (or config path), a catalog device type, TP
    and PP; the same AnalyticLatency, KV capacity and prefill batch limit the planner and the
    emulated runner use."""
    spec = load_model_spec(model)
    config = ParallelConfig(get_hardware(hardware, catalog or load_catalog()), tp, pp)
    reason = why_invalid(spec, config)
    if reason is not None:
        raise ValueError(f"{spec.name} on {config.describe()}: {reason}")
    return InstanceType(
        latency=LatencySource().latency(spec, config),
        num_gpus=config.num_devices,
        cost_per_gpu_hour=config.hardware.price_per_hour,
        kv_capacity_tokens=kv_capacity_tokens(spec, config),
        max_batch_tokens=prefill_batch_tokens(spec, config),
        name=f"{spec.name} {config.describe()}",
    )


def profile_type(path: str, tp: int = 1, pp: int = 1,
                 catalog: dict[str, Hardware] | None = None) -> InstanceType:  # fmt: skip
    """An InstanceType of real engines from a `placement profile` file: its model and device
    type, at TP x PP (the fitted times, scaled to other shapes by the analytic ratio)."""
    catalog = catalog or load_catalog()
    source = LatencySource.from_profile_file(path, catalog)
    spec = ModelSpec.from_dict(source.profile_model)
    config = ParallelConfig(get_hardware(source.profile_hardware, catalog), tp, pp)
    return InstanceType(
        latency=source.latency(spec, config),
        num_gpus=config.num_devices,
        cost_per_gpu_hour=config.hardware.price_per_hour,
        kv_capacity_tokens=kv_capacity_tokens(spec, config),
        max_batch_tokens=prefill_batch_tokens(spec, config),
        name=f"{spec.name} {config.describe()} (profiled)",
    )


# --- the sizing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Slo:
    ttft_s: float
    tpot_s: float
    attainment: float

    def __post_init__(self) -> None:
        if not self.ttft_s > 0 or not self.tpot_s > 0:
            raise ValueError(f"ttft_s and tpot_s must be > 0 seconds, got {self.ttft_s}, "
                             f"{self.tpot_s}")  # fmt: skip
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")


def size_pools(
    window: LoadWindow,
    prefill: InstanceType,
    decode: InstanceType,
    ttft_s: float,
    tpot_s: float,
    attainment: float = 0.9,
    max_instances: int = 64,
    transfer_s_per_token: float = 0.0,
    seed: int = 0,
    num_requests: int = 2000,
) -> PoolSizes:
    """The smallest prefill and decode pools meeting TTFT <= ttft_s and TPOT <= tpot_s for
    `attainment` of the window's requests. Deterministic for a seed. When no size up to
    max_instances reaches the target, the sizes where attainment stops improving, and a
    reason starting "unreachable"."""
    slo = _Slo(ttft_s, tpot_s, attainment)
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    if transfer_s_per_token < 0:
        raise ValueError("transfer_s_per_token must be >= 0")
    if num_requests < 10:
        raise ValueError(f"num_requests must be >= 10, got {num_requests}")
    reqs = _requests(window, num_requests, seed)
    transfer = reqs.input_lens * transfer_s_per_token
    return _Sizer(reqs, window.rate, transfer, prefill, decode, slo, max_instances).size()


def choose_types(
    window: LoadWindow,
    prefill_types: Sequence[InstanceType],
    decode_types: Sequence[InstanceType],
    ttft_s: float,
    tpot_s: float,
    **kwargs,
) -> PoolSizes:
    """Mixed hardware: size every (prefill type, decode type) pair and keep the cheapest per
    GPU-hour among those meeting the target (the fewest GPUs on a tie); the best attainment
    when none does. kwargs: size_pools's."""
    if not prefill_types or not decode_types:
        raise ValueError("choose_types needs at least one prefill and one decode type")
    best, best_key = None, None
    for p_type in prefill_types:
        for d_type in decode_types:
            sizes = size_pools(window, p_type, d_type, ttft_s, tpot_s, **kwargs)
            gpus = sizes.num_prefill * p_type.num_gpus + sizes.num_decode * d_type.num_gpus
            key = (not sizes.meets_target, sizes.cost_per_hour(), gpus, -sizes.attainment)
            if best_key is None or key < best_key:
                best, best_key = sizes, key
    return best


def _requests(window: LoadWindow, n: int, seed: int) -> Requests:
    """n requests resampled from the window's samples, Poisson arrivals at its rate."""
    rng = np.random.default_rng(seed)
    inputs = np.asarray(window.input_lens, dtype=np.int64)
    outputs = np.asarray(window.output_lens, dtype=np.int64)
    inputs = inputs[rng.integers(0, len(inputs), n)]
    outputs = outputs[rng.integers(0, len(outputs), n)]
    reqs = Requests(unit_arrivals(n, "poisson", 1.0, seed), inputs, outputs)
    return reqs.at_rate(max(window.rate, 1e-9))


def _smallest(attain: Callable[[int], float], goal: float, hint: int, limit: int) -> int | None:
    """Smallest n in [1, limit] with attain(n) >= goal (more instances never hurt), galloping
    from the hint, then bisecting; None if even `limit` misses."""
    lo, hi = 0, max(1, min(hint, limit))
    while attain(hi) < goal:
        if hi >= limit:
            return None
        lo, hi = hi, min(limit, hi * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if attain(mid) >= goal else (mid, hi)
    return hi


class _Sizer:
    """One size_pools call: the resampled requests, and each simulation run at most once."""

    def __init__(self, reqs, rate, transfer, prefill, decode, slo: _Slo, max_instances: int):
        self.reqs, self.rate, self.transfer = reqs, rate, transfer
        self.slo, self.limit = slo, max_instances
        self.prefill, self.decode = prefill, decode
        self.p_spec, self.d_spec = prefill.spec, decode.spec
        self._prefill_runs: dict[int, tuple[list, list]] = {}
        self._phase: dict[tuple[str, int], SimResult] = {}
        self._joint: dict[tuple[int, int], SimResult] = {}

    # --- per phase ---------------------------------------------------------------------------

    def prefill_result(self, n: int) -> SimResult:
        """TTFT as if decode always had room: prefill queue + batch + KV transfer."""
        if ("prefill", n) not in self._phase:
            times = self._prefill_times(n)
            self._phase["prefill", n] = simulate_prefill_only(
                self.reqs, [self.p_spec] * n, self.transfer, times
            )
        return self._phase["prefill", n]

    def _prefill_times(self, n: int) -> tuple[list, list]:
        if n not in self._prefill_runs:
            self._prefill_runs[n] = run_prefill(self.reqs, [self.p_spec] * n)
        return self._prefill_runs[n]

    def decode_result(self, n: int) -> SimResult:
        """TPOT, and the wait for KV room (part of TTFT), requests arriving with their KV."""
        if ("decode", n) not in self._phase:
            self._phase["decode", n] = simulate_decode_only(self.reqs, [self.d_spec] * n)
        return self._phase["decode", n]

    def joint_result(self, n_p: int, n_d: int) -> SimResult:
        if (n_p, n_d) not in self._joint:
            times = self._prefill_times(n_p)
            self._joint[n_p, n_d] = simulate_disaggregated(
                self.reqs, [self.p_spec] * n_p, [self.d_spec] * n_d, self.transfer, times
            )
        return self._joint[n_p, n_d]

    def prefill_attainment(self, n: int) -> float:
        return self.prefill_result(n).attainment(self.slo.ttft_s, None)

    def decode_attainment(self, n: int) -> float:
        return self.decode_result(n).attainment(self.slo.ttft_s, self.slo.tpot_s)

    def joint_attainment(self, n_p: int, n_d: int) -> float:
        return self.joint_result(n_p, n_d).attainment(self.slo.ttft_s, self.slo.tpot_s)

    # --- the search --------------------------------------------------------------------------

    def size(self) -> PoolSizes:
        n_p, p_ok = self._count(self.prefill_attainment, self._prefill_hint())
        n_d, d_ok = self._count(self.decode_attainment, self._decode_hint())
        joint_ok = p_ok and d_ok
        if joint_ok:
            n_p, n_d, joint_ok = self._raise_jointly(n_p, n_d)
        return self._answer(n_p, n_d, p_ok, d_ok, joint_ok)

    def _count(self, attain: Callable[[int], float], hint: int) -> tuple[int, bool]:
        """The phase's smallest count meeting the target; when none up to the limit does, the
        smallest reaching (within half a point) the attainment of the limit."""
        n = _smallest(attain, self.slo.attainment, hint, self.limit)
        if n is not None:
            return n, True
        best = attain(self.limit)
        return _smallest(attain, best - 0.005, hint, self.limit) or self.limit, False

    def _raise_jointly(self, n_p: int, n_d: int) -> tuple[int, int, bool]:
        """From the per-phase minimums (lower bounds: the joint TTFT adds the transfer and the
        decode side's waits to the prefill's), one instance at a time on the side whose raise
        helps most (the cheaper on a tie), until the joint plan passes."""
        target = self.slo.attainment
        for _ in range(MAX_JOINT_STEPS + 1):
            if self.joint_attainment(n_p, n_d) >= target:
                return n_p, n_d, True
            options = []
            if n_p < self.limit:
                cost = self.prefill.cost_per_hour(1)
                options.append((-self.joint_attainment(n_p + 1, n_d), cost, n_p + 1, n_d))
            if n_d < self.limit:
                cost = self.decode.cost_per_hour(1)
                options.append((-self.joint_attainment(n_p, n_d + 1), cost, n_p, n_d + 1))
            if not options:
                break
            passing = [o for o in options if -o[0] >= target]
            _, _, n_p, n_d = min(passing, key=lambda o: o[1]) if passing else min(options)
        return n_p, n_d, self.joint_attainment(n_p, n_d) >= target

    # --- first guesses -----------------------------------------------------------------------

    def _prefill_hint(self) -> int:
        """Utilisation below one on single-prompt service: rate x mean prefill time."""
        lens = self.reqs.input_lens
        sample = lens[: min(len(lens), 200)].tolist()
        mean_s = sum(self.p_spec.latency.prefill_time(n, n * n, 1) for n in sample) / len(sample)
        return max(1, math.ceil(self.rate * mean_s))

    def _decode_hint(self) -> int:
        """The fewest instances whose Little's-law batch meets TPOT and fits KV and 256 seqs."""
        for n in range(1, self.limit + 1):
            batch, step_s = self.decode_batch(n)
            if batch is not None and step_s <= self.slo.tpot_s:
                return n
        return self.limit

    def decode_batch(self, n: int) -> tuple[float | None, float]:
        """Little's law per decode instance: B = λ/n · E[out − 1] · step(B), with the batch's
        context the residence-weighted mean E[(out−1)(in + out/2)] / E[out−1]. (None, step at
        the limit) when no batch under the KV and sequence limits solves it (overload)."""
        lens, outs = self.reqs.input_lens, self.reqs.output_lens
        steps = np.maximum(outs - 1, 0).astype(float)
        per_request = max(float(steps.mean()), 1e-12)
        context = float((steps * (lens + outs / 2)).mean()) / per_request
        reserved = float((lens + outs).mean())  # KV reserved per request: prompt + output
        limit = min(self.d_spec.max_num_seqs, self.d_spec.kv_capacity_tokens / reserved)
        load = self.rate / n * per_request  # iterations demanded per second
        decode_time = self.d_spec.latency.decode_time
        batch = 1.0
        for _ in range(50):
            new = max(1.0, load * decode_time(batch, batch * context))
            if new > limit:
                return None, decode_time(limit, limit * context)
            if abs(new - batch) < 1e-3:
                break
            batch = new
        return batch, decode_time(batch, batch * context)

    # --- the answer --------------------------------------------------------------------------

    def _answer(self, n_p: int, n_d: int, p_ok: bool, d_ok: bool, joint_ok: bool) -> PoolSizes:
        slo, res = self.slo, self.joint_result(n_p, n_d)
        q = slo.attainment
        ttft_q = float(np.quantile(self.prefill_result(n_p).ttft_s, q))
        tpot_q = float(np.quantile(self.decode_result(n_d).tpot_s, q))
        batch, step_s = self.decode_batch(n_d)
        pct = f"P{q * 100:g}"
        reason = (
            f"prefill: {pct} TTFT {ttft_q:.3g} s vs {slo.ttft_s:g} s at {n_p}; "
            f"decode: {pct} TPOT {tpot_q * 1e3:.3g} ms vs {slo.tpot_s * 1e3:g} ms at {n_d}"
            + (
                f", batch ~{batch:.0f}/instance (step {step_s * 1e3:.3g} ms)"
                if batch
                else ", overloaded by Little's law"
            )  # fmt: skip
            + f"; joint {res.attainment(slo.ttft_s, slo.tpot_s):.1%} vs {q:.0%}"
        )
        if not (p_ok and d_ok and joint_ok):
            which = [name for name, ok in (("prefill", p_ok), ("decode", d_ok)) if not ok]
            reason = f"unreachable ({', '.join(which) or 'joint'}) within {self.limit}: {reason}"
        return PoolSizes(
            num_prefill=n_p,
            num_decode=n_d,
            ttft_attainment=res.attainment(slo.ttft_s, None),
            tpot_attainment=res.attainment(None, slo.tpot_s),
            attainment=res.attainment(slo.ttft_s, slo.tpot_s),
            reason=reason,
            prefill_type=self.prefill,
            decode_type=self.decode,
        )
