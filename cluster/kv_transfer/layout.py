"""KV layout: the shape of one engine's paged KV pool as the transfer layer sees it, and the
rule for when a block read from one pool means the same thing in another.

The model runner keeps the pool as one block-major tensor

    kv_cache[num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]

so block i is the contiguous byte range [i * block_bytes, (i + 1) * block_bytes) from the
tensor's base, all layers included. A pull copies those bytes verbatim, which is only right
when both sides agree on every field that shapes them:

    must match (in compat_hash)   num_layers, num_kv_heads, head_dim, block_size, dtype,
                                  memory_layout, tp_size
    may differ                    device_type: UCX moves DRAM<->VRAM, the bytes are the same
    pairing, not layout           tp_rank: one instance's ranks share a hash (so the router
                                  can compare instances) but a pull is rank r <- rank r, so
                                  check_compatible also demands equal tp_rank

num_kv_heads is per rank (the tensor's own head dimension). tp_size is hashed because two
pools with equal per-rank heads but different TP hold different head shards per rank.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MEMORY_LAYOUTS = ("block_major",)
DEVICE_TYPES = ("cpu", "cuda")
_HASHED_FIELDS = (
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "block_size",
    "dtype",
    "memory_layout",
    "tp_size",
)
_CHECKED_FIELDS = (*_HASHED_FIELDS, "tp_rank")


class LayoutMismatchError(ValueError):
    """Two KV layouts whose blocks do not mean the same bytes."""


@dataclass(slots=True, frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    device_type: str
    tp_rank: int = 0
    tp_size: int = 1
    memory_layout: str = "block_major"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not a torch dtype name")
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"KVLayout.device_type must be one of {DEVICE_TYPES}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if self.memory_layout not in MEMORY_LAYOUTS:
            raise ValueError(f"KVLayout.memory_layout must be one of {MEMORY_LAYOUTS}")

    @classmethod
    def from_tensor(cls, kv_cache: torch.Tensor, tp_rank: int = 0, tp_size: int = 1) -> KVLayout:
        """The layout of an engine KV pool (see the module docstring for the shape)."""
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise ValueError(
                "expected kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, "
                f"head_dim], got shape {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous: a block is one byte range")
        _, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            dtype=str(kv_cache.dtype).removeprefix("torch."),
            device_type=kv_cache.device.type,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )

    @property
    def element_bytes(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def layer_bytes(self) -> int:
        """One layer's K and V of one block."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def block_bytes(self) -> int:
        """One block across all layers: the unit a pull moves."""
        return self.num_layers * self.layer_bytes

    @property
    def compat_hash(self) -> str:
        """Stable across processes and Python versions (unlike hash()): equal for every
        rank of every instance whose blocks can be pulled into each other."""
        canonical = ";".join(f"{name}={getattr(self, name)}" for name in _HASHED_FIELDS)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def check_compatible(self, remote: KVLayout) -> None:
        """Raise LayoutMismatchError naming every field that forbids pulling `remote`'s
        blocks into ours."""
        diffs = [
            f"{name}: local={getattr(self, name)!r} remote={getattr(remote, name)!r}"
            for name in _CHECKED_FIELDS
            if getattr(self, name) != getattr(remote, name)
        ]
        if diffs:
            raise LayoutMismatchError("incompatible KV layouts: " + "; ".join(diffs))
