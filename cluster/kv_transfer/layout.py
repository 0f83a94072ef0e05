"""KV layout: the shape of one engine rank's paged KV pool as the transfer layer sees it, which
part of the model's KV it holds, and the rule for when blocks of one pool can be read into
another.

The model runner keeps a rank's pool as one block-major, then head-major tensor:

    kv_cache[num_blocks, num_kv_heads, num_layers, 2 (K, V), block_size, head_dim]

so block i is the contiguous byte range [i * block_bytes, (i + 1) * block_bytes) from the
tensor's base, all of the rank's layers included; heads [h0, h1) of a block (all layers) are
one contiguous range, and so are layers [l0, l1) of one head of a block. A rank of a
tensor/pipeline-parallel instance holds the layers of its stage and the KV heads of its TP
rank (parallel.py says which):

    must match (in compat_hash)   model_layers, model_kv_heads, head_dim, block_size, dtype,
                                  memory_layout: then any rank's blocks can be re-sharded
                                  into any other's (kv_transfer/reshard.py)
    may differ                    tp/pp sizes and ranks (which heads and layers a pool
                                  holds); device_type: UCX moves DRAM<->VRAM, the bytes are
                                  the same
    whole-block pulls             need the same shard on both sides (same_shard): block i
                                  then means the same bytes in both pools
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from cluster.engine.parallel import kv_head_range, layer_range

MEMORY_LAYOUTS = ("block_head_major",)
DEVICE_TYPES = ("cpu", "cuda")
_HASHED_FIELDS = (
    "model_layers",
    "model_kv_heads",
    "head_dim",
    "block_size",
    "dtype",
    "memory_layout",
    "model_id",
)
_SHARD_FIELDS = ("tp_size", "tp_rank", "pp_size", "pp_rank")


class LayoutMismatchError(ValueError):
    """Two KV layouts whose blocks do not mean the same bytes."""


@dataclass(slots=True, frozen=True)
class KVLayout:
    num_layers: int  # in this pool (its stage's)
    num_kv_heads: int  # in this pool (its TP rank's)
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    device_type: str
    tp_rank: int = 0
    tp_size: int = 1
    memory_layout: str = "block_head_major"
    pp_rank: int = 0
    pp_size: int = 1
    model_layers: int = 0  # the model's; 0: num_layers (one stage)
    model_kv_heads: int = 0  # the model's; 0: num_kv_heads * tp_size (no replication)
    # Which weights filled the KV (engine.config.model_identity): same shapes of different
    # models must never exchange KV. "": unknown (tools, tests of the layout alone).
    model_id: str = ""

    def __post_init__(self) -> None:
        if not self.model_layers:
            object.__setattr__(self, "model_layers", self.num_layers * self.pp_size)
        if not self.model_kv_heads:
            object.__setattr__(self, "model_kv_heads", self.num_kv_heads * self.tp_size)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size",
                     "pp_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not a torch dtype name")
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"KVLayout.device_type must be one of {DEVICE_TYPES}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"KVLayout.pp_rank {self.pp_rank} outside [0, {self.pp_size})")
        if self.memory_layout not in MEMORY_LAYOUTS:
            raise ValueError(f"KVLayout.memory_layout must be one of {MEMORY_LAYOUTS}")
        l0, l1 = self.layer_range
        h0, h1 = self.head_range
        if (l1 - l0, h1 - h0) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"KVLayout: pp rank {self.pp_rank}/{self.pp_size} of {self.model_layers} layers "
                f"and tp rank {self.tp_rank}/{self.tp_size} of {self.model_kv_heads} KV heads "
                f"hold {l1 - l0} layers and {h1 - h0} heads, not {self.num_layers} and "
                f"{self.num_kv_heads}"
            )

    @classmethod
    def from_tensor(
        cls,
        kv_cache: torch.Tensor,
        tp_rank: int = 0,
        tp_size: int = 1,
        pp_rank: int = 0,
        pp_size: int = 1,
        model_layers: int = 0,
        model_kv_heads: int = 0,
        model_id: str = "",
    ) -> KVLayout:
        """The layout of an engine rank's KV pool (see the module docstring for the shape)."""
        if kv_cache.dim() != 6 or kv_cache.shape[3] != 2:
            raise ValueError(
                "expected kv_cache[num_blocks, num_kv_heads, num_layers, 2, block_size, "
                f"head_dim], got shape {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous: a block is one byte range")
        _, num_kv_heads, num_layers, _, block_size, head_dim = kv_cache.shape
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            dtype=str(kv_cache.dtype).removeprefix("torch."),
            device_type=kv_cache.device.type,
            tp_rank=tp_rank,
            tp_size=tp_size,
            pp_rank=pp_rank,
            pp_size=pp_size,
            model_layers=model_layers,
            model_kv_heads=model_kv_heads,
            model_id=model_id,
        )

    @property
    def layer_range(self) -> tuple[int, int]:
        """[start, end) of the model's layers in this pool."""
        return layer_range(self.pp_rank, self.pp_size, self.model_layers)

    @property
    def head_range(self) -> tuple[int, int]:
        """[start, end) of the model's KV heads in this pool."""
        return kv_head_range(self.tp_rank, self.tp_size, self.model_kv_heads)

    @property
    def element_bytes(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def tile_bytes(self) -> int:
        """One head's K (or V) of one layer of one block: the contiguous unit."""
        return self.block_size * self.head_dim * self.element_bytes

    @property
    def head_stride(self) -> int:
        """One head of one block, all of the pool's layers (K and V)."""
        return self.num_layers * 2 * self.tile_bytes

    @property
    def layer_bytes(self) -> int:
        """One layer's K and V of one block, all heads (num_kv_heads ranges of 2 tiles)."""
        return 2 * self.num_kv_heads * self.tile_bytes

    @property
    def block_bytes(self) -> int:
        """One block across all heads and layers: the unit a whole-block pull moves."""
        return self.num_kv_heads * self.head_stride

    @property
    def compat_hash(self) -> str:
        """Stable across processes and Python versions (unlike hash()): equal for every
        rank of every instance of the same model whose KV can be moved into each other."""
        canonical = ";".join(f"{name}={getattr(self, name)}" for name in _HASHED_FIELDS)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def check_compatible(self, remote: KVLayout) -> None:
        """Raise LayoutMismatchError naming every field that forbids moving `remote`'s KV
        into ours (re-sharded if need be)."""
        diffs = [
            f"{name}: local={getattr(self, name)!r} remote={getattr(remote, name)!r}"
            for name in _HASHED_FIELDS
            if getattr(self, name) != getattr(remote, name)
        ]
        if diffs:
            raise LayoutMismatchError("incompatible KV layouts: " + "; ".join(diffs))

    def same_shard(self, remote: KVLayout) -> bool:
        """True when both pools hold the same layers and heads: block i of one is block i of
        the other, byte for byte."""
        return all(getattr(self, f) == getattr(remote, f) for f in _SHARD_FIELDS)
