"""Keeping the ranks of a tensor-parallel instance in lockstep.

Every rank runs a whole engine (cluster/engine/parallel.py); the scheduler is deterministic,
so ranks that see the same requests in the same order, between the same steps, schedule the
same batches. Rank 0 (LeaderEngine) is the one the worker talks to: it records every call that
changes engine state and, right before each step, broadcasts the record over the instance's
process group; followers apply it and step too. Collectives then line up: broadcast, then the
forward pass's all-reduces, in the same order on every rank.

    rank 0   add_request ─ abort ─ …   step: broadcast([ops]) ─ forward ─ sample ─ outputs
    rank r                              follow: receive([ops]) ─ apply ─ forward ─ sample

Arrival times and sampling seeds are fixed by the leader before recording (a rank must not
read its own clock or draw its own seed). Only the colocated role replicates: disaggregated
tensor-parallel instances need each rank's KV moved to the matching ranks (not built).
"""

from __future__ import annotations

import dataclasses
import random
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
    """Rank 0 of a tensor-parallel instance."""

    def __init__(self, config: EngineConfig):
        if config.role != "colocated":
            raise ValueError(
                f"tensor-parallel {config.role} instances need KV re-sharding between pools, "
                "which this build does not have; use TP only for colocated instances"
            )
        super().__init__(config)
        self._ops: list[tuple] = []
        self._rng = random.Random(config.seed)

    def add_request(self, request_id, prompt, params=None, *, arrival_time=None, priority=0,
                    cache_salt=None) -> str:  # fmt: skip
        params = params or SamplingParams()
        if params.seed is None:  # every rank must draw the same tokens
            params = dataclasses.replace(params, seed=self._rng.randrange(2**63))
        arrival_time = time.time() if arrival_time is None else arrival_time
        kwargs = {"arrival_time": arrival_time, "priority": priority, "cache_salt": cache_salt}
        request_id = super().add_request(request_id, prompt, params, **kwargs)
        self._ops.append(("add_request", (request_id, prompt, params), kwargs))
        return request_id

    def abort(self, request_id: str) -> bool:
        found = super().abort(request_id)
        self._ops.append(("abort", (request_id,), {}))
        return found

    def step(self):
        ops, self._ops = self._ops, []
        _broadcast(ops)
        return super().step()

    def stop_followers(self) -> None:
        _broadcast(_STOP)


def follow(engine: LLMEngine) -> None:
    """A follower rank's loop: apply the leader's calls, step as it steps, until it stops."""
    while True:
        ops = _receive()
        if ops == _STOP:
            return
        for name, args, kwargs in ops:
            getattr(engine, name)(*args, **kwargs)
        engine.step()
