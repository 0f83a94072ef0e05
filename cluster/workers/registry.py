"""The KV agent registry of a Ray cluster: one named actor that maps agent names to their
KVAgentInfo (kv_transfer/registry.py has the registry itself and its in-process form)."""

from __future__ import annotations

import ray

from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.registry import REGISTRY_ACTOR, AgentRegistry


class RayKVRegistry:
    """Client of the registry actor of the current Ray cluster (created on first use)."""

    def __init__(self, namespace: str = "pd-cluster"):
        actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(AgentRegistry)
        self._ray = ray
        self.actor = actor_cls.options(
            name=REGISTRY_ACTOR, namespace=namespace, get_if_exists=True, lifetime=None
        ).remote()

    def publish(self, info: KVAgentInfo) -> None:
        self._ray.get(self.actor.publish.remote(info))

    def lookup(self, agent_name: str, timeout_s: float = 10.0) -> KVAgentInfo:
        info = self._ray.get(self.actor.lookup.remote(agent_name), timeout=timeout_s)
        if info is None:
            raise KeyError(f"no KV agent named {agent_name!r} is registered")
        return info

    def remove(self, agent_name: str) -> None:
        self._ray.get(self.actor.remove.remote(agent_name))

    def names(self) -> list[str]:
        return self._ray.get(self.actor.names.remote())
