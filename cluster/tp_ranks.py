"""The follower ranks of a tensor-parallel instance as Ray actors, kept on the leader's node (a
tensor-parallel group never spans nodes). The leader's worker starts them before building its
own engine — every rank's engine blocks in the process group's rendezvous until all joined —
then sets them following it (cluster/engine/replicated.py)."""

from __future__ import annotations

import dataclasses
import socket
import threading

from cluster.engine.config import EngineConfig


class TPFollower:
    """One follower rank: an engine that replays the leader's calls and steps with it."""

    def __init__(self, config: EngineConfig):
        from cluster.engine.llm_engine import LLMEngine

        self.llm = LLMEngine(config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from cluster.engine.replicated import follow

        self._thread = threading.Thread(target=follow, args=(self.llm,), daemon=True)
        self._thread.start()

    def check_integrity(self) -> tuple[int, int]:
        return self.llm.num_free_blocks, self.llm.block_manager.num_blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def start_followers(config: EngineConfig) -> tuple[EngineConfig, list]:
    """Launch ranks 1..N-1 on this node; returns rank 0's config (its rendezvous address
    filled in) and the follower actor handles."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    address = f"tcp://{host}:{_free_port()}"
    leader = dataclasses.replace(config, dist_init_method=address, tensor_parallel_rank=0)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    gpu = 1 if config.device.startswith("cuda") else 0
    actor = ray.remote(TPFollower).options(num_cpus=0, num_gpus=gpu, scheduling_strategy=here)
    followers = [
        actor.remote(dataclasses.replace(leader, tensor_parallel_rank=rank))
        for rank in range(1, config.tensor_parallel_size)
    ]
    return leader, followers
