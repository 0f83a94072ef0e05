"""Scheduler on the CPU with a real BlockManager and a stand-in for the model step: token
budget and max_num_seqs, decodes first and never stalled, chunked prefill, preemption by
recompute (FCFS and priority), prefix hits at admission, the decode role's remote requests,
and finish() from every queue. A harness checks every plan and the block manager's integrity
after every mutation, and keeps a shadow KV store (which token was computed into which block
slot) so a wrong block table, prefix hit or recompute shows up as wrong "KV"."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.block_manager import BlockManager
from cluster.engine.config import SchedulerConfig
from cluster.engine.request import Request, RequestStatus, RequestTimes
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerOutput


def make_request(
    request_id: str,
    token_ids,
    max_tokens: int = 4,
    priority: int = 0,
    arrival: float = 0.0,
) -> Request:
    return Request(
        request_id,
        list(token_ids),
        SamplingParams(max_tokens=max_tokens),
        priority=priority,
        times=RequestTimes(arrival),
    )


def fake_token(request: Request) -> int:
    """The 'sampled' token: a function of the position, so outputs are predictable even
    across preemption and recompute."""
    return 10_000 + request.num_tokens


def expected_outputs(request: Request) -> list[int]:
    first = 10_000 + request.num_prompt_tokens
    return list(range(first, first + request.params.max_tokens))


class Harness:
    """A scheduler, its block manager and a fake model step, checked after every mutation."""

    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        enable_prefix_caching: bool = True,
        **config,
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.config = SchedulerConfig(**config)
        self.sched = Scheduler(self.config, self.bm)
        self.kv: dict[tuple[int, int], int] = {}
        self.num_cached_at_admission: dict[str, int] = {}
        self.finished: list[Request] = []
        self.admission_order: list[str] = []

    # -- checks -------------------------------------------------------------------------------

    def live_ids(self) -> set[str]:
        ids = {r.request_id for r in self.sched.waiting}
        return ids | {r.request_id for r in self.sched.running} | set(self.sched.remote)

    def check(self) -> None:
        self.bm.check_integrity(live_request_ids=self.live_ids())
        assert len(self.sched.running) <= self.config.max_num_seqs
        for request in self.sched.waiting:
            assert request.status is RequestStatus.WAITING
            assert request.num_computed_tokens == 0 and not self.bm.block_ids(request.request_id)
        for request in self.sched.running:
            assert request.status is RequestStatus.RUNNING
            num_needed = self.bm.num_blocks_needed(request.num_computed_tokens)
            assert len(self.bm.block_ids(request.request_id)) >= num_needed

    def assert_drained(self) -> None:
        assert self.sched.num_unfinished == 0
        assert not self.sched.running and not len(self.sched.waiting) and not self.sched.remote
        self.bm.check_integrity(live_request_ids=set())
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.req_block_ids == {}

    def _check_plan(self, plan: SchedulerOutput, running_before: list[Request]) -> None:
        config = self.config
        assert plan.total_num_tokens <= config.max_num_batched_tokens
        assert len(plan.requests) <= config.max_num_seqs
        assert [r.request_id for r in plan.requests] == list(
            dict.fromkeys(r.request_id for r in plan.requests)
        )
        assert {r.request_id for r in plan.requests} == set(plan.num_scheduled_tokens)
        # decodes first: no 1-token request after a prefill chunk
        flags = [r.is_prefilling for r in plan.requests]
        assert flags == sorted(flags), "a decode was ordered after a prefill chunk"
        for request in plan.requests:
            num_new = plan.num_scheduled_tokens[request.request_id]
            assert 1 <= num_new <= request.num_pending_tokens
            if config.long_prefill_token_threshold:
                assert num_new <= config.long_prefill_token_threshold
            assert request.status is RequestStatus.RUNNING
            num_needed = self.bm.num_blocks_needed(request.num_computed_tokens + num_new)
            assert len(self.bm.block_ids(request.request_id)) >= num_needed
        for request_id in plan.preempted_ids:
            assert request_id not in plan.num_scheduled_tokens
            assert request_id not in {r.request_id for r in self.sched.running}
        if plan.preempted_ids:  # no admission in a step that preempted
            assert {r.request_id for r in plan.requests} <= {r.request_id for r in running_before}
        # stall-free: every running decode that was not preempted runs this step
        for request in running_before:
            if request.status is RequestStatus.RUNNING and not request.is_prefilling:
                assert plan.num_scheduled_tokens.get(request.request_id) == 1

    def _write_kv(self, plan: SchedulerOutput) -> None:
        """Run the 'model': write each scheduled token into its slot, then check that every
        slot the request attends to holds its own token."""
        bs = self.bm.block_size
        for request in plan.requests:
            table = self.bm.block_ids(request.request_id)
            start = request.num_computed_tokens
            end = start + plan.num_scheduled_tokens[request.request_id]
            for pos in range(start, end):
                block = self.bm.blocks[table[pos // bs]]
                assert block.ref_count == 1, "writing into a shared block"
                assert block.hash is None, "writing into a published block"
                self.kv[block.block_id, pos % bs] = request.all_token_ids[pos]
            for pos in range(end):
                assert self.kv[table[pos // bs], pos % bs] == request.all_token_ids[pos]

    # -- driving ------------------------------------------------------------------------------

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.sched.add_request(request)
            self.check()

    def step(self) -> SchedulerOutput:
        running_before = list(self.sched.running)
        plan = self.sched.schedule()
        self.check()
        self._check_plan(plan, running_before)
        for request in plan.requests:
            if request.request_id not in self.num_cached_at_admission:
                self.num_cached_at_admission[request.request_id] = request.num_cached_tokens
                self.admission_order.append(request.request_id)
            assert request.num_cached_tokens == self.num_cached_at_admission[request.request_id]
        self._write_kv(plan)
        self.sched.update_after_step(plan)
        self.check()
        for request in plan.requests:
            assert request.num_computed_tokens <= request.num_tokens
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prefill chunk that did not reach the end: nothing sampled
            request.append_output_token(fake_token(request))
            if request.num_output_tokens >= request.params.max_tokens:
                self.finish(request, RequestStatus.FINISHED_LENGTH)
        return plan

    def finish(self, request: Request, status: RequestStatus) -> None:
        self.sched.finish(request, status)
        self.check()
        assert request.status is status
        assert not self.bm.block_ids(request.request_id)
        self.finished.append(request)

    def run(self, max_steps: int = 2000) -> list[SchedulerOutput]:
        plans = []
        while self.sched.num_unfinished:
            assert len(plans) < max_steps, "no progress"
            plans.append(self.step())
        return plans

    def admit_remote(self, request_id: str) -> Request:
        """Decode role: 'write' the prompt KV into the reserved blocks, then admit."""
        request = self.sched.remote[request_id]
        table = self.bm.block_ids(request_id)
        for pos, token_id in enumerate(request.prompt_token_ids):
            self.kv[table[pos // self.bm.block_size], pos % self.bm.block_size] = token_id
        assert self.sched.admit_remote(request_id) is request
        self.check()
        request.append_output_token(fake_token(request))  # sampled by the prefill instance
        if request.num_output_tokens >= request.params.max_tokens:
            self.finish(request, RequestStatus.FINISHED_LENGTH)
        return request


def tokens(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


# -- budget, order, chunking ------------------------------------------------------------------


def test_budget_and_max_num_seqs_respected():
    h = Harness(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=3)
    lengths = [5, 30, 1, 17, 9, 40, 3, 12]
    requests = [
        make_request(f"r{i}", tokens(100 * i, n), max_tokens=2 + i % 4)
        for i, n in enumerate(lengths)
    ]
    h.add(*requests)
    plans = h.run()
    assert plans[0].total_num_tokens == 16  # the budget is used, not just respected
    assert max(len(p.requests) for p in plans) == 3
    assert all(p.total_num_tokens <= 16 and len(p.requests) <= 3 for p in plans)
    for request in requests:
        assert request.output_token_ids == expected_outputs(request)
        assert request.status is RequestStatus.FINISHED_LENGTH
    h.assert_drained()


def test_empty_scheduler_plans_nothing():
    h = Harness()
    plan = h.step()
    assert plan.is_empty and plan.total_num_tokens == 0 and plan.requests == []
    h.assert_drained()


def test_decodes_run_first_and_are_never_stalled_by_a_long_prompt():
    h = Harness(num_blocks=128, max_num_batched_tokens=16)
    decoders = [make_request(f"d{i}", tokens(100 * i, 3), max_tokens=40) for i in range(3)]
    h.add(*decoders)
    assert h.step().num_scheduled_tokens == {"d0": 3, "d1": 3, "d2": 3}
    long = make_request("long", tokens(5000, 200), max_tokens=2)
    h.add(long)
    num_prefill_steps = 0
    while long.num_output_tokens == 0:
        chunk = min(13, long.num_pending_tokens)  # the budget left after 3 decodes
        plan = h.step()
        num_prefill_steps += 1
        assert [r.request_id for r in plan.requests] == ["d0", "d1", "d2", "long"]
        assert plan.num_scheduled_tokens == {"d0": 1, "d1": 1, "d2": 1, "long": chunk}
    assert num_prefill_steps == -(-200 // 13)
    assert all(d.num_output_tokens == 1 + num_prefill_steps for d in decoders)
    h.run()
    h.assert_drained()


def test_step_order_is_decodes_then_running_prefills_then_new_prompts():
    h = Harness(num_blocks=128, max_num_batched_tokens=20, long_prefill_token_threshold=8)
    decoder = make_request("dec", tokens(0, 2), max_tokens=20)
    h.add(decoder)
    h.step()
    early = make_request("early", tokens(100, 30))
    h.add(early)
    assert h.step().num_scheduled_tokens == {"dec": 1, "early": 8}
    late = make_request("late", tokens(200, 30))
    h.add(late)
    plan = h.step()
    assert [r.request_id for r in plan.requests] == ["dec", "early", "late"]
    assert plan.num_scheduled_tokens == {"dec": 1, "early": 8, "late": 8}
    h.run()
    h.assert_drained()


@pytest.mark.parametrize(("budget", "threshold"), [(32, 0), (64, 32), (32, 64)])
def test_chunked_prefill_splits_a_long_prompt(budget, threshold):
    h = Harness(
        num_blocks=64, max_num_batched_tokens=budget, long_prefill_token_threshold=threshold
    )
    request = make_request("r", tokens(0, 100), max_tokens=2)
    h.add(request)
    chunks, computed, outputs = [], [], []
    while request.num_output_tokens == 0:
        chunks.append(h.step().num_scheduled_tokens["r"])
        computed.append(request.num_computed_tokens)
        outputs.append(request.num_output_tokens)
    assert chunks == [32, 32, 32, 4]
    assert computed == [32, 64, 96, 100]  # only the last chunk reaches num_tokens
    assert outputs == [0, 0, 0, 1]
    assert h.step().num_scheduled_tokens == {"r": 1}  # then it decodes
    assert request.is_finished
    h.assert_drained()


def test_long_prefill_threshold_lets_prompts_share_a_step():
    h = Harness(num_blocks=64, max_num_batched_tokens=64, long_prefill_token_threshold=32)
    h.add(make_request("a", tokens(0, 100)), make_request("b", tokens(1000, 100)))
    assert h.step().num_scheduled_tokens == {"a": 32, "b": 32}
    h.run()
    h.assert_drained()


# -- preemption -------------------------------------------------------------------------------


def test_preemption_frees_the_latest_admitted_request_which_later_completes():
    # 6 blocks of 4: three 7-token prompts fill the pool; at 9 tokens each needs a 3rd block
    h = Harness(num_blocks=6, max_num_batched_tokens=64)
    a, b, c = (make_request(n, tokens(100 * i, 7), max_tokens=6) for i, n in enumerate("abc"))
    h.add(a, b, c)
    h.step()
    h.step()
    assert h.bm.num_free_blocks == 0
    plan = h.step()
    assert plan.preempted_ids == ["c"]
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert c.status is RequestStatus.WAITING
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert h.bm.block_ids("c") == []
    assert h.sched.waiting.peek() is c
    assert h.sched.running == [a, b]
    assert h.sched.num_preemptions == 1
    assert c.output_token_ids == expected_outputs(c)[:2]  # outputs survive preemption

    d = make_request("d", tokens(900, 3), max_tokens=2)
    h.add(d)
    assert list(h.sched.waiting) == [c, d]  # the victim stays ahead of later arrivals
    h.run()
    for request in (a, b, c, d):
        assert request.output_token_ids == expected_outputs(request)
    assert c.num_cached_tokens == 0
    h.assert_drained()


def test_preemption_refunds_a_victim_already_scheduled_this_step():
    # p (admitted first) is mid-prefill, v decodes; p's next chunk needs v's blocks
    h = Harness(
        num_blocks=5,
        enable_prefix_caching=False,
        max_num_batched_tokens=64,
        long_prefill_token_threshold=4,
    )
    p = make_request("p", tokens(0, 16), max_tokens=1)
    v = make_request("v", tokens(100, 3), max_tokens=10)
    h.add(p, v)
    for _ in range(3):
        h.step()
    assert h.bm.num_free_blocks == 0
    plan = h.step()
    assert plan.preempted_ids == ["v"]
    assert plan.num_scheduled_tokens == {"p": 4}
    assert [r.request_id for r in plan.requests] == ["p"]
    h.run()
    assert v.output_token_ids == expected_outputs(v)
    h.assert_drained()


def test_refunded_budget_goes_to_the_next_running_request():
    # running [p, q, v]: v decodes first, then p's chunk needs v's only block; v's token
    # goes back to the budget and q, next in line, gets it
    h = Harness(
        num_blocks=3,
        enable_prefix_caching=False,
        max_num_batched_tokens=5,
        long_prefill_token_threshold=4,
    )
    p = make_request("p", tokens(0, 8), max_tokens=1)
    q = make_request("q", tokens(100, 5), max_tokens=1)
    h.add(p, q)
    assert h.step().num_scheduled_tokens == {"p": 4, "q": 1}
    v = make_request("v", tokens(200, 3), max_tokens=3)
    assert h.sched.reserve_remote(v) is not None
    h.admit_remote("v")
    assert h.bm.num_free_blocks == 0
    plan = h.step()
    assert plan.preempted_ids == ["v"]
    assert plan.num_scheduled_tokens == {"p": 4, "q": 1}
    h.run()
    assert v.output_token_ids == expected_outputs(v)
    h.assert_drained()


def test_running_prefill_left_out_when_the_budget_is_spent():
    h = Harness(num_blocks=32, max_num_batched_tokens=6, long_prefill_token_threshold=4)
    a = make_request("a", tokens(0, 20), max_tokens=1)
    b = make_request("b", tokens(100, 20), max_tokens=1)
    h.add(a, b)
    assert h.step().num_scheduled_tokens == {"a": 4, "b": 2}
    for i in range(2):  # remote decodes join without going through the budget
        assert h.sched.reserve_remote(make_request(f"v{i}", tokens(200 + 10 * i, 3))) is not None
        h.admit_remote(f"v{i}")
    plan = h.step()
    assert plan.num_scheduled_tokens == {"v0": 1, "v1": 1, "a": 4}  # b gets nothing, not 0
    assert b.num_computed_tokens == 2
    h.run()
    h.assert_drained()


def test_no_admission_in_a_step_that_preempted():
    h = Harness(
        num_blocks=5,
        enable_prefix_caching=False,
        max_num_batched_tokens=64,
        max_num_seqs=2,
        long_prefill_token_threshold=4,
    )
    a = make_request("a", tokens(0, 4), max_tokens=8)
    b = make_request("b", tokens(100, 12), max_tokens=4)
    d = make_request("d", tokens(200, 4), max_tokens=1)
    h.add(a, b, d)  # d waits: max_num_seqs
    for _ in range(3):
        plan = h.step()
        assert "d" not in plan.num_scheduled_tokens
    plan = h.step()  # b's first decode needs a 4th block: b preempts itself
    assert plan.preempted_ids == ["b"]
    assert plan.num_scheduled_tokens == {"a": 1}
    assert list(h.sched.waiting) == [b, d]
    # b's next chunk would fit, and a seat is free, yet nothing was admitted
    assert h.bm.can_allocate(b, 4, []) and len(h.sched.running) < 2
    assert h.step().num_scheduled_tokens == {"a": 1, "b": 4}
    h.run()
    for request in (a, b, d):
        assert request.output_token_ids == expected_outputs(request)
    h.assert_drained()


def test_priority_preempts_the_worst_request_not_the_latest():
    h = Harness(num_blocks=6, max_num_batched_tokens=64, policy="priority")
    a = make_request("a", tokens(0, 7), max_tokens=6, priority=0, arrival=1.0)
    b = make_request("b", tokens(100, 7), max_tokens=6, priority=9, arrival=2.0)
    c = make_request("c", tokens(200, 7), max_tokens=6, priority=3, arrival=3.0)
    h.add(a, b)
    h.step()
    h.add(c)
    h.step()
    assert h.sched.running == [a, b, c]
    assert h.bm.num_free_blocks == 0
    plan = h.step()  # a needs a 3rd block: b is the worst, c the latest
    assert plan.preempted_ids == ["b"]
    assert plan.num_scheduled_tokens == {"a": 1, "c": 1}
    assert b.status is RequestStatus.WAITING and h.bm.block_ids("b") == []
    late = make_request("late", tokens(300, 3), max_tokens=1, priority=1, arrival=10.0)
    h.add(late)
    assert list(h.sched.waiting) == [late, b]  # priority first, even over a preempted one
    h.run()
    for request in (a, b, c, late):
        assert request.output_token_ids == expected_outputs(request)
    h.assert_drained()


def test_priority_victim_among_equals_is_the_latest_admitted():
    h = Harness(num_blocks=6, max_num_batched_tokens=64, policy="priority")
    reqs = [make_request(n, tokens(100 * i, 7), max_tokens=6) for i, n in enumerate("abc")]
    h.add(*reqs)  # same priority, same arrival: heap order is push order
    while not h.sched.num_preemptions:
        h.step()
    assert [r.num_preemptions for r in reqs] == [0, 0, 1]
    h.run()
    h.assert_drained()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("fcfs", ["r1", "r2", "r3", "r4"]), ("priority", ["r4", "r2", "r3", "r1"])],
)
def test_waiting_order_follows_the_policy(policy, expected):
    h = Harness(max_num_seqs=1, policy=policy)
    h.add(
        make_request("r1", tokens(0, 5), priority=2, arrival=1.0),
        make_request("r2", tokens(100, 5), priority=0, arrival=3.0),
        make_request("r3", tokens(200, 5), priority=1, arrival=2.0),
        make_request("r4", tokens(300, 5), priority=0, arrival=2.5),
    )
    assert [r.request_id for r in h.sched.waiting] == expected
    h.run()
    assert h.admission_order == expected
    h.assert_drained()


# -- prefix cache -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "num_hit_tokens"),
    [
        (tokens(0, 16) + tokens(500, 4), 16),  # 4 shared blocks + new tail
        (tokens(0, 20), 16),  # identical 20 tokens: the 5th block is partial
        (tokens(0, 16), 12),  # identical 16 tokens: the last token is never a hit
        (tokens(0, 6) + tokens(500, 10), 4),  # diverges inside block 1
        (tokens(1, 20), 0),
    ],
)
def test_admission_after_a_finished_identical_prefix_skips_hit_tokens(prompt, num_hit_tokens):
    h = Harness(num_blocks=32, max_num_batched_tokens=64)
    first = make_request("first", tokens(0, 20), max_tokens=2)
    h.add(first)
    h.run()
    second = make_request("second", prompt, max_tokens=2)
    h.add(second)
    plan = h.sched.schedule()
    assert second.num_computed_tokens == num_hit_tokens
    assert second.num_cached_tokens == num_hit_tokens
    assert plan.num_scheduled_tokens == {"second": len(prompt) - num_hit_tokens}
    num_hit_blocks = num_hit_tokens // 4
    first_blocks = [h.bm.cached_block_ids[x] for x in first.block_hashes[:num_hit_blocks]]
    assert h.bm.block_ids("second")[:num_hit_blocks] == first_blocks
    h.check()
    h.sched.update_after_step(plan)
    h.sched.finish(second, RequestStatus.FINISHED_ABORTED)
    h.check()
    h.assert_drained()


def test_concurrent_identical_prompts_share_blocks_once_published():
    h = Harness(num_blocks=32, max_num_batched_tokens=12, long_prefill_token_threshold=8)
    a = make_request("a", tokens(0, 24), max_tokens=3)
    h.add(a)
    h.step()  # a's first 8 tokens: 2 blocks published
    b = make_request("b", tokens(0, 24), max_tokens=3)
    h.add(b)
    plan = h.step()
    assert b.num_cached_tokens == 8
    assert plan.num_scheduled_tokens == {"a": 8, "b": 4}
    assert h.bm.block_ids("b")[:2] == h.bm.block_ids("a")[:2]
    assert [h.bm.blocks[i].ref_count for i in h.bm.block_ids("a")[:2]] == [2, 2]
    h.run()
    assert a.output_token_ids == b.output_token_ids == expected_outputs(a)
    h.assert_drained()


def test_prefix_caching_disabled_schedules_every_token():
    h = Harness(num_blocks=32, enable_prefix_caching=False)
    h.add(make_request("a", tokens(0, 20), max_tokens=1))
    h.run()
    b = make_request("b", tokens(0, 20), max_tokens=1)
    h.add(b)
    assert h.step().num_scheduled_tokens == {"b": 20}
    assert b.num_cached_tokens == 0
    h.assert_drained()


# -- decode role ------------------------------------------------------------------------------


def test_reserve_and_admit_remote():
    h = Harness(num_blocks=8, max_num_batched_tokens=64)
    r = make_request("r", tokens(0, 10), max_tokens=3)
    block_ids = h.sched.reserve_remote(r)
    h.check()
    assert block_ids == h.bm.block_ids("r") and len(block_ids) == 3
    assert r.status is RequestStatus.WAITING_FOR_KV
    assert h.sched.remote == {"r": r} and h.sched.num_unfinished == 1
    assert h.bm.num_free_blocks == 5
    block_ids.append(99)  # the caller's copy, not the block table
    assert len(h.bm.block_ids("r")) == 3
    assert h.step().is_empty  # a request whose KV is in flight is not scheduled

    big = make_request("big", tokens(100, 21), max_tokens=3)  # 6 blocks, 5 free
    free_queue_before = list(h.bm.free_queue)
    assert h.sched.reserve_remote(big) is None
    h.check()
    assert "big" not in h.sched.remote and "big" not in h.bm.req_block_ids
    assert list(h.bm.free_queue) == free_queue_before

    h.admit_remote("r")
    assert r.status is RequestStatus.RUNNING and h.sched.running == [r]
    assert r.num_computed_tokens == 10 and r.times.first_scheduled is not None
    assert "r" not in h.sched.remote
    assert h.step().num_scheduled_tokens == {"r": 1}
    h.run()
    assert r.output_token_ids == expected_outputs(r)
    h.assert_drained()


def test_remote_prompt_blocks_are_published_for_local_hits():
    h = Harness(num_blocks=16)
    r = make_request("r", tokens(0, 10), max_tokens=1)
    h.sched.reserve_remote(r)
    h.admit_remote("r")
    h.finish(r, RequestStatus.FINISHED_LENGTH)
    local = make_request("local", tokens(0, 12), max_tokens=1)
    h.add(local)
    assert h.step().num_scheduled_tokens == {"local": 4}
    assert local.num_cached_tokens == 8
    h.assert_drained()


def test_remote_requests_count_against_max_num_seqs():
    h = Harness(num_blocks=32, max_num_seqs=2)
    reqs = [make_request(f"r{i}", tokens(100 * i, 5)) for i in range(3)]
    assert h.sched.reserve_remote(reqs[0]) is not None
    h.admit_remote("r0")
    assert h.sched.reserve_remote(reqs[1]) is not None
    assert h.sched.reserve_remote(reqs[2]) is None  # two seats taken: one running, one remote
    h.check()
    assert "r2" not in h.bm.req_block_ids
    h.admit_remote("r1")
    h.run()
    assert h.sched.reserve_remote(reqs[2]) is not None
    h.admit_remote("r2")
    h.run()
    h.assert_drained()


def test_reserved_remote_requests_hold_seats_against_local_admission():
    h = Harness(num_blocks=32, max_num_seqs=2)
    remote = make_request("remote", tokens(0, 5))
    local = [make_request(f"l{i}", tokens(100 * i + 100, 5)) for i in range(2)]
    assert h.sched.reserve_remote(remote) is not None
    h.add(*local)
    assert h.step().num_scheduled_tokens == {"l0": 5}  # one seat is the reserved request's
    h.admit_remote("remote")
    assert len(h.sched.running) == 2
    h.run()
    h.assert_drained()


# -- finish -----------------------------------------------------------------------------------


def test_finish_from_every_queue_frees_blocks():
    h = Harness(
        num_blocks=16, enable_prefix_caching=False, max_num_batched_tokens=8, max_num_seqs=3
    )
    decoding = make_request("decoding", tokens(0, 3), max_tokens=50)
    prefilling = make_request("prefilling", tokens(100, 30), max_tokens=50)
    waiting = make_request("waiting", tokens(200, 5))
    remote = make_request("remote", tokens(300, 9))
    h.add(decoding, prefilling, waiting)
    h.step()
    h.step()  # the budget goes to the first two: "waiting" still waits
    assert waiting.status is RequestStatus.WAITING
    assert decoding.num_output_tokens > 0 and prefilling.is_prefilling
    assert h.sched.reserve_remote(remote) is not None
    assert h.bm.num_free_blocks < h.bm.num_blocks

    h.finish(waiting, RequestStatus.FINISHED_ABORTED)
    assert list(h.sched.waiting) == []
    h.finish(prefilling, RequestStatus.FINISHED_ABORTED)
    h.finish(remote, RequestStatus.FINISHED_ABORTED)
    assert h.sched.remote == {}
    h.finish(decoding, RequestStatus.FINISHED_STOPPED)
    assert all(r.times.finished is not None for r in h.finished)
    h.assert_drained()


def test_finish_a_preempted_request_from_waiting():
    h = Harness(num_blocks=6, max_num_batched_tokens=64)
    reqs = [make_request(n, tokens(100 * i, 7), max_tokens=6) for i, n in enumerate("abc")]
    h.add(*reqs)
    while not h.sched.num_preemptions:
        h.step()
    victim = reqs[2]
    assert victim.status is RequestStatus.WAITING
    h.finish(victim, RequestStatus.FINISHED_ABORTED)
    assert victim not in list(h.sched.waiting)
    h.run()
    h.assert_drained()


def test_finish_without_freeing_pins_the_blocks():
    h = Harness(num_blocks=8)
    r = make_request("r", tokens(0, 9), max_tokens=5)
    h.add(r)
    h.step()
    h.sched.finish(r, RequestStatus.FINISHED_PREFILLED, free_blocks=False)
    assert h.sched.num_unfinished == 0
    assert len(h.bm.block_ids("r")) == 3  # held for the KV transfer
    h.bm.check_integrity(live_request_ids={"r"})
    with pytest.raises(AssertionError, match=r"\['r'\]"):
        h.bm.check_integrity(live_request_ids=set())
    h.bm.free("r")
    h.assert_drained()


# -- randomized -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_workloads_complete_with_correct_kv(seed):
    """Random pools, budgets, chunk caps, policies, aborts and arrivals (local, or remote as
    on a decode instance) over shared prefixes: every plan is valid, every request ends with
    exactly its expected tokens, all blocks come back."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_len = 40
    budget = rng.randint(4, 48)
    h = Harness(
        num_blocks=-(-max_len // block_size) + rng.randint(0, 12),  # one request always fits
        block_size=block_size,
        enable_prefix_caching=rng.random() < 0.8,
        max_num_batched_tokens=budget,
        max_num_seqs=rng.randint(1, min(budget, 6)),
        long_prefill_token_threshold=rng.choice([0, 0, rng.randint(1, 16)]),
        policy=rng.choice(["fcfs", "priority"]),
    )
    prefixes = [tokens(1000, 24), tokens(2000, 24)]
    pending = []
    for i in range(rng.randint(1, 10)):
        prompt = rng.choice(prefixes)[: rng.randint(0, 24)]
        prompt += [rng.randint(0, 3) for _ in range(rng.randint(0 if prompt else 1, 8))]
        max_tokens = rng.randint(1, max_len - len(prompt))
        arrival_step = rng.randint(0, 20)
        request = make_request(
            f"r{i}", prompt, max_tokens, priority=rng.randint(0, 2), arrival=float(arrival_step)
        )
        pending.append((arrival_step, rng.random() < 0.25, request))
    requests = [r for _, _, r in pending]
    to_reserve: list[Request] = []  # remote arrivals waiting for blocks and a seat
    for step in range(2000):
        for request_id in list(h.sched.remote):  # last step's transfers have landed
            h.admit_remote(request_id)
        for arrival_step, is_remote, request in pending:
            if arrival_step == step and is_remote:
                to_reserve.append(request)
            elif arrival_step == step:
                h.add(request)
        for request in list(to_reserve):
            if h.sched.reserve_remote(request) is not None:
                to_reserve.remove(request)
            h.check()
        if step > 20 and not h.sched.num_unfinished and not to_reserve:
            break
        if rng.random() < 0.03 and h.sched.num_unfinished:
            live = [*h.sched.running, *h.sched.waiting, *h.sched.remote.values()]
            h.finish(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        h.step()
    else:
        raise AssertionError("no progress")
    for request in requests:
        assert request.is_finished
        if request.status is RequestStatus.FINISHED_LENGTH:
            assert request.output_token_ids == expected_outputs(request)
    h.assert_drained()
