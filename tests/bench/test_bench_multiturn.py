"""The multi-turn workload of `cluster bench routing` (cluster/bench/multiturn.py): generated
conversations, clipping, the JSONL trace in both dialects, the session runner's closed-loop
and fixed-timing pacing, then one short run against `cluster serve` (tiny model, loopback).

The runner tests before the served one drive a fake backend: what they check (which prompt a
turn carries, in which order turns leave when an answer is late, what a failure or the time
cap does) needs answers whose timing and failures the test controls, which a real server
cannot be made to give on cue."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cluster.bench.loadgen import RequestPlan, RequestRecord
from cluster.bench.multiturn import (
    Conversations,
    SessionSpec,
    TurnSpec,
    build_sessions,
    load_trace,
    retime,
    run_sessions,
    save_trace,
    session_rate_of,
    single_turns,
)

VOCAB, CONTEXT = 512, 4096
SHAPE = Conversations(num_system_prompts=2, system_len=48, turns=(2, 5), user_len=20,
                      answer_len=8, think_time_s=0.5, session_rate=4.0)  # fmt: skip


def _prompts(sessions):
    return [s.prompt_lens for s in sessions]


# --- generation ------------------------------------------------------------------------------


def test_sessions_share_system_prompts_and_histories_grow():
    specs = SHAPE.sample(24, seed=1)
    sessions = build_sessions(specs, VOCAB, CONTEXT, seed=1)
    assert len(sessions) == 24 and {s.system_id for s in specs} == {0, 1}
    by_system: dict[int, list[int]] = {}
    for spec, session in zip(specs, sessions, strict=True):
        assert 2 <= len(session.turns) <= 5
        assert by_system.setdefault(spec.system_id, session.prefix_ids) == session.prefix_ids
        assert len(session.prefix_ids) == 48
        lens = session.prompt_lens
        for k in range(1, len(lens)):  # the last prompt + its answer + the new message
            assert lens[k] == lens[k - 1] + 8 + len(session.new_ids[k])
        for turn in session.turns:
            assert 10 <= turn.input_len <= 30 and turn.output_len == 8
        times = [t.timestamp_s for t in spec.turns]
        assert times == sorted(times) and spec.turns[0].think_time_s is None
        assert all(t.think_time_s is not None for t in spec.turns[1:])
        assert all(3 <= i < VOCAB for ids in session.new_ids for i in ids)
    assert by_system[0] != by_system[1]
    assert specs[0].start_s == 0.0 and session_rate_of(specs) > 0


def test_generation_is_deterministic_by_seed():
    same = build_sessions(SHAPE.sample(8, seed=3), VOCAB, CONTEXT, seed=3)
    again = build_sessions(SHAPE.sample(8, seed=3), VOCAB, CONTEXT, seed=3)
    other = build_sessions(SHAPE.sample(8, seed=4), VOCAB, CONTEXT, seed=4)
    assert same == again and same != other


def test_sessions_are_clipped_to_the_context():
    shape = Conversations(1, system_len=100, turns=6, user_len=40, user_len_spread=0.0,
                          answer_len=30)  # fmt: skip
    sessions = build_sessions(shape.sample(5), VOCAB, max_model_len=300)
    for session in sessions:
        # 100 + (40 + 30) k: turns 0 and 1 fit (240 + 30 <= 300), turn 2 would need 340.
        assert session.prompt_lens == [140, 210]
        for n, turn in zip(session.prompt_lens, session.turns, strict=True):
            assert n + turn.output_len <= 300
    long_first = [SessionSpec("x", (TurnSpec(500, 50, 0.0),), system_id=0, system_len=100)]
    (clipped,) = build_sessions(long_first, VOCAB, max_model_len=300)
    assert clipped.prompt_lens == [250] and clipped.turns[0].output_len == 50
    too_long = [SessionSpec("y", (TurnSpec(5, 5, 0.0),), system_id=0, system_len=300)]
    with pytest.raises(ValueError, match="no room"):
        build_sessions(too_long, VOCAB, max_model_len=300)


def test_single_turns_keep_the_lengths_and_share_nothing():
    sessions = build_sessions(SHAPE.sample(10, seed=2), VOCAB, CONTEXT, seed=2)
    specs = single_turns(sessions, request_rate=12.0, seed=2)
    lengths = sorted((n, t.output_len) for s in sessions
                     for n, t in zip(s.prompt_lens, s.turns, strict=True))  # fmt: skip
    assert sorted((s.turns[0].input_len, s.turns[0].output_len) for s in specs) == lengths
    assert all(len(s.turns) == 1 and s.system_id is None for s in specs)
    singles = build_sessions(specs, VOCAB, CONTEXT, seed=2)
    firsts = {tuple(s.new_ids[0][:16]) for s in singles}
    assert len(firsts) == len(singles)  # no two prompts open alike
    assert session_rate_of(specs) == pytest.approx(12.0, rel=0.5)


# --- the trace ---------------------------------------------------------------------------------


def test_trace_round_trip(tmp_path: Path):
    specs = SHAPE.sample(12, seed=5)
    path = tmp_path / "trace.jsonl"
    save_trace(specs, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == sum(len(s.turns) for s in specs)
    assert [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in rows)
    first = next(r for r in rows if r["turn"] == 0)
    assert {"session_id", "turn", "timestamp", "input_length", "output_length", "system_id",
            "system_length"} <= set(first)  # fmt: skip
    assert load_trace(path) == specs
    halved = retime(specs, 0.5)
    assert session_rate_of(halved) == pytest.approx(2 * session_rate_of(specs))
    assert [t.think_time_s for t in halved[1].turns] == [t.think_time_s for t in specs[1].turns]


def test_mooncake_lines_share_their_blocks(tmp_path: Path):
    path = tmp_path / "mooncake.jsonl"
    lines = [
        {"timestamp": 1000, "input_length": 20, "output_length": 3, "hash_ids": [7, 8, 9]},
        {"timestamp": 1500, "input_length": 16, "output_length": 4, "hash_ids": [7, 8]},
        {"timestamp": 2500, "input_length": 30, "output_length": 2, "hash_ids": [7]},
        {"timestamp": 3.0, "input_length": 5, "output_length": 2},  # ours, no session_id
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    specs = load_trace(path)
    assert [len(s.turns) for s in specs] == [1, 1, 1, 1]
    assert [s.start_s for s in specs] == [0.0, 0.5, 1.5, 2.0]  # ms, then seconds, from 0
    a, b, c, own = build_sessions(specs, VOCAB, CONTEXT, seed=9, block_tokens=8)
    assert [len(s.new_ids[0]) for s in (a, b, c, own)] == [20, 16, 30, 5]
    assert a.new_ids[0][:16] == b.new_ids[0] and c.new_ids[0][:8] == a.new_ids[0][:8]
    assert a.new_ids[0][16:] != c.new_ids[0][8:12]  # block 9 is not the padding of c
    again = tmp_path / "again.jsonl"
    save_trace(specs, again)
    assert [s.turns for s in load_trace(again)] == [s.turns for s in specs]


@pytest.mark.parametrize(
    "lines,message",
    [([{"timestamp": 0, "input_length": 4}], "output_length"),
     ([{"session_id": "a", "turn": 0, "timestamp": 0, "input_length": 4, "output_length": 2},
       {"session_id": "a", "turn": 2, "timestamp": 1, "input_length": 4, "output_length": 2}],
      "not 0..n-1"),
     ([{"timestamp": 0, "input_length": 0, "output_length": 2}], ">= 1")],
    ids=["missing-field", "turn-gap", "empty-turn"],
)  # fmt: skip
def test_bad_trace_lines_say_where(tmp_path: Path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        load_trace(path)


# --- the runner, against a fake backend (see the module docstring) ----------------------------


class _EchoBackend:
    """Answers at once with ids derived from the prompt; a hook may hold or fail a turn."""

    def __init__(self, hook=None):
        self.sent: list[tuple[str, int, list[int]]] = []
        self.hook = hook

    async def send(self, plan: RequestPlan, record: RequestRecord) -> None:
        self.sent.append((record.session_id, record.turn, plan.prompt_ids))
        if self.hook is not None and await self.hook(record):
            record.error = "UNAVAILABLE: injected"
            record.e2e_s = 0.0
            return
        record.ttft_s = record.e2e_s = 0.0
        record.output_ids = [3 + (len(plan.prompt_ids) + i) % 500 for i in range(plan.output_len)]
        record.num_output_tokens = plan.output_len


def test_closed_loop_sends_each_answer_back():
    specs = SHAPE.sample(4, seed=6)
    sessions = build_sessions(specs, VOCAB, CONTEXT, seed=6)
    backend = _EchoBackend()  # time_scale shrinks arrivals and think times alike
    records, _ = asyncio.run(run_sessions(backend, sessions, time_scale=0.01, max_duration_s=10))
    assert len(records) == sum(len(s.turns) for s in sessions)
    assert all(r.ok and r.send_delay_s == 0 for r in records)
    for session in sessions:
        prompts = [p for sid, _, p in backend.sent if sid == session.session_id]
        assert prompts[0] == session.prefix_ids + session.new_ids[0]
        for k in range(1, len(prompts)):
            answer = [3 + (len(prompts[k - 1]) + i) % 500 for i in range(8)]
            assert prompts[k] == prompts[k - 1] + answer + session.new_ids[k]
        assert [len(p) for p in prompts] == session.prompt_lens


def _two_sessions() -> list:
    a = SessionSpec("a", (TurnSpec(4, 2, 0.0), TurnSpec(4, 2, 0.01)))
    b = SessionSpec("b", (TurnSpec(4, 2, 0.05),))
    return build_sessions([a, b], VOCAB, CONTEXT)


def test_fixed_timing_waits_for_the_previous_answer():
    b_sent = asyncio.Event()

    async def hold_a(record):  # a's first answer arrives only after b has been sent
        if record.session_id == "b":
            b_sent.set()
        elif record.turn == 0:
            await b_sent.wait()
        return False

    backend = _EchoBackend(hold_a)
    records, _ = asyncio.run(run_sessions(backend, _two_sessions(), max_duration_s=5,
                                          fixed_timing=True))  # fmt: skip
    # a1 was due at 0.01 s, before b at 0.05 s, but left after a0's answer, after b.
    assert [(sid, k) for sid, k, _ in backend.sent] == [("a", 0), ("b", 0), ("a", 1)]
    a1 = next(r for r in records if (r.session_id, r.turn) == ("a", 1))
    assert a1.scheduled_s == pytest.approx(0.01) and a1.send_delay_s > 0


def test_a_failed_turn_ends_its_session_and_the_cap_cancels():
    async def fail_a(record):
        return record.session_id == "a"

    backend = _EchoBackend(fail_a)
    records, _ = asyncio.run(run_sessions(backend, _two_sessions(), max_duration_s=5))
    assert [(r.session_id, r.turn, r.ok) for r in records] == [("a", 0, False), ("b", 0, True)]

    async def never(record):
        await asyncio.Event().wait()

    records, _ = asyncio.run(run_sessions(_EchoBackend(never), _two_sessions(),
                                          max_duration_s=0.1))  # fmt: skip
    assert [r.error.split(":")[0] for r in records] == ["cancelled", "cancelled"]
    late = asyncio.run(run_sessions(_EchoBackend(), _two_sessions(), max_duration_s=0.02))[0]
    assert {r.session_id for r in late} == {"a"}  # b starts after the cap: never sent


# --- a real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("ray")
    pytest.importorskip("nixl")
    from cluster.bench.local_cluster import LocalCluster

    config = {"mode": "disaggregated", "engine": {"num_blocks": 512}}
    with LocalCluster(config) as cluster:
        yield cluster


class _Recording:
    """The real gRPC backend, keeping each prompt it sent."""

    def __init__(self, backend):
        self.backend, self.prompts = backend, {}

    async def send(self, plan: RequestPlan, record: RequestRecord) -> None:
        self.prompts[record.session_id, record.turn] = plan.prompt_ids
        await self.backend.send(plan, record)


@pytest.mark.slow  # ~15 s, most of it the cluster starting (CLI processes, Ray)
@pytest.mark.timeout(300)
def test_sessions_against_a_served_cluster(served):
    from cluster.bench.loadgen import GrpcBackend

    shape = Conversations(1, system_len=64, turns=3, user_len=12, answer_len=4,
                          think_time_s=0.05, session_rate=4.0)  # fmt: skip
    sessions = build_sessions(shape.sample(3, seed=7), VOCAB, 2048, seed=7)

    async def go():
        async with GrpcBackend(served.target) as grpc:
            recording = _Recording(grpc)
            records, _ = await run_sessions(recording, sessions, max_duration_s=60)
            replay = RequestRecord(0, 4)  # turn 1 of a session again: greedy, same answer
            prompt = recording.prompts[records[0].session_id, 1]
            await grpc.send(RequestPlan(prompt, 4, 0.0), replay)
            return records, recording.prompts, replay

    records, prompts, replay = asyncio.run(go())
    assert len(records) == 9 and all(r.ok for r in records), [r.error for r in records]
    for r in records:
        assert len(r.output_ids) == r.num_output_tokens == 4
        assert r.kv_bytes is not None and r.cached_tokens is not None
        if r.turn >= 1:  # its last prompt is a prefix; one prefill instance has it cached
            assert r.cached_tokens >= 64
            last = prompts[r.session_id, r.turn - 1]
            assert prompts[r.session_id, r.turn][: len(last)] == last
    by_turn = {(r.session_id, r.turn): r for r in records}
    assert replay.output_ids == by_turn[records[0].session_id, 1].output_ids
    assert by_turn[records[0].session_id, 0].kv_bytes > 0  # its KV moved
