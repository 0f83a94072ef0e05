"""What the router saw of its requests, for the autoscaler: when each arrived and its prompt
length; when each finished, its output length, TTFT and TPOT; which failed. Bounded (the
newest `capacity` of each); the clock is injected (scripted tests)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Observation:
    """One stretch of time [start, end) of the router's requests (router seconds)."""

    start: float
    end: float
    input_lens: tuple[int, ...]  # of the requests that arrived
    output_lens: tuple[int, ...]  # of those that finished (tokens generated)
    ttfts: tuple[float, ...]  # of those that finished
    tpots: tuple[float, ...]  # of those that finished with >= 2 tokens
    num_failed: int = 0

    @property
    def rate(self) -> float:
        """Arrivals per second."""
        span = self.end - self.start
        return len(self.input_lens) / span if span > 0 else 0.0

    def attainment(self, ttft_s: float, tpot_s: float, time_scale: float = 1.0
                   ) -> tuple[float | None, float | None]:  # fmt: skip
        """Shares of finished requests within each target (None: none to judge); a failed
        request misses both. `time_scale`: router seconds per target second (emulation)."""
        n = len(self.ttfts) + self.num_failed
        ttft = sum(t <= ttft_s * time_scale for t in self.ttfts) / n if n else None
        m = len(self.tpots) + self.num_failed
        tpot = sum(t <= tpot_s * time_scale for t in self.tpots) / m if m else None
        return ttft, tpot


class Window:
    def __init__(self, capacity: int = 50_000, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=capacity)
        self._finishes: deque[tuple[float, int, float, float | None]] = deque(maxlen=capacity)
        self._failures: deque[float] = deque(maxlen=capacity)

    def arrived(self, prompt_tokens: int) -> None:
        self._arrivals.append((self.clock(), prompt_tokens))

    def finished(self, output_tokens: int, ttft_s: float | None, e2e_s: float) -> None:
        if ttft_s is None:  # ended before its first token (an abort): nothing to judge
            return
        tpot = (e2e_s - ttft_s) / (output_tokens - 1) if output_tokens > 1 else None
        self._finishes.append((self.clock(), output_tokens, ttft_s, tpot))

    def failed(self) -> None:
        self._failures.append(self.clock())

    def observe(self, since: float, until: float | None = None) -> Observation:
        until = self.clock() if until is None else until
        arrivals = [n for t, n in self._arrivals if since <= t < until]
        done = [f for f in self._finishes if since <= f[0] < until]
        return Observation(
            start=since, end=until,
            input_lens=tuple(arrivals),
            output_lens=tuple(f[1] for f in done),
            ttfts=tuple(f[2] for f in done),
            tpots=tuple(f[3] for f in done if f[3] is not None),
            num_failed=sum(since <= t < until for t in self._failures),
        )  # fmt: skip
