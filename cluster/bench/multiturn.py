"""Multi-turn conversations for `cluster bench routing`: sessions that share system prompts
and resend their whole growing history every turn, which is what makes KV-aware routing pay
(docs/benchmarking.md, "KV-aware routing").

    turn 0   [system s][user 1]                                      -> answer 1
    turn 1   [system s][user 1][answer 1][user 2]                    -> answer 2
    turn 2   [system s][user 1][answer 1][user 2][answer 2][user 3]  -> answer 3

The answers are the token ids the server streamed back (greedy, ignore_eos, so each has
exactly its length), so a session is closed-loop: turn k+1 leaves its think time after
answer k has arrived. Three layers, each a plain value:

    SessionSpec   lengths and timing only: what `Conversations` generates and a JSONL trace
                  holds (ours, or Mooncake-style lines with hash_ids); save_trace/load_trace
    Session       a spec made concrete for one model: random token ids (the system prompts
                  shared, Mooncake blocks shared by hash id), clipped to max_model_len
    run_sessions  drives every session as its own task through a loadgen backend and returns
                  one loadgen.RequestRecord per turn sent
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.bench.loadgen import RequestPlan, RequestRecord
from cluster.placement.workload import unit_arrivals

MOONCAKE_BLOCK_TOKENS = 512  # tokens behind one hash id in Mooncake's traces
_CANCELLED = "cancelled: still running at 2 x the run's time cap"


# --- lengths and timing ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TurnSpec:
    """One turn. `input_len` counts the NEW tokens of the turn (the user message; the system
    prompt is the session's), except with `hash_ids`, where it is the whole prompt, built
    from those shared blocks (Mooncake). `timestamp_s` is when it is sent at fixed timing;
    `think_time_s` the wait after the previous answer when replayed closed-loop (None: the
    gap between the two timestamps)."""

    input_len: int
    output_len: int
    timestamp_s: float
    think_time_s: float | None = None
    hash_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input and output lengths must be >= 1, got {self}")
        if self.timestamp_s < 0 or (self.think_time_s is not None and self.think_time_s < 0):
            raise ValueError(f"timestamp and think time must be >= 0, got {self}")
        if any(h < 0 for h in self.hash_ids):
            raise ValueError(f"hash ids must be >= 0, got {self.hash_ids}")


@dataclass(slots=True, frozen=True)
class SessionSpec:
    session_id: str
    turns: tuple[TurnSpec, ...]
    system_id: int | None = None  # which shared system prompt opens the session
    system_len: int = 0

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError(f"session {self.session_id!r} has no turns")
        if (self.system_id is None) != (self.system_len == 0) or self.system_len < 0:
            raise ValueError(
                f"session {self.session_id!r}: a system prompt needs an id and a length >= 1, "
                f"got id {self.system_id}, length {self.system_len}"
            )

    @property
    def start_s(self) -> float:
        return self.turns[0].timestamp_s

    def retimed(self, factor: float = 1.0, offset: float = 0.0) -> SessionSpec:
        turns = tuple(
            dataclasses.replace(t, timestamp_s=t.timestamp_s * factor + offset) for t in self.turns
        )
        return dataclasses.replace(self, turns=turns)


@dataclass(slots=True, frozen=True)
class Conversations:
    """The generated workload: sessions arrive Poisson at `session_rate`; each opens with one
    of `num_system_prompts` shared system prompts, then runs `turns` (a count or a min,max
    range) of user messages (uniform in user_len x [1 - spread, 1 + spread]) and answers of
    `answer_len` tokens, with exponential think times of mean `think_time_s` in between."""

    num_system_prompts: int = 4
    system_len: int = 512
    turns: tuple[int, int] = (2, 6)
    user_len: int = 64
    user_len_spread: float = 0.5
    answer_len: int = 32
    think_time_s: float = 2.0
    session_rate: float = 1.0

    def __post_init__(self) -> None:
        turns = (self.turns, self.turns) if isinstance(self.turns, int) else tuple(self.turns)
        if len(turns) == 1:
            turns = (turns[0], turns[0])
        object.__setattr__(self, "turns", turns)
        if len(turns) != 2 or not 1 <= turns[0] <= turns[1]:
            raise ValueError(f"turns must be a count >= 1 or a range min,max, got {self.turns}")
        if min(self.num_system_prompts, self.system_len, self.user_len, self.answer_len) < 1:
            raise ValueError("system prompts, system, user and answer lengths must be >= 1")
        if not 0 <= self.user_len_spread < 1:
            raise ValueError(f"user_len_spread must be in [0, 1), got {self.user_len_spread}")
        if self.think_time_s < 0 or not self.session_rate > 0:
            raise ValueError("think_time_s must be >= 0 and session_rate > 0")

    @property
    def mean_turns(self) -> float:
        return (self.turns[0] + self.turns[1]) / 2

    def sample(self, num_sessions: int, seed: int = 0) -> list[SessionSpec]:
        """Sessions with their turn-0 arrivals; a later turn's timestamp is its previous one
        plus its think time (the time it would leave if answers took none)."""
        rng = np.random.default_rng([seed, 0])
        starts = unit_arrivals(num_sessions, "poisson", seed=seed) / self.session_rate
        low = max(1, round(self.user_len * (1 - self.user_len_spread)))
        high = max(low, round(self.user_len * (1 + self.user_len_spread)))
        sessions = []
        for i, start in enumerate(starts):
            n = int(rng.integers(self.turns[0], self.turns[1] + 1))
            user_lens = rng.integers(low, high + 1, n)
            thinks = rng.exponential(self.think_time_s, n) if self.think_time_s else np.zeros(n)
            turns, t = [], float(start)
            for k in range(n):
                think = None if k == 0 else float(thinks[k])
                t += think or 0.0
                turns.append(TurnSpec(int(user_lens[k]), self.answer_len, t, think))
            system_id = int(rng.integers(self.num_system_prompts))
            sessions.append(SessionSpec(f"s{i}", tuple(turns), system_id, self.system_len))
        return sessions


def session_rate_of(specs: list[SessionSpec]) -> float:
    """Sessions per second of a trace, from its session starts (as placement's Trace.rate)."""
    starts = sorted(s.start_s for s in specs)
    span = starts[-1] - starts[0]
    if span <= 0:
        raise ValueError("every session starts at once: the trace has no session rate")
    return (len(starts) - 1) / span


def retime(specs: list[SessionSpec], factor: float) -> list[SessionSpec]:
    """Every timestamp times `factor` (think times, where given, stay: they are the user's)."""
    return [s.retimed(factor=factor) for s in specs]


# --- the JSONL trace ---------------------------------------------------------------------------


def save_trace(specs: Iterable[SessionSpec], path: str | Path) -> None:
    """One line per turn in time order; a Mooncake-style turn (hash_ids) as Mooncake writes
    it (timestamp in ms, input_length the whole prompt)."""
    rows = []
    for spec in specs:
        for k, turn in enumerate(spec.turns):
            rows.append((turn.timestamp_s, _row(spec, k, turn)))
    rows.sort(key=lambda r: r[0])
    Path(path).write_text("".join(json.dumps(row) + "\n" for _, row in rows))


def _row(spec: SessionSpec, k: int, turn: TurnSpec) -> dict:
    if turn.hash_ids:
        return {"timestamp": turn.timestamp_s * 1e3, "input_length": turn.input_len,
                "output_length": turn.output_len, "hash_ids": list(turn.hash_ids)}  # fmt: skip
    row = {"session_id": spec.session_id, "turn": k, "timestamp": turn.timestamp_s,
           "input_length": turn.input_len, "output_length": turn.output_len}  # fmt: skip
    if k == 0 and spec.system_id is not None:
        row.update(system_id=spec.system_id, system_length=spec.system_len)
    if turn.think_time_s is not None:
        row["think_time"] = turn.think_time_s
    return row


def load_trace(path: str | Path, system_len: int = Conversations.system_len) -> list[SessionSpec]:
    """Sessions from a JSONL trace, starts shifted so the first is at 0, ordered by start.
    A line without session_id (every Mooncake-style line) is a one-turn session of its own;
    `system_len` is the length of a system prompt whose turn-0 line has no system_length."""
    turns: dict[str, dict[int, tuple[TurnSpec, dict]]] = {}
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            sid, k, turn = _parse(row, number)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{number}: a trace line is a JSON object with timestamp, input_length, "
                f"output_length and session_id + turn, or hash_ids ({e})"
            ) from e
        if k in turns.setdefault(sid, {}):
            raise ValueError(f"{path}:{number}: session {sid!r} has turn {k} twice")
        turns[sid][k] = (turn, row)
    if not turns:
        raise ValueError(f"{path}: the trace has no turns")
    specs = [_session(sid, by_turn, system_len, path) for sid, by_turn in turns.items()]
    shift = min(s.start_s for s in specs)
    specs = [s.retimed(offset=-shift) for s in specs]
    return sorted(specs, key=lambda s: s.start_s)


def _parse(row: dict, number: int) -> tuple[str, int, TurnSpec]:
    lengths = int(row["input_length"]), int(row["output_length"])
    if "hash_ids" in row:  # Mooncake: ms, the whole prompt as shared blocks
        hash_ids = tuple(int(h) for h in row["hash_ids"])
        return f"line-{number}", 0, TurnSpec(*lengths, float(row["timestamp"]) / 1e3, None,
                                             hash_ids)  # fmt: skip
    think = row.get("think_time")
    turn = TurnSpec(*lengths, float(row["timestamp"]), None if think is None else float(think))
    if "session_id" not in row:
        return f"line-{number}", 0, turn
    return str(row["session_id"]), int(row["turn"]), turn


def _session(sid: str, by_turn: dict, system_len: int, path) -> SessionSpec:
    if sorted(by_turn) != list(range(len(by_turn))):
        raise ValueError(f"{path}: session {sid!r} has turns {sorted(by_turn)}, not 0..n-1")
    first = by_turn[0][1]
    system_id = first.get("system_id")
    length = int(first.get("system_length", system_len)) if system_id is not None else 0
    system_id = None if system_id is None else int(system_id)
    return SessionSpec(sid, tuple(by_turn[k][0] for k in sorted(by_turn)), system_id, length)


# --- concrete prompts --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Session:
    """A spec made concrete: `prefix_ids` (the shared system prompt, or nothing) opens turn
    0; `new_ids[k]` is what turn k adds after the history. Turns are clipped so that every
    prompt plus its answer fits max_model_len."""

    session_id: str
    prefix_ids: list[int]
    turns: tuple[TurnSpec, ...]
    new_ids: tuple[list[int], ...]

    @property
    def prompt_lens(self) -> list[int]:
        """Each turn's whole prompt length (answers have exactly their output length)."""
        out, used = [], len(self.prefix_ids)
        for turn, ids in zip(self.turns, self.new_ids, strict=True):
            out.append(used + len(ids))
            used += len(ids) + turn.output_len
        return out


def build_sessions(
    specs: list[SessionSpec],
    vocab_size: int,
    max_model_len: int,
    seed: int = 0,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
) -> list[Session]:
    """Random token ids in [3, vocab) (bos/eos/pad sit at the bottom) for every spec. The
    same system id, or the same hash id, gives the same tokens in every session: that is
    the sharing the prefix caches can find. A session ends early at the first turn whose
    prompt plus answer would not fit max_model_len; turn 0 is shortened to fit instead."""
    tokens = _Tokens(vocab_size, seed, block_tokens)
    return [_build(spec, tokens, max_model_len) for spec in specs]


class _Tokens:
    def __init__(self, vocab_size: int, seed: int, block_tokens: int):
        self.vocab_size, self.seed, self.block_tokens = vocab_size, seed, block_tokens
        self.fresh = np.random.default_rng([seed, 3])
        self._shared: dict[tuple[int, int, int], list[int]] = {}

    def shared(self, kind: int, key: int, length: int) -> list[int]:
        """Tokens fixed by (seed, kind, key): a system prompt (kind 1) or a block (kind 2)."""
        if (kind, key, length) not in self._shared:
            rng = np.random.default_rng([self.seed, kind, key])
            self._shared[kind, key, length] = rng.integers(3, self.vocab_size, length).tolist()
        return self._shared[kind, key, length]

    def random(self, length: int) -> list[int]:
        return self.fresh.integers(3, self.vocab_size, length).tolist()

    def blocks(self, hash_ids: tuple[int, ...], length: int) -> list[int]:
        ids = [t for h in hash_ids for t in self.shared(2, h, self.block_tokens)][:length]
        return ids + self.random(length - len(ids))


def _build(spec: SessionSpec, tokens: _Tokens, max_model_len: int) -> Session:
    prefix = tokens.shared(1, spec.system_id, spec.system_len) if spec.system_len else []
    turns, new_ids, used = [], [], len(prefix)
    for k, turn in enumerate(spec.turns):
        if k == 0:
            n_out = min(turn.output_len, max_model_len - used - 1)
            if n_out < 1:
                raise ValueError(
                    f"session {spec.session_id!r}: a system prompt of {used} tokens leaves no "
                    f"room in max_model_len {max_model_len}"
                )
            n_in = min(turn.input_len, max_model_len - used - n_out)
            turn = dataclasses.replace(turn, input_len=n_in, output_len=n_out)
        elif used + turn.input_len + turn.output_len > max_model_len:
            break
        ids = tokens.blocks(turn.hash_ids, turn.input_len) if turn.hash_ids else None
        new_ids.append(ids if ids is not None else tokens.random(turn.input_len))
        turns.append(turn)
        used += turn.input_len + turn.output_len
    return Session(spec.session_id, prefix, tuple(turns), tuple(new_ids))


def single_turns(sessions: list[Session], request_rate: float, seed: int = 0) -> list[SessionSpec]:
    """The same prompts' lengths and answers as one-turn requests sharing nothing, arriving
    Poisson at `request_rate`: the control workload, where remembering prefixes cannot help."""
    pairs = [(n, t.output_len) for s in sessions for n, t in zip(s.prompt_lens, s.turns,
                                                                  strict=True)]  # fmt: skip
    arrivals = unit_arrivals(len(pairs), "poisson", seed=seed) / request_rate
    return [
        SessionSpec(f"r{i}", (TurnSpec(n_in, n_out, float(t)),))
        for i, ((n_in, n_out), t) in enumerate(zip(pairs, arrivals, strict=True))
    ]


# --- the runner --------------------------------------------------------------------------------


async def run_sessions(
    backend,
    sessions: list[Session],
    time_scale: float = 1.0,
    max_duration_s: float = 60.0,
    fixed_timing: bool = False,
) -> tuple[list[RequestRecord], float]:
    """Drive every session as its own task; returns a record per turn sent (in send order)
    and the run's duration. Sessions start at their turn-0 timestamps, those after
    `max_duration_s` not at all. Closed-loop, turn k+1 leaves its think time after answer k;
    at fixed timing it leaves at its timestamp, or as soon as answer k is in if that is later
    (the lateness is kept in send_delay_s). Timestamps and think times stretch by
    `time_scale` (an emulated cluster running that much slower). A request still running at
    2 x max_duration_s is cancelled and counted as an error; a failed turn ends its session.
    `backend.send` must fill record.output_ids (loadgen.GrpcBackend does)."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    pace = _Pace(start, time_scale, fixed_timing)
    tasks = [
        asyncio.create_task(_drive(backend, s, pace, records))
        for s in sessions
        if s.turns[0].timestamp_s * time_scale <= max_duration_s
    ]
    if tasks:
        remaining = 2 * max_duration_s - (time.perf_counter() - start)
        _, pending = await asyncio.wait(tasks, timeout=max(remaining, 1.0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records, time.perf_counter() - start


@dataclass(slots=True, frozen=True)
class _Pace:
    start: float  # perf_counter at the run's start
    time_scale: float
    fixed_timing: bool

    def due(self, turn: TurnSpec, previous: TurnSpec | None, answered: float | None) -> float:
        """When a turn should leave (perf_counter time)."""
        if previous is None or self.fixed_timing:
            return self.start + turn.timestamp_s * self.time_scale
        think = turn.think_time_s
        if think is None:
            think = max(0.0, turn.timestamp_s - previous.timestamp_s)
        return answered + think * self.time_scale


async def _drive(backend, session: Session, pace: _Pace, records: list[RequestRecord]) -> None:
    history, previous, answered = list(session.prefix_ids), None, None
    for k, (turn, new_ids) in enumerate(zip(session.turns, session.new_ids, strict=True)):
        due = pace.due(turn, previous, answered)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        prompt = history + new_ids
        record = RequestRecord(len(prompt), turn.output_len, due - pace.start)
        record.session_id, record.turn = session.session_id, k
        if answered is not None:  # late only for want of the answer (not timer slack)
            record.send_delay_s = max(0.0, answered - due)
        records.append(record)
        try:
            await backend.send(RequestPlan(prompt, turn.output_len, record.scheduled_s), record)
        except asyncio.CancelledError:
            record.error = _CANCELLED
            raise
        if not record.ok:
            return
        if len(record.output_ids) != record.num_output_tokens:
            record.error = "the backend did not return the answer's token ids"
            return
        history, previous, answered = prompt + record.output_ids, turn, time.perf_counter()
