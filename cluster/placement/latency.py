"""Latency models: how long one instance takes for a prefill batch, a decode iteration, or a
colocated (chunked-prefill) iteration. The simulator calls them with plain sums so that it
stays fast:

    prefill_time(num_tokens=Σl, sum_sq=Σl², num_seqs)       a whole batch, first stage to last
    decode_time(batch_size=B, context_sum=Σctx)             one token for each running request
    mixed_time(chunk_tokens, chunk_pairs, B, Σctx)          decodes + prefill chunks in one step

AnalyticLatency predicts any (TP, PP) on any catalog hardware from FLOPs and bytes (per
pipeline stage a roofline for the GEMMs and one for attention, ring all-reduce for TP, one
activation hop per stage boundary).
FittedLatency uses DistServe's forms fitted to a measured profile (`placement profile`):
prefill a + b·Σl + c·Σl² (+ d·n: our engine pays a per-prompt cost, attention runs once per
prompt and layer, that DistServe's form misses), decode a + b·Σctx + c·B; other (TP, PP)
scale it by the analytic model's ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.placement.hardware import Hardware
from cluster.placement.model_spec import ModelSpec


class AnalyticLatency:
    """Roofline latency of one instance of `model` on `hardware` with TP × PP devices. Every
    term is linear in its inputs, so the coefficients are worked out once here: the simulator
    calls these methods millions of times."""

    __slots__ = ("model", "hardware", "tp", "pp", "_c")

    def __init__(self, model: ModelSpec, hardware: Hardware, tp: int = 1, pp: int = 1):
        self.model, self.hardware, self.tp, self.pp = model, hardware, tp, pp
        devices, hw = tp * pp, hardware
        compute = hw.peak_flops * hw.compute_efficiency
        memory = hw.mem_bandwidth * hw.memory_efficiency
        kv_shards = pp * min(tp, model.num_kv_heads)  # kv heads replicate past TP = kv heads
        activation = model.hidden_size * model.dtype_bytes  # bytes per token
        steps = 2 * (tp - 1)  # ring all-reduce: reduce-scatter + all-gather
        layers = model.num_layers / pp
        # Stages talk over NVLink while the instance fits one node, else over the network.
        link = hw.intra_node_bandwidth if devices <= hw.gpus_per_node else hw.inter_node_bandwidth
        self._c = (
            model.flops_per_token / devices / compute,  # s per token of matmuls
            model.attention_flops_per_pair / devices / compute,  # s per attention pair
            model.weight_bytes / devices / memory,  # s to stream a stage's weights
            model.kv_bytes_per_token / kv_shards / memory,  # s per KV token read or written
            2 * layers * (steps / tp * activation / hw.intra_node_bandwidth) if tp > 1 else 0.0,
            2 * layers * steps * hw.link_latency_s,
            (pp - 1) * activation / link,  # s per token over the stage boundaries
            # Scheduling and launches per stage pass: each stage is its own process.
            (pp - 1) * hw.link_latency_s + pp * hw.step_overhead_s,
        )

    def __repr__(self) -> str:
        return (
            f"AnalyticLatency({self.model.name}, {self.hardware.name}, tp={self.tp}, pp={self.pp})"
        )

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def _time(self, tokens: float, pairs: float, kv_tokens: float) -> float:
        """pp stage passes (rooflines of a stage's GEMMs and attention + its all-reduces) and
        the hops between stages. Decode callers pass per-micro-batch figures."""
        flop_tok, flop_pair, weights, kv, ar_tok, ar_const, hop_tok, const = self._c
        # GEMMs (compute against streaming the weights) and attention (compute against
        # streaming the KV) are separate kernels: each is its own roofline, and they add up.
        stage = max(flop_tok * tokens, weights) + max(flop_pair * pairs, kv * kv_tokens)
        stage += ar_tok * tokens + ar_const
        return self.pp * stage + hop_tok * tokens + const

    def prefill_time(self, num_tokens: int, sum_sq: float, num_seqs: int) -> float:
        return self._time(num_tokens, sum_sq / 2, num_tokens)

    def decode_time(self, batch_size: int, context_sum: int) -> float:
        # The batch runs as pp micro-batches: each stage pass sees B/pp requests, and a token
        # takes pp stage passes.
        b, ctx = batch_size / self.pp, context_sum / self.pp
        return self._time(b, ctx, ctx + b)

    def mixed_time(
        self, chunk_tokens: int, chunk_pairs: float, batch_size: int, context_sum: int
    ) -> float:
        tokens = chunk_tokens + batch_size
        return self._time(tokens, chunk_pairs + context_sum, context_sum + tokens)


# --- fitted from a profile -------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class FittedLatency:
    """DistServe's forms fitted to measurements of one (TP, PP) on one device type. For
    another (TP, PP), `scale` is analytic(target) / analytic(profiled) at the same point."""

    prefill: tuple[float, ...]  # a, b·Σl, c·Σl², d·n (per prompt)
    decode: tuple[float, float, float]  # a, b·Σctx, c·B
    target: AnalyticLatency | None = None
    profiled: AnalyticLatency | None = None

    @property
    def pp(self) -> int:
        return self.target.pp if self.target else 1

    @property
    def num_devices(self) -> int:
        return self.target.num_devices if self.target else 1

    def _scale(self, method: str, *args) -> float:
        if self.target is None or self.profiled is None:
            return 1.0
        return getattr(self.target, method)(*args) / getattr(self.profiled, method)(*args)

    def prefill_time(self, num_tokens: int, sum_sq: float, num_seqs: int) -> float:
        a, b, c, d = self.prefill
        base = a + b * num_tokens + c * sum_sq + d * num_seqs
        return base * self._scale("prefill_time", num_tokens, sum_sq, num_seqs)

    def decode_time(self, batch_size: int, context_sum: int) -> float:
        a, b, c = self.decode
        base = a + b * context_sum + c * batch_size
        return base * self._scale("decode_time", batch_size, context_sum)

    def mixed_time(
        self, chunk_tokens: int, chunk_pairs: float, batch_size: int, context_sum: int
    ) -> float:
        # One step: the decode part plus the prefill chunk's marginal cost (its constant is
        # the same per-step overhead, counted once).
        pa, pb, pc, _ = self.prefill
        da, db, dc = self.decode
        base = max(pa, da) + pb * chunk_tokens + pc * 2 * chunk_pairs
        base += db * context_sum + dc * batch_size
        return base * self._scale("mixed_time", chunk_tokens, chunk_pairs, batch_size, context_sum)

    def for_parallelism(self, target: AnalyticLatency, profiled: AnalyticLatency) -> FittedLatency:
        return FittedLatency(self.prefill, self.decode, target, profiled)


def fit(features: np.ndarray, times: np.ndarray) -> tuple[float, ...]:
    """Non-negative least squares on relative error: minimise Σ((f·x − t)/t)²."""
    from scipy.optimize import lsq_linear

    weights = 1.0 / times
    result = lsq_linear(features * weights[:, None], np.ones_like(times), bounds=(0, np.inf))
    return tuple(float(x) for x in result.x)


def prefill_features(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    lens = [np.asarray(r["input_lens"], dtype=float) for r in rows]
    x = np.array([[1.0, ls.sum(), (ls**2).sum(), len(ls)] for ls in lens])
    return x, np.array([r["time_s"] for r in rows], dtype=float)


def decode_features(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([[1.0, r["context_len_sum"], r["batch_size"]] for r in rows], dtype=float)
    return x, np.array([r["time_s"] for r in rows], dtype=float)


def fit_with_holdout(
    features: np.ndarray, times: np.ndarray, holdout: float = 0.25, seed: int = 0
) -> dict[str, Any]:
    """Fit on a random (1 - holdout) share, report relative error on the rest, then refit on
    everything for the coefficients that are kept."""
    n = len(times)
    if n < 4:
        raise ValueError(f"need at least 4 measurements to fit and hold out, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    num_test = max(1, math.ceil(n * holdout))
    test, train = order[:num_test], order[num_test:]
    coeffs = np.array(fit(features[train], times[train]))
    errors = np.abs(features[test] @ coeffs - times[test]) / times[test]
    return {
        "coefficients": list(fit(features, times)),
        "holdout_mean_rel_error": float(errors.mean()),
        "holdout_max_rel_error": float(errors.max()),
        "num_train": len(train),
        "num_holdout": num_test,
    }


def fit_profile(profile: dict[str, Any]) -> dict[str, Any]:
    """Fits of a profile's prefill and decode rows (see cluster/placement/profile.py)."""
    return {
        "prefill": fit_with_holdout(*prefill_features(profile["prefill"])),
        "decode": fit_with_holdout(*decode_features(profile["decode"])),
    }


def fitted_from_profile(profile: dict[str, Any]) -> FittedLatency:
    fits = profile.get("fit") or fit_profile(profile)
    return FittedLatency(
        tuple(fits["prefill"]["coefficients"]), tuple(fits["decode"]["coefficients"])
    )
