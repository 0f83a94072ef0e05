"""Iteration-level scheduler: each step decides how many tokens of which requests run,
under a token budget, in the style of vLLM v1 and Sarathi-Serve. Pure Python.

A step's plan is {request_id: num_new_tokens}; there is no prefill/decode flag. A decode is a
request with one pending token, a prefill chunk one with more. Order within a step:

    1. running decodes          (stall-free: decodes never wait behind a prompt)
    2. running partial prefills (chunked: each gets min(pending, budget left, chunk cap))
    3. waiting requests          (FCFS or priority; prefix-cache hits skip their tokens)

When blocks run out, the lowest-priority running request (FCFS: the latest admitted) is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed.
No new request is admitted in a step that preempted.

Roles: `prefill` and `colocated` schedule the same way (the engine finishes prefill-role
requests after their first token). `decode` also admits requests whose prompt KV arrives from
elsewhere: `reserve_remote` allocates their blocks, `admit_remote` starts their decode.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from cluster.engine.block_manager import BlockManager
from cluster.engine.config import SchedulerConfig
from cluster.engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan: requests in execution order and how many tokens each runs."""

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class WaitingQueue:
    """FCFS deque or (priority, arrival) heap behind one interface."""

    def __init__(self, policy: str):
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = 0

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def __iter__(self):
        if self.policy == "fcfs":
            return iter(list(self._fifo))
        return iter([entry[-1] for entry in sorted(self._heap)])

    def push(self, request: Request, front: bool = False) -> None:
        if self.policy == "fcfs":
            self._fifo.appendleft(request) if front else self._fifo.append(request)
            return
        self._counter += 1
        key = (request.priority, request.times.arrival, self._counter, request)
        heapq.heappush(self._heap, key)

    def peek(self) -> Request:
        return self._fifo[0] if self.policy == "fcfs" else self._heap[0][-1]

    def pop(self) -> Request:
        return self._fifo.popleft() if self.policy == "fcfs" else heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        if self.policy == "fcfs":
            self._fifo.remove(request)
            return
        self._heap = [entry for entry in self._heap if entry[-1] is not request]
        heapq.heapify(self._heap)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.remote: dict[str, Request] = {}  # decode role: blocks reserved, KV in flight
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0  # at admission (vLLM's prefix_cache_queries)
        self.num_prefix_hit_tokens = 0

    @property
    def max_num_running(self) -> int:
        """Seats: max_num_seqs, but never more decodes than one step's token budget can run."""
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.push(request)

    def schedule(self) -> SchedulerOutput:
        if not self.config.chunked_prefill and self.waiting:
            out = SchedulerOutput()
            self._admit_waiting(self.config.max_num_batched_tokens, out, whole=True)
            if out.num_scheduled_tokens:  # a prefill-only step
                out.requests = [r for r in self.running if r.request_id in out.num_scheduled_tokens]
                return out
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # decodes first, then partial prefills; sorted() is stable, admission order kept
        for request in sorted(self.running, key=lambda r: r.is_prefilling):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            budget -= self._schedule_running(request, budget, out)
        if not out.preempted_ids and self.config.chunked_prefill:
            self._admit_waiting(budget, out)
        out.requests = [r for r in self.running if r.request_id in out.num_scheduled_tokens]
        out.requests.sort(key=lambda r: r.is_prefilling)
        return out

    def _chunk(self, request: Request, budget: int, skip: int = 0) -> int:
        num_tokens = min(request.num_pending_tokens - skip, budget)
        cap = self.config.long_prefill_token_threshold
        return min(num_tokens, cap) if cap else num_tokens

    def _schedule_running(self, request: Request, budget: int, out: SchedulerOutput) -> int:
        """Schedule one running request, preempting others for blocks if need be. Returns the
        budget it consumed, net of what preempted victims had been given this step."""
        num_new = self._chunk(request, budget)
        refunded = 0
        while not self.block_manager.allocate_slots(request, num_new):
            victim = self._pick_victim()
            refunded += out.num_scheduled_tokens.pop(victim.request_id, 0)
            self._preempt(victim, out)
            if victim is request:
                return -refunded
        out.num_scheduled_tokens[request.request_id] = num_new
        return num_new - refunded

    def _admit_waiting(self, budget: int, out: SchedulerOutput, whole: bool = False) -> None:
        """Start waiting requests in order while the budget, the seats and the blocks last;
        `whole`: whole prompts only (no chunking), while they fit the budget; the first of the
        step always runs, however long (DistServe's prefill batching)."""
        bm = self.block_manager
        num_seats = self.max_num_running - len(self.remote)  # reserved requests hold seats
        while self.waiting and budget > 0 and len(self.running) < num_seats:
            request = self.waiting.peek()
            # A request that wants its prompt's logprobs computes every position (vLLM too).
            use_cache = not request.num_computed_tokens and request.prompt_logprobs is None
            cached_ids = bm.find_cached_prefix(request) if use_cache else []
            num_cached = len(cached_ids) * bm.block_size
            num_new = self._chunk(request, budget, skip=num_cached)
            if whole:
                num_new = request.num_pending_tokens - num_cached
                if num_new > budget and out.num_scheduled_tokens:
                    break
            if not bm.allocate_slots(request, num_new, cached_ids):
                break
            self.waiting.pop()
            self.num_prefix_query_tokens += request.num_tokens
            self.num_prefix_hit_tokens += num_cached
            request.num_computed_tokens += num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.times.first_scheduled is None:
                request.times.first_scheduled = time.time()
            self.running.append(request)
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            # reversed: among equal (priority, arrival), the latest admitted, as under FCFS
            return max(reversed(self.running), key=lambda r: (r.priority, r.times.arrival))
        return self.running[-1]

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.push(request, front=True)
        self.num_preemptions += 1
        out.preempted_ids.append(request.request_id)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache."""
        for request in out.requests:
            request.num_computed_tokens += out.num_scheduled_tokens[request.request_id]
            self.block_manager.cache_full_blocks(request, request.num_computed_tokens)

    def finish(self, request: Request, status: RequestStatus, free_blocks: bool = True) -> None:
        """Take a request out of every queue; free its blocks unless they stay pinned."""
        if request in self.running:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.remote.pop(request.request_id, None)
        request.status = status
        request.times.finished = time.time()
        if free_blocks:
            self.block_manager.free(request.request_id)

    # -- decode role ------------------------------------------------------------------------

    def reserve_remote(self, request: Request) -> list[int] | None:
        """Allocate blocks for a prompt whose KV will be written from outside. None if the
        pool has no room now, or max_num_seqs is reached (the caller retries or goes
        elsewhere). A prefix this instance has cached (an earlier turn of the conversation)
        is taken from the cache: only the blocks past it are to be written, and
        `request.num_computed_tokens` says where they start."""
        if len(self.running) + len(self.remote) >= self.max_num_running:
            return None  # admit_remote bypasses _admit_waiting's max_num_seqs check
        bm = self.block_manager
        cached_ids = bm.find_cached_prefix(request)
        num_cached = len(cached_ids) * bm.block_size
        if not bm.allocate_slots(request, request.num_tokens - num_cached, cached_ids):
            return None
        self.num_prefix_query_tokens += request.num_tokens
        self.num_prefix_hit_tokens += num_cached
        request.num_computed_tokens = num_cached
        request.status = RequestStatus.WAITING_FOR_KV
        self.remote[request.request_id] = request
        return list(self.block_manager.block_ids(request.request_id))

    def admit_remote(self, request_id: str) -> Request:
        """The prompt's KV is in place: run the request from here (the caller appends the
        first token, sampled elsewhere)."""
        request = self.remote.pop(request_id)
        request.num_computed_tokens = request.num_tokens  # the prompt (and any resumed output)
        request.status = RequestStatus.RUNNING
        request.times.first_scheduled = request.times.first_scheduled or time.time()
        self.block_manager.cache_full_blocks(request, request.num_computed_tokens)
        self.running.append(request)
        return request
