"""KV agent info: what a holder of KV blocks (a prefill rank) publishes so that a puller (a
decode rank) can read them: its NIXL agent metadata plus where its KV pool lives in its own
address space and how that pool is laid out.

Plain picklable data, importable without NIXL, so the router and Ray can pass it around.
A holder that restarts publishes new metadata and a new base address under the same name;
pullers notice the metadata changed and re-add it (see NixlKVAgent.add_remote).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.kv_transfer.layout import KVLayout


@dataclass(slots=True, frozen=True)
class KVAgentInfo:
    agent_name: str
    metadata: bytes  # nixl_agent.get_agent_metadata(): connection info + registered memory
    base_addr: int  # address of block 0 in the holder's process (or on its device)
    num_blocks: int
    layout: KVLayout
    device_id: int = 0  # CUDA device index for VRAM; 0 for DRAM

    def __post_init__(self) -> None:
        if not self.agent_name:
            raise ValueError("KVAgentInfo.agent_name must be non-empty")
        if not self.metadata:
            raise ValueError("KVAgentInfo.metadata must be non-empty")
        if self.num_blocks < 1:
            raise ValueError(f"KVAgentInfo.num_blocks must be >= 1, got {self.num_blocks}")

    @property
    def mem_type(self) -> str:
        """NIXL's name for the memory the pool lives in."""
        return "VRAM" if self.layout.device_type == "cuda" else "DRAM"
