"""What the router saw of its requests, for the autoscaler: when each arrived and its prompt
length; when its first token left (its TTFT); when it finished, its output length and TPOT;
which failed; and which still wait for a first token. Bounded (the newest `capacity` of
each); the clock is injected (scripted tests)."""

from __future__ import annotations

import dataclasses
import itertools
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
    ttfts: tuple[float, ...]  # of the first tokens that left
    output_lens: tuple[int, ...] = ()  # of the requests that finished (tokens generated)
    tpots: tuple[float, ...] = ()  # of those that finished with >= 2 tokens
    num_failed: int = 0
    # at `end`: when the requests arrived that wait for a first token longer than the TTFT
    # target (they have missed it already)
    late_arrivals: tuple[float, ...] = ()
    # (TTFT, the part of it spent on the decode side: waiting for a decode instance or for
    # KV room, the pull, the first step) of the first tokens in the span
    ttft_splits: tuple[tuple[float, float], ...] = ()
    ttft_arrivals: tuple[float, ...] = ()  # when each of `ttfts` arrived (empty: unknown)

    @property
    def num_late(self) -> int:
        return len(self.late_arrivals)

    @property
    def rate(self) -> float:
        """Arrivals per second."""
        span = self.end - self.start
        return len(self.input_lens) / span if span > 0 else 0.0

    @property
    def num_judged(self) -> int:
        return len(self.ttfts) + self.num_failed + self.num_late

    def arrived_since(self, since: float) -> Observation:
        """The TTFT side of the requests that arrived at `since` or later only: what a pool
        that changed at `since` is judged on (a backlog from before is not its doing).
        Failures, finishes and arrivals stay as they are."""
        if not self.ttft_arrivals:
            return self
        kept = [i for i, a in enumerate(self.ttft_arrivals) if a >= since]
        return dataclasses.replace(
            self, ttfts=tuple(self.ttfts[i] for i in kept),
            ttft_arrivals=tuple(self.ttft_arrivals[i] for i in kept),
            late_arrivals=tuple(a for a in self.late_arrivals if a >= since),
        )  # fmt: skip

    def attainment(self, ttft_s: float, tpot_s: float, time_scale: float = 1.0
                   ) -> tuple[float | None, float | None]:  # fmt: skip
        """Shares within each target (None: nothing to judge). A failed request misses both;
        one still waiting past the TTFT target has missed it already. `time_scale`: router
        seconds per target second (emulation)."""
        n = self.num_judged
        ttft = sum(t <= ttft_s * time_scale for t in self.ttfts) / n if n else None
        m = len(self.tpots) + self.num_failed
        tpot = sum(t <= tpot_s * time_scale for t in self.tpots) / m if m else None
        return ttft, tpot


class Window:
    def __init__(self, capacity: int = 50_000, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=capacity)
        self._first: deque[tuple[float, float]] = deque(maxlen=capacity)  # (when, TTFT)
        self._finishes: deque[tuple[float, int, float | None]] = deque(maxlen=capacity)
        self._failures: deque[float] = deque(maxlen=capacity)
        self._splits: deque[tuple[float, float, float]] = deque(maxlen=capacity)
        self._waiting: dict[int, float] = {}  # no first token yet: token -> arrival
        self._tokens = itertools.count()

    def arrived(self, prompt_tokens: int) -> int:
        """A request admitted for routing; its token for first_token / ended."""
        now = self.clock()
        self._arrivals.append((now, prompt_tokens))
        token = next(self._tokens)
        self._waiting[token] = now
        return token

    def first_token(self, token: int) -> None:
        """Its first token left (later calls: nothing)."""
        arrival = self._waiting.pop(token, None)
        if arrival is not None:
            now = self.clock()
            self._first.append((now, now - arrival))

    def split(self, ttft_s: float, decode_side_s: float) -> None:
        """Where one run's time to first token went: `decode_side_s` of it after its prompt
        was computed (or before a decode instance took it), the rest in admission and on the
        prefill instance."""
        self._splits.append((self.clock(), ttft_s, decode_side_s))

    def ended(self, token: int) -> None:
        """It ended, however (with no first token: failed, aborted, refused)."""
        self._waiting.pop(token, None)

    def finished(self, output_tokens: int, tpot_s: float | None) -> None:
        """A choice finished (one with no output token says nothing about lengths)."""
        if output_tokens >= 1:
            self._finishes.append((self.clock(), output_tokens, tpot_s))

    def failed(self) -> None:
        self._failures.append(self.clock())

    def rate(self, until: float, min_span: float, min_arrivals: int) -> float:
        """Arrivals per second up to `until`, over at least `min_span` seconds and at least
        the last `min_arrivals` arrivals (a steady estimate at a low rate: Poisson noise
        over a few arrivals is large)."""
        times = [t for t, _ in self._arrivals if t < until]
        start = until - min_span
        if len(times) > min_arrivals:
            start = min(start, times[-min_arrivals])
        span = until - start
        return sum(t >= start for t in times) / span if span > 0 else 0.0

    def observe(self, since: float, until: float | None = None,
                late_after_s: float | None = None) -> Observation:  # fmt: skip
        """[since, until); `late_after_s`: count the requests waiting longer for their first
        token at `until` (they have missed a TTFT target of that many router seconds)."""
        until = self.clock() if until is None else until
        done = [f for f in self._finishes if since <= f[0] < until]
        late: tuple[float, ...] = ()
        if late_after_s is not None:
            late = tuple(a for a in self._waiting.values() if until - a > late_after_s)
        first = [(t, ttft) for t, ttft in self._first if since <= t < until]
        return Observation(
            start=since, end=until,
            input_lens=tuple(n for t, n in self._arrivals if since <= t < until),
            ttfts=tuple(ttft for _, ttft in first),
            ttft_arrivals=tuple(t - ttft for t, ttft in first),
            output_lens=tuple(f[1] for f in done),
            tpots=tuple(f[2] for f in done if f[2] is not None),
            num_failed=sum(since <= t < until for t in self._failures),
            late_arrivals=late,
            ttft_splits=tuple((t, d) for when, t, d in self._splits if since <= when < until),
        )  # fmt: skip
