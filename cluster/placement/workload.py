"""Workloads for planning: request length distributions and arrival processes.

The three named workloads follow the datasets DistServe (OSDI'24, §6.1 and Table 1) evaluates
on, by their mean lengths: chatbot ≈ ShareGPT (756 in / 200 out), code ≈ HumanEval
(171 / 98), summarization ≈ LongBench (1738 / 91). Lengths are log-normal with those means;
the spreads (CV) are our assumption, chosen to match the datasets' long tails (ShareGPT is
the widest). A JSONL trace ({"arrival_s", "input_len", "output_len"} per line) replaces both
lengths and arrival times.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(slots=True, frozen=True)
class LengthDist:
    """Log-normal lengths with a given mean and coefficient of variation, clipped."""

    mean: float
    cv: float
    min_len: int = 1
    max_len: int = 8192

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.cv == 0:
            return np.full(n, int(round(self.mean)), dtype=np.int64)
        sigma = math.sqrt(math.log1p(self.cv**2))
        mu = math.log(self.mean) - sigma**2 / 2
        values = np.rint(rng.lognormal(mu, sigma, n))
        return np.clip(values, self.min_len, self.max_len).astype(np.int64)


@dataclass(slots=True, frozen=True)
class Workload:
    name: str
    input: LengthDist
    output: LengthDist

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return self.input.sample(n, rng), self.output.sample(n, rng)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "mean_input_len": self.input.mean,
            "mean_output_len": self.output.mean,
            "input_cv": self.input.cv,
            "output_cv": self.output.cv,
        }


WORKLOADS = {
    "chatbot": Workload("chatbot", LengthDist(756, 1.0, 4, 4096), LengthDist(200, 1.0, 1, 2048)),
    "code": Workload("code", LengthDist(171, 0.4, 16, 2048), LengthDist(98, 0.6, 1, 1024)),
    "summarization": Workload(
        "summarization", LengthDist(1738, 0.5, 64, 8192), LengthDist(91, 0.6, 1, 1024)
    ),
}


@dataclass(slots=True, frozen=True)
class Trace:
    """Recorded requests: arrival times (s, from 0) and lengths."""

    name: str
    arrival_s: np.ndarray
    input_lens: np.ndarray
    output_lens: np.ndarray

    @property
    def rate(self) -> float:
        span = float(self.arrival_s[-1] - self.arrival_s[0])
        return (len(self.arrival_s) - 1) / span if span > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "mean_input_len": float(self.input_lens.mean()),
            "mean_output_len": float(self.output_lens.mean()),
            "num_requests": len(self.arrival_s),
        }

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        rows = []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(
                    (float(row["arrival_s"]), int(row["input_len"]), int(row["output_len"]))
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{number}: each line must be a JSON object with arrival_s, input_len, "
                    f"output_len ({e})"
                ) from e
        if not rows:
            raise ValueError(f"{path}: the trace has no requests")
        rows.sort()
        arrival, inputs, outputs = (np.array(col) for col in zip(*rows, strict=True))
        if inputs.min() < 1 or outputs.min() < 1:
            raise ValueError(f"{path}: input_len and output_len must be >= 1")
        return cls(Path(path).stem, arrival - arrival[0], inputs, outputs)


def load_workload(name: str) -> Workload | Trace:
    if name in WORKLOADS:
        return WORKLOADS[name]
    if Path(name).is_file():
        return Trace.load(name)
    raise ValueError(f"unknown workload {name!r}: use {', '.join(WORKLOADS)} or a JSONL trace file")


def unit_arrivals(n: int, process: str = "poisson", cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Arrival times at rate 1 (divide by the rate to get any other): Poisson, or Gamma
    inter-arrival times with the given coefficient of variation (burstier when cv > 1)."""
    rng = np.random.default_rng(seed + 1)
    if process == "poisson":
        gaps = rng.exponential(1.0, n)
    elif process == "gamma":
        if cv <= 0:
            raise ValueError("the gamma arrival process needs cv > 0")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / shape, n)
    else:
        raise ValueError(f"arrival process must be poisson or gamma, got {process!r}")
    return np.cumsum(gaps) - gaps[0]
