"""Keeping the ranks of a tensor/pipeline-parallel instance in lockstep.

Every rank runs a whole engine (cluster/engine/parallel.py); the scheduler is deterministic,
so ranks that see the same requests in the same order, between the same steps, schedule the
same batches and hand out the same block ids. Rank 0 (LeaderEngine) is the one the worker
talks to: it records every call that changes engine state and, right before each step,
broadcasts the record over the instance's process group; followers apply it and step too.
Collectives then line up: broadcast, then the forward pass's all-reduces, sends and receives,
in the same order on every rank.

    rank 0   add_request ─ abort ─ …   step: broadcast(ops, step) ─ forward ─ sample ─ outputs
    rank r                              follow: receive(ops, step) ─ apply ─ forward ─ …

Arrival times and sampling seeds are fixed by the leader before recording (a rank must not
read its own clock or draw its own seed). In the decode role, `add_remote_request` reserves
the same blocks on every rank, so each rank can pull its share of the prompt's KV into them
(kv_transfer/connector.py) before `commit_remote` starts the decode everywhere.

An idle leader still broadcasts now and then (`heartbeat`, no step, then a barrier):
followers blocked in the broadcast would otherwise hit the process group's timeout
(`EngineConfig.dist_timeout_s`), and a rank that died or hangs while idle is found then (the
barrier fails, at the latest after that timeout) rather than on the next request.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import torch.distributed as dist

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams

_STOP = "stop"


def _broadcast(message) -> None:
    dist.broadcast_object_list([message], src=0)


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LeaderEngine(LLMEngine):
    """Rank 0 of a parallel instance."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._ops: list[tuple] = []
        self._rng = random.Random(config.seed)

    def _fix(self, params: SamplingParams | None, arrival_time: float | None):
        params = params or SamplingParams()
        if params.seed is None:  # every rank must draw the same tokens
            params = dataclasses.replace(params, seed=self._rng.randrange(2**63))
        return params, time.time() if arrival_time is None else arrival_time

    def add_request(self, request_id, prompt, params=None, *, arrival_time=None, priority=0,
                    cache_salt=None, resume=None) -> str:  # fmt: skip
        params, arrival_time = self._fix(params, arrival_time)
        kwargs = {"arrival_time": arrival_time, "priority": priority, "cache_salt": cache_salt,
                  "resume": resume}  # fmt: skip
        request_id = super().add_request(request_id, prompt, params, **kwargs)
        self._ops.append(("add_request", (request_id, prompt, params), kwargs))
        return request_id

    def add_remote_request(self, request_id, prompt, params=None, *, arrival_time=None,
                           priority=0, cache_salt=None, resume=None):  # fmt: skip
        params, arrival_time = self._fix(params, arrival_time)
        kwargs = {"arrival_time": arrival_time, "priority": priority, "cache_salt": cache_salt,
                  "resume": resume}  # fmt: skip
        block_ids = super().add_remote_request(request_id, prompt, params, **kwargs)
        if block_ids is not None:
            self._ops.append(("add_remote_request", (request_id, prompt, params), kwargs))
        return block_ids

    def commit_remote(self, request_id, first_token_id, first_logprob=None):
        out = super().commit_remote(request_id, first_token_id, first_logprob)
        self._ops.append(("commit_remote", (request_id, first_token_id, first_logprob), {}))
        return out

    def abort(self, request_id: str) -> bool:
        found = super().abort(request_id)
        self._ops.append(("abort", (request_id,), {}))
        return found

    def release(self, request_id: str) -> None:
        super().release(request_id)
        self._ops.append(("release", (request_id,), {}))

    num_broadcasts = 0  # messages sent; a follower that applied as many is in step

    def step(self):
        ops, self._ops = self._ops, []
        _broadcast((ops, True))
        self.num_broadcasts += 1
        return super().step()

    def heartbeat(self) -> int:
        """Apply pending calls on every rank without a step (call between steps), then meet
        every rank at a barrier: a rank that died or hangs fails it (a broadcast alone can
        land in a socket buffer and return). Returns the number of messages a follower in
        step with us has applied."""
        ops, self._ops = self._ops, []
        _broadcast((ops, False))
        self.num_broadcasts += 1
        dist.barrier()
        return self.num_broadcasts

    def stop_followers(self) -> None:
        _broadcast(_STOP)


class Progress:
    """How many leader messages a follower has applied, under the lock it applies them in
    (a check of the replica waits for a count, then reads it between messages)."""

    def __init__(self) -> None:
        self.applied = 0
        self.cond = threading.Condition()

    def wait_for(self, count: int, timeout_s: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.applied >= count, timeout_s):
                raise TimeoutError(f"follower applied {self.applied} of {count} messages")


def follow(engine: LLMEngine, progress: Progress | None = None) -> None:
    """A follower rank's loop: apply the leader's calls, step as it steps, until it stops."""
    progress = progress or Progress()
    while True:
        message = _receive()
        if message == _STOP:
            return
        ops, step = message
        with progress.cond:
            for name, args, kwargs in ops:
                getattr(engine, name)(*args, **kwargs)
            if step:
                engine.step()
            progress.applied += 1
            progress.cond.notify_all()
        if not step:
            dist.barrier()  # the leader's heartbeat
