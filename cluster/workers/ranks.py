"""The follower ranks of a tensor/pipeline-parallel instance as Ray actors.

An instance of TP x PP ranks runs rank 0 inside its worker actor and ranks 1.. as
`RankFollower` actors. They are placed in the instance's placement group, one bundle per rank
(deployment.py makes it, STRICT_PACK: one node, where NVLink and the gloo/NCCL group live),
or, when the worker was started without one, pinned to the worker's node. The worker starts
them before building its own engine (every rank blocks in the process group's rendezvous
until all joined), then sets them following it (cluster/engine/replicated.py).

In the prefill and decode roles each rank also owns a NIXL agent over its own KV pool: KV
moves rank to rank, re-sharded when the two instances' layouts differ
(kv_transfer/reshard.py), never gathered through rank 0. A decode follower's `pull` runs on
the actor's own thread while its engine keeps following the leader.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from cluster.engine.config import EngineConfig, model_identity
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.parallel import free_port
from cluster.engine.replicated import Progress, follow
from cluster.kv_transfer.agent import KVTransferError, NixlKVAgent
from cluster.kv_transfer.connector import pull_from_ranks, release_reads

RAY_NAMESPACE = "pd-cluster"  # every named actor of a deployment lives here


def agent_name(instance_id: str, rank: int) -> str:
    """NIXL agent name of a rank: the instance id for rank 0 (as for one-rank instances)."""
    return instance_id if rank == 0 else f"{instance_id}/rank{rank}"


def actor_name(instance_id: str, rank: int) -> str:
    return f"pd-cluster-{instance_id}-rank{rank}"


def agent_kwargs(llm) -> dict:
    """Which part of the model's KV an engine's pool holds, for NixlKVAgent."""
    c, m = llm.config, llm.model_config
    if c.emulation is not None:  # one process holding a stand-in block (engine/emulation.py)
        return {"model_layers": 1, "model_kv_heads": 1, "model_id": f"emulated:{c.emulation.model}"}
    return {
        "tp_rank": c.tensor_parallel_rank,
        "tp_size": c.tensor_parallel_size,
        "pp_rank": c.pipeline_parallel_rank,
        "pp_size": c.pipeline_parallel_size,
        "model_layers": m.num_layers,
        "model_kv_heads": m.num_kv_heads,
        "model_id": model_identity(m.path),
    }


class RankFollower:
    """One follower rank: an engine that replays the leader's calls and steps with it, and in
    the prefill/decode roles the NIXL agent over its KV pool."""

    def __init__(self, config: EngineConfig, instance_id: str):
        self.llm = LLMEngine(config)
        self.agent = None
        if config.role != "colocated":
            name = agent_name(instance_id, config.global_rank)
            self.agent = NixlKVAgent(name, self.llm.runner.kv_cache, **agent_kwargs(self.llm))
        self._stuck: dict[str, list] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.progress = Progress()
        self._thread = threading.Thread(target=follow, args=(self.llm, self.progress),
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def agent_info(self):
        return self.agent.info()

    def pid(self) -> int:
        """This rank's process id (`cluster bench chaos` kills ranks too)."""
        return os.getpid()

    def pull(self, infos: list, remote_ids: list[int], local_ids: list[int], seconds: float,
             request_id: str) -> str:  # fmt: skip
        """This rank's share of a KV pull (kv_transfer/connector.py: pull_from_ranks):
        DONE, ERR, TIMEOUT, or STUCK (a READ NIXL would not release: reap() retries)."""
        result = pull_from_ranks(
            self.agent, infos, remote_ids, local_ids, time.monotonic() + seconds
        )
        if result.stuck:
            self._stuck[request_id] = result.stuck
            return "STUCK"
        return result.state

    def reap(self, request_id: str) -> bool:
        """Retry releasing a stuck pull's READs; True once none is left."""
        held = release_reads(self.agent, self._stuck.pop(request_id, []))
        if held:
            self._stuck[request_id] = held
        return not held

    def check_integrity(self, num_messages: int) -> tuple[int, int]:
        """(free blocks, all blocks) of this rank's replica, checked once it has applied the
        leader's first `num_messages` messages and while it applies no other."""
        self.progress.wait_for(num_messages, timeout_s=30)
        with self.progress.cond:
            self.llm.check_integrity()
            return self.llm.num_free_blocks, self.llm.block_manager.num_blocks


def start_followers(config: EngineConfig, instance_id: str) -> tuple[EngineConfig, list]:
    """Launch ranks 1..N-1 in this actor's placement group (bundle i for rank i) or on this
    node; returns rank 0's config (its rendezvous address filled in) and the actors."""
    if not ray.is_initialized():
        raise ValueError(
            f"a {config.tensor_parallel_size} x {config.pipeline_parallel_size} (TP x PP) "
            "instance runs its ranks as Ray actors: start it in a Ray cluster (cluster serve, "
            "launch.start_ray), not in-process"
        )
    host = ray.util.get_node_ip_address()
    address = f"tcp://{host}:{free_port('0.0.0.0')}"
    leader = dataclasses.replace(
        config, dist_init_method=address, tensor_parallel_rank=0, pipeline_parallel_rank=0
    )
    pg = ray.util.get_current_placement_group()
    if pg is not None and len(pg.bundle_specs) < config.world_size:
        pg = None
    gpu = 1 if config.device.startswith("cuda") else 0
    followers = []
    for rank in range(1, config.world_size):
        if pg is not None:
            where = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        else:
            where = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        tp = config.tensor_parallel_size
        rank_config = dataclasses.replace(
            leader, tensor_parallel_rank=rank % tp, pipeline_parallel_rank=rank // tp
        )
        actor = ray.remote(RankFollower).options(
            name=actor_name(instance_id, rank),
            namespace=RAY_NAMESPACE,
            num_cpus=0,
            num_gpus=gpu,
            scheduling_strategy=where,
            max_restarts=0,  # a lost rank ends the instance; its worker restarts them all
        )
        followers.append(actor.remote(rank_config, instance_id))
    return leader, followers


class RankGroup:
    """An instance's follower ranks, as KVReceiver.read_sharded drives them: each pulls its
    own share of a re-sharded pull on its own thread while rank 0 pulls ours."""

    def __init__(self, followers: list):
        self.followers = followers

    def start_pull(self, infos: list, remote_ids: list[int], local_ids: list[int],
                   seconds: float, request_id: str):  # fmt: skip
        """Start every follower's share; returns wait(timeout) -> (states, stuck READs)."""
        refs = [f.pull.remote(infos, remote_ids, local_ids, seconds, request_id)
                for f in self.followers]  # fmt: skip

        def wait(timeout_s: float) -> tuple[list[str], list]:
            try:
                states = ray.get(refs, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a lost rank of ours: the instance is failing
                return ["ERR"], []
            stuck = [FollowerStuck(f, request_id)
                     for f, state in zip(self.followers, states, strict=True)
                     if state == "STUCK"]  # fmt: skip
            return states, stuck

        return wait


@dataclass(slots=True)
class FollowerStuck:
    """A follower rank's READs that would not release: release() asks the rank again."""

    follower: object  # RankFollower actor handle
    request_id: str

    def release(self) -> None:
        try:
            released = ray.get(self.follower.reap.remote(self.request_id), timeout=5.0)
        except Exception:  # noqa: BLE001 - the rank is gone: so is whatever it would write
            released = True
        if not released:
            raise KVTransferError(f"{self.request_id!r}: a follower rank still holds a READ")
