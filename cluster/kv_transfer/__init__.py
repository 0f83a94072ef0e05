"""KV transfer: moves finished prefill KV blocks to decode ranks over NIXL (see docs/kv-transfer.md,
"The path of one request"). layout.py says when two pools' blocks are interchangeable,
descriptors.py turns a pull into NIXL descriptors, agent.py wraps the NIXL agent, lease.py
bounds how long a holder pins blocks for a puller.

The NIXL-free parts import eagerly; NixlKVAgent imports NIXL on first use, so the router and
planner can handle layouts and agent infos on hosts without NIXL.
"""

from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.layout import KVLayout, LayoutMismatchError
from cluster.kv_transfer.lease import LeaseTable

_AGENT_NAMES = ("NixlKVAgent", "TransferHandle", "KVTransferError")

__all__ = ["KVAgentInfo", "KVLayout", "LayoutMismatchError", "LeaseTable", *_AGENT_NAMES]


def __getattr__(name: str):
    if name in _AGENT_NAMES:
        from cluster.kv_transfer import agent

        return getattr(agent, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
