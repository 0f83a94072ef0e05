"""Tensor parallelism inside one instance: the process group of its ranks and how each weight
is split among them (Megatron-style, as vLLM does).

    embed_tokens   vocab-parallel: rank r holds rows [r·V/tp, (r+1)·V/tp); ids outside give
                   zeros; an all-reduce sums the ranks' rows into the embedding
    qkv_proj       column-parallel by heads: rank r computes its num_heads/tp query heads and
                   its KV heads (num_kv_heads/tp, or one replicated head when kv heads < tp)
    o_proj         row-parallel: each rank multiplies its heads' slice; all-reduce
    gate_up_proj   column-parallel: rank r's slice of gate and of up
    down_proj      row-parallel; all-reduce
    lm_head        vocab-parallel: each rank's logits for its rows; all-gather

Every rank runs the same engine on the same requests (the scheduler is deterministic), so the
ranks' schedules agree and, with gathered logits, their sampled tokens too. Biases of
row-parallel layers are added on rank 0 only (the all-reduce would add them tp times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def split(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's share of `total` (which tp must divide)."""
        if total % self.size:
            raise ValueError(f"{total} does not split over tensor_parallel_size={self.size}")
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    def padded_split(self, total: int) -> tuple[int, int, int]:
        """(start, end, share) with share = ceil(total / tp); the last ranks may hold fewer
        real rows than share (the vocabulary need not divide by tp)."""
        share = -(-total // self.size)
        start = min(self.rank * share, total)
        return start, min(start + share, total), share

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """[start, end) of the KV heads this rank holds: its share, or the one head its query
        heads use when there are fewer KV heads than ranks (replicated)."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads)
        if self.size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size={self.size} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        head = self.rank * num_kv_heads // self.size
        return head, head + 1


def init_tp(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """Join the instance's process group (gloo on CPU, NCCL on CUDA) once per process."""
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    return TPGroup(rank, size)
