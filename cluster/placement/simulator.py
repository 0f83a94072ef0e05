"""Discrete-event simulator of a cluster serving a list of requests.

Disaggregated: requests arrive at the prefill pool (each goes to the instance with the fewest
pending prompt tokens, as our router does), which batches them FCFS up to a token limit (the
first prompt of a batch runs whole however long); a finished prefill ships its KV over the
link between the two placements, then the request joins the decode instance with the least
reserved KV. Decode instances batch continuously under their KV memory: a request reserves
prompt + output tokens on admission (no preemption), its first token (the prefill sampled
it) leaves when it joins the batch at the next iteration boundary, and every iteration gives
each running request one more token. Colocated: one pool whose
instances mix decodes and chunked prefills in each step under a token budget (vLLM's chunked
prefill), the baseline.

    arrival ──queue──▶ prefill batch ──transfer──▶ decode wait ──▶ first token ─ ─ ─▶ last
             prefill_queue_s  prefill_s   transfer_s   decode_queue_s        TPOT × (out − 1)

transfer_s includes the wait for the decode instance's next step boundary, where it reserves
the blocks before pulling (as our decode worker does under the engine's step lock).

Iterations are simulated, tokens are not: a running request is a (finish iteration, id) pair
in a heap, so 10,000 requests take well under a second.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class LatencyModel(Protocol):
    pp: int

    def prefill_time(self, num_tokens: int, sum_sq: float, num_seqs: int) -> float: ...
    def decode_time(self, batch_size: int, context_sum: int) -> float: ...
    def mixed_time(
        self, chunk_tokens: int, chunk_pairs: float, batch_size: int, context_sum: int
    ) -> float: ...


@dataclass(slots=True, frozen=True)
class InstanceSpec:
    """One instance as the simulator sees it. max_batch_tokens: prefill batch limit, or a
    colocated step's token budget."""

    latency: LatencyModel
    kv_capacity_tokens: int
    max_batch_tokens: int = 4096
    max_num_seqs: int = 256
    # Colocated only. False: prefill-first without chunking (vLLM v0, DistServe's baseline):
    # a step runs either whole prompts up to max_batch_tokens or every decode, never both.
    chunked_prefill: bool = True


@dataclass(slots=True, frozen=True)
class Requests:
    arrival_s: np.ndarray
    input_lens: np.ndarray
    output_lens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)

    def at_rate(self, rate: float) -> Requests:
        """The same requests with arrival times drawn at rate 1 rescaled to `rate`."""
        return Requests(self.arrival_s / rate, self.input_lens, self.output_lens)


@dataclass(slots=True)
class SimResult:
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    prefill_queue_s: np.ndarray
    prefill_s: np.ndarray
    transfer_s: np.ndarray
    decode_queue_s: np.ndarray

    def attainment(self, ttft_s: float | None, tpot_s: float | None) -> float:
        """Share of requests meeting both targets (None: that target is not checked)."""
        ok = np.ones(len(self.ttft_s), dtype=bool)
        if ttft_s is not None:
            ok &= self.ttft_s <= ttft_s
        if tpot_s is not None:
            ok &= self.tpot_s <= tpot_s
        return float(ok.mean())


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


# --- prefill pool ----------------------------------------------------------------------------


def run_prefill(reqs: Requests, instances: list[InstanceSpec]) -> tuple[list, list]:
    """Start and end time of every request's prefill batch."""
    arrival, lens = reqs.arrival_s.tolist(), reqs.input_lens.tolist()
    n, m = len(arrival), len(instances)
    start, done = [0.0] * n, [0.0] * n
    queues = [deque() for _ in range(m)]
    pending = [0] * m  # prompt tokens queued or in a batch not yet finished
    busy = [False] * m
    events: list = []  # (time, kind, seq, instance, batch); kind 0 = batch done, 1 = stage free
    seq = 0

    def try_start(k: int, t: float) -> None:
        nonlocal seq
        queue, spec = queues[k], instances[k]
        if busy[k] or not queue:
            return
        batch, tokens, sum_sq = [queue.popleft()], 0, 0
        tokens, sum_sq = lens[batch[0]], lens[batch[0]] ** 2
        while queue and tokens + lens[queue[0]] <= spec.max_batch_tokens:
            rid = queue.popleft()
            batch.append(rid)
            tokens += lens[rid]
            sum_sq += lens[rid] ** 2
        latency = spec.latency.prefill_time(tokens, sum_sq, len(batch))
        for rid in batch:
            start[rid] = t
        busy[k] = True
        # The next batch starts when this one is done, also with pipeline parallelism: our
        # engine runs a step's micro-batches through every stage before the next step (a
        # single prompt is one micro-batch), it does not overlap steps. (Until 2026-11-29 the
        # first stage took the next batch after 1/pp of this one, as DistServe's system does;
        # the emulated cluster showed the engine never does.)
        heapq.heappush(events, (t + latency, 1, seq, k, None))
        heapq.heappush(events, (t + latency, 0, seq + 1, k, (batch, tokens)))
        seq += 2

    i = 0
    while i < n or events:
        if events and (i >= n or events[0][0] <= arrival[i]):
            t, kind, _, k, payload = heapq.heappop(events)
            if kind == 0:
                batch, tokens = payload
                pending[k] -= tokens
                for rid in batch:
                    done[rid] = t
            else:
                busy[k] = False
                try_start(k, t)
            continue
        t = arrival[i]
        k = min(range(m), key=pending.__getitem__)
        queues[k].append(i)
        pending[k] += lens[i]
        i += 1
        try_start(k, t)
    return start, done


# --- decode and colocated pools --------------------------------------------------------------


class _Instance:
    """Continuous batching on one decode or colocated instance.

    Between two events that change the batch (a request finishing, a request arriving) the
    iterations are identical but for the context growing by B each, so they run as one
    "run" of j iterations whose duration sums the per-iteration latency (exact for latency
    linear in Σctx, the midpoint rule otherwise). An arrival in the middle of a run cuts it
    at the iteration boundary that follows, where the newcomer joins the batch.
    """

    __slots__ = ("spec", "decode", "lens", "outs", "first", "last", "waiting", "joining",
                 "prefilling", "running", "batch_size", "context_sum", "kv_used", "num_pending",
                 "iteration", "busy", "version", "run", "end_s", "completed",
                 "num_reserving", "decode_time")  # fmt: skip

    def __init__(self, spec: InstanceSpec, decode: bool, lens, outs, first, last):
        self.spec, self.decode = spec, decode
        self.decode_time = spec.latency.decode_time  # the hottest call: bound once
        self.lens, self.outs, self.first, self.last = lens, outs, first, last
        self.waiting: deque = deque()  # not admitted yet (no KV memory)
        self.joining: list[int] = []  # first token out, joins the batch at the next boundary
        self.prefilling: list[list[int]] = []  # colocated: [rid, prompt tokens done]
        self.running: list = []  # heap of (finish iteration, rid)
        self.batch_size = 0
        self.context_sum = 0
        self.kv_used = 0  # reserved tokens: prompt + output of every admitted request
        self.num_pending = 0  # tokens of the waiting requests
        self.iteration = 0
        self.busy = False
        self.version = 0  # bumps when the scheduled end event is replaced
        self.run = (0.0, 0)  # (start time, iterations) of the pure-decode run in flight
        self.end_s = 0.0
        self.completed: list[int] = []  # colocated: prompts finishing in this step
        self.num_reserving = 0  # tokens of requests reserving or pulling KV (disaggregated)

    @property
    def load(self) -> int:
        return self.kv_used + self.num_pending + self.num_reserving

    def next_boundary(self, t: float) -> float:
        """The first iteration boundary at or after t (t itself when idle): where a KV
        reservation, taken under the engine's step lock, goes through."""
        if not self.busy:
            return t
        start, num_iterations = self.run
        if num_iterations <= 1 or t <= start:
            return max(t, self.end_s) if t > start else start
        return start + self._duration(self._done_by(t) + 1)

    def _done_by(self, t: float) -> int:
        """Iterations of the run in flight surely done by t (start < t): the largest q <
        num_iterations with start + duration(q) <= t. duration is monotone in q, so any
        search finds the same q; a guess from the run's mean pace, checked and then walked
        or bisected, takes two latency evaluations where a plain bisection takes log2 of
        the run's length."""
        start, num_iterations = self.run
        lo, hi = 0, num_iterations - 1
        span = self.end_s - start
        guess = min(max(int(num_iterations * (t - start) / span) if span > 0 else hi, 1), hi)
        if start + self._duration(guess) <= t:
            lo = guess
            if guess == hi or start + self._duration(guess + 1) > t:
                return guess
            lo = guess + 1
        else:
            hi = guess - 1
            if hi == 0 or start + self._duration(hi) <= t:
                return hi
            hi -= 1
        while lo < hi:
            q = (lo + hi + 1) // 2
            if start + self._duration(q) <= t:
                lo = q
            else:
                hi = q - 1
        return lo

    def arrive(self, rid: int, t: float) -> bool:
        """Queue a request; True when the caller must (re)schedule this instance's event."""
        self.waiting.append(rid)
        self.num_pending += self.lens[rid] + self.outs[rid]
        self._admit(t)
        if not self.busy:
            return self.step(t)
        return self._cut(t)

    def _admit(self, t: float) -> None:
        lens, outs = self.lens, self.outs
        while self.waiting:
            rid = self.waiting[0]
            need = lens[rid] + outs[rid]
            active = self.batch_size + len(self.joining) + len(self.prefilling)
            if active >= self.spec.max_num_seqs:
                break
            # An empty instance takes a request bigger than its memory rather than stall
            # forever; the planner refuses such placements before they get here.
            if self.kv_used + need > self.spec.kv_capacity_tokens and active:
                break
            self.waiting.popleft()
            self.num_pending -= need
            self.kv_used += need
            if not self.decode:
                self.prefilling.append([rid, 0])
            else:
                self._first_token(rid, t)

    def _first_token(self, rid: int, t: float) -> None:
        if self.outs[rid] == 1:
            self.first[rid] = self.last[rid] = t
            self.kv_used -= self.lens[rid] + 1
        else:
            self.joining.append(rid)  # its first token leaves when it joins the batch

    def _duration(self, num_iterations: int) -> float:
        b = self.batch_size
        mid = self.context_sum + b * (num_iterations - 1) / 2
        return num_iterations * self.decode_time(b, mid)

    def step(self, t: float) -> bool:
        """Start the next step (or run of steps) at t; False when there is nothing to do."""
        for rid in self.joining:
            # At an iteration boundary: a decode instance takes a request in (its KV
            # committed) between two steps, as our engine does under its lock; a colocated
            # prompt finished in the step that ends here.
            self.first[rid] = t
            self.batch_size += 1
            self.context_sum += self.lens[rid] + 1
            heapq.heappush(self.running, (self.iteration + self.outs[rid] - 1, rid))
        self.joining.clear()
        self.version += 1
        if self.prefilling and not self.spec.chunked_prefill:
            self.run = (t, 0)  # the decodes wait out the prefill step
            self.end_s = t + self._prefill_step()
        elif self.prefilling:
            self.run = (t, 1)
            self.end_s = t + self._mixed_step()
        elif self.batch_size:
            num_iterations = self.running[0][0] - self.iteration
            self.run = (t, num_iterations)
            self.end_s = t + self._duration(num_iterations)
        else:
            self.busy = False
            return False
        self.busy = True
        return True

    def _cut(self, t: float) -> bool:
        """End the run in flight at the first iteration boundary after t."""
        start, num_iterations = self.run
        if t <= start:  # the step starts at this very instant: the newcomer joins it
            return self.step(t)
        if num_iterations <= 1:
            return False
        lo = self._done_by(t)
        done_s = start + self._duration(lo) if lo else start
        self.iteration += lo
        self.context_sum += self.batch_size * lo
        self.version += 1
        self.run = (done_s, 1)
        self.end_s = done_s + self.spec.latency.decode_time(self.batch_size, self.context_sum)
        return True

    def _mixed_step(self) -> float:
        """Colocated: decodes plus prompt chunks under the token budget, FCFS."""
        budget = self.spec.max_batch_tokens - self.batch_size
        chunk_tokens, pairs = 0, 0.0
        self.completed = []
        for entry in self.prefilling:
            if budget <= 0:
                break
            rid, done = entry
            c = min(self.lens[rid] - done, budget)
            chunk_tokens += c
            pairs += c * done + c * c / 2
            budget -= c
            entry[1] += c
            if entry[1] == self.lens[rid]:
                self.completed.append(rid)
        return self.spec.latency.mixed_time(chunk_tokens, pairs, self.batch_size, self.context_sum)

    def _prefill_step(self) -> float:
        """Prefill-first: whole admitted prompts, FCFS, while they fit the token budget (the
        first always runs)."""
        tokens, pairs, budget = 0, 0.0, self.spec.max_batch_tokens
        self.completed = []
        for rid, _ in self.prefilling:
            n = self.lens[rid]
            if self.completed and tokens + n > budget:
                break
            tokens += n
            pairs += n * n / 2
            self.completed.append(rid)
        return self.spec.latency.mixed_time(tokens, pairs, 0, 0)

    def end(self, t: float) -> bool:
        """The step or run ends at t: count tokens, retire finished requests, go on."""
        num_iterations = self.run[1]
        self.iteration += num_iterations
        self.context_sum += self.batch_size * num_iterations
        lens, outs, running = self.lens, self.outs, self.running
        while running and running[0][0] <= self.iteration:
            _, rid = heapq.heappop(running)
            self.last[rid] = t
            self.batch_size -= 1
            self.context_sum -= lens[rid] + outs[rid]
            self.kv_used -= lens[rid] + outs[rid]
        if self.completed:
            done = set(self.completed)
            self.prefilling = [e for e in self.prefilling if e[0] not in done]
            for rid in self.completed:
                self._first_token(rid, t)
            self.completed = []
        self._admit(t)
        return self.step(t)


def _run_pool(
    times: list[float],
    order: list[int],
    lens: list,
    outs: list,
    specs,
    decode: bool,
    transfer: list | None = None,
) -> tuple[list, list, list]:
    """Requests reach the pool at times[rid], in `order`; each goes to the instance with the
    least reserved + waiting tokens. With `transfer` (disaggregated), times are when the
    prefills finished: the decode instance reserves the KV at its next iteration boundary,
    pulls it for transfer[rid], and takes the request in at the boundary after that (our
    decode worker's reserve and commit both run under the engine's step lock). Returns first
    and last token times, and when each request's KV was in (ready)."""
    n = len(lens)
    first, last = [0.0] * n, [0.0] * n
    ready = [times[rid] for rid in range(n)]
    pool = [_Instance(spec, decode, lens, outs, first, last) for spec in specs]
    events: list = []  # (time, kind, instance, version or rid): kind 0 step end, 1 KV in

    def schedule(k: int) -> None:
        heapq.heappush(events, (pool[k].end_s, 0, k, pool[k].version))

    i = 0
    while i < n or events:
        if events and (i >= n or events[0][0] <= times[order[i]]):
            t, kind, k, tag = heapq.heappop(events)
            if kind == 1:  # a pull finished: the request reaches the instance
                pool[k].num_reserving -= lens[tag] + outs[tag]
                if pool[k].arrive(tag, t):
                    schedule(k)
            elif tag == pool[k].version and pool[k].end(t):
                schedule(k)
            continue
        rid = order[i]
        i += 1
        loads = [p.kv_used + p.num_pending + p.num_reserving for p in pool]  # Instance.load
        k = loads.index(min(loads))
        if transfer is None:
            if pool[k].arrive(rid, times[rid]):
                schedule(k)
            continue
        pool[k].num_reserving += lens[rid] + outs[rid]
        ready[rid] = pool[k].next_boundary(times[rid]) + transfer[rid]
        heapq.heappush(events, (ready[rid], 1, k, rid))
    return first, last, ready


def _result(reqs: Requests, first, last, prefill_start, prefill_done, ready) -> SimResult:
    arrival = reqs.arrival_s
    first, last = np.asarray(first), np.asarray(last)
    outs = reqs.output_lens
    tpot = np.where(outs > 1, (last - first) / np.maximum(outs - 1, 1), 0.0)
    return SimResult(
        ttft_s=first - arrival,
        tpot_s=tpot,
        e2e_s=last - arrival,
        prefill_queue_s=np.asarray(prefill_start) - arrival,
        prefill_s=np.asarray(prefill_done) - np.asarray(prefill_start),
        transfer_s=np.asarray(ready) - np.asarray(prefill_done),
        decode_queue_s=first - np.asarray(ready),
    )


def simulate_disaggregated(
    reqs: Requests,
    prefill: list[InstanceSpec],
    decode: list[InstanceSpec],
    transfer_s: np.ndarray,
    prefill_times: tuple[list, list] | None = None,
) -> SimResult:
    """`transfer_s`: each request's KV transfer time (from its length and the link).
    `prefill_times`: run_prefill(reqs, prefill), when the caller has it already."""
    start, done = prefill_times or run_prefill(reqs, prefill)
    order = sorted(range(len(done)), key=done.__getitem__)
    lens, outs = reqs.input_lens.tolist(), reqs.output_lens.tolist()
    transfer = np.broadcast_to(np.asarray(transfer_s, dtype=float), len(done)).tolist()
    first, last, ready = _run_pool(done, order, lens, outs, decode, True, transfer)
    return _result(reqs, first, last, start, done, ready)


def simulate_prefill_only(
    reqs: Requests,
    prefill: list[InstanceSpec],
    transfer_s: np.ndarray | float = 0.0,
    prefill_times: tuple[list, list] | None = None,
) -> SimResult:
    """The prefill pool alone: TTFT as if decode always had room (a lower bound of the
    disaggregated TTFT for the same requests); TPOT is not modelled (zero)."""
    start, done = prefill_times or run_prefill(reqs, prefill)
    ready = np.asarray(done) + transfer_s
    n = len(reqs)
    return SimResult(ready - reqs.arrival_s, np.zeros(n), ready - reqs.arrival_s,
                     np.asarray(start) - reqs.arrival_s, np.asarray(done) - np.asarray(start),
                     ready - np.asarray(done), np.zeros(n))  # fmt: skip


def simulate_decode_only(reqs: Requests, decode: list[InstanceSpec]) -> SimResult:
    """The decode pool alone, requests arriving with their KV already made."""
    ready = reqs.arrival_s.tolist()
    lens, outs = reqs.input_lens.tolist(), reqs.output_lens.tolist()
    first, last, _ = _run_pool(ready, list(range(len(ready))), lens, outs, decode, decode=True)
    zeros = np.zeros(len(reqs))
    return _result(reqs, first, last, reqs.arrival_s, reqs.arrival_s, reqs.arrival_s + zeros)


# --- colocated -------------------------------------------------------------------------------


def simulate_colocated(reqs: Requests, instances: list[InstanceSpec]) -> SimResult:
    """Colocated instances with chunked prefill: each step runs every decode (one token each)
    and fills the rest of the token budget with prompt chunks, FCFS."""
    arrival = reqs.arrival_s.tolist()
    lens, outs = reqs.input_lens.tolist(), reqs.output_lens.tolist()
    first, last, _ = _run_pool(arrival, list(range(len(arrival))), lens, outs, instances, False)
    first = np.asarray(first)
    return _result(reqs, first, last, reqs.arrival_s, first, first)
