"""Parallelism inside one instance: its ranks' process groups, how each weight is split among
tensor-parallel ranks (Megatron-style, as vLLM does), and how pipeline stages hand activations
on.

An instance of TP x PP ranks is one process group of tp * pp ranks; rank g is tensor-parallel
rank g % tp of pipeline stage g // tp. Every rank runs the same engine on the same requests
(the scheduler is deterministic; cluster/engine/replicated.py keeps them fed), so their
schedules agree.

Tensor parallelism (ranks of one stage, over the stage's own group):

    embed_tokens   vocab-parallel: rank r holds rows [r·V/tp, (r+1)·V/tp); ids outside give
                   zeros; an all-reduce sums the ranks' rows into the embedding
    qkv_proj       column-parallel by heads: rank r computes its num_heads/tp query heads and
                   its KV heads (num_kv_heads/tp, or one replicated head when kv heads < tp)
    o_proj         row-parallel: each rank multiplies its heads' slice; all-reduce
    gate_up_proj   column-parallel: rank r's slice of gate and of up
    down_proj      row-parallel; all-reduce
    lm_head        vocab-parallel: each rank's logits for its rows; all-gather

Biases of row-parallel layers are added on rank 0 only (the all-reduce would add them tp
times).

Pipeline parallelism: stage s holds layers [s·L/pp, (s+1)·L/pp) and their KV; the first stage
also the embedding, the last the final norm and the head. A step's batch is cut into
micro-batches by request: stage s receives micro-batch k's hidden states from stage s-1 (same
TP rank), runs its layers, sends them on without waiting, and starts on k+1 while s+1 works on
k. The last stage samples and broadcasts the tokens to every rank.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # the stage's process group; None: the default (whole instance)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
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
        """[start, end) of the KV heads this rank holds."""
        return kv_head_range(self.rank, self.size, num_kv_heads)


def kv_head_range(tp_rank: int, tp_size: int, num_kv_heads: int) -> tuple[int, int]:
    """[start, end) of the KV heads TP rank `tp_rank` holds: its share, or the one head its
    query heads use when there are fewer KV heads than ranks (replicated)."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(
                f"{num_kv_heads} KV heads do not split over tensor_parallel_size={tp_size}"
            )
        share = num_kv_heads // tp_size
        return tp_rank * share, (tp_rank + 1) * share
    if tp_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp_size} is not a multiple of num_kv_heads={num_kv_heads}"
        )
    head = tp_rank * num_kv_heads // tp_size
    return head, head + 1


def check_parallel(model, tp_size: int, pp_size: int) -> None:
    """Raise ValueError, saying which sizes would do, unless a `tp_size` x `pp_size` instance
    can hold `model` (a ModelConfig): TP divides the attention heads and the MLP width and
    splits or replicates the KV heads; PP has a layer per stage."""
    fits = [
        t
        for t in range(1, model.num_heads + 1)
        if model.num_heads % t == 0
        and model.intermediate_size % t == 0
        and (model.num_kv_heads % t == 0 or t % model.num_kv_heads == 0)
    ]
    if tp_size not in fits:
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not fit the model ({model.num_heads} "
            f"attention heads, {model.num_kv_heads} KV heads, MLP width "
            f"{model.intermediate_size}): use one of {fits}"
        )
    if pp_size > model.num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {model.num_layers} layers"
        )


def layer_range(pp_rank: int, pp_size: int, num_layers: int) -> tuple[int, int]:
    """[start, end) of the layers pipeline stage `pp_rank` holds (as even as they split)."""
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} layers"
        )
    return pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size


@dataclass(frozen=True, slots=True)
class PPStage:
    rank: int = 0  # stage index
    size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> tuple[int, int]:
        return layer_range(self.rank, self.size, num_layers)

    def _peer(self, stage: int) -> int:
        return stage * self.tp_size + self.tp_rank

    def send(self, x: torch.Tensor):
        """Hand hidden states to the next stage without waiting; wait() the returned work."""
        return dist.isend(x.contiguous(), self._peer(self.rank + 1))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, self._peer(self.rank - 1))
        return x

    def broadcast_from_last(self, obj):
        """`obj` of the last stage's first rank, on every rank of the instance."""
        if self.size == 1:
            return obj
        src = self._peer(self.size - 1) - self.tp_rank
        box = [obj if self.is_last else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def init_parallel(
    tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, init_method: str, device,
    timeout_s: float = 300.0,
) -> tuple[TPGroup, PPStage]:  # fmt: skip
    """Join the instance's process group (gloo on CPU, NCCL on CUDA) once per process, and
    the stage's tensor-parallel subgroup when there are several stages. A collective that
    waits more than `timeout_s` for a rank raises (gloo; NCCL's watchdog aborts the process)."""
    world = tp_size * pp_size
    timeout = datetime.timedelta(seconds=timeout_s)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, timeout=timeout,
                                rank=pp_rank * tp_size + tp_rank, world_size=world)  # fmt: skip
    group = None
    if tp_size > 1 and pp_size > 1:  # every rank creates every subgroup, in the same order
        for stage in range(pp_size):
            g = dist.new_group([stage * tp_size + r for r in range(tp_size)], timeout=timeout)
            if stage == pp_rank:
                group = g
    return TPGroup(tp_rank, tp_size, group), PPStage(pp_rank, pp_size, tp_rank, tp_size)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a rendezvous address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_local_ranks(target, world: int, args: tuple = (), timeout_s: float = 600.0) -> list:
    """Run `target(rank, init_method, *args)` in one spawned process per rank of a local
    instance (rendezvous on a free loopback port); its return values, in rank order. Raises
    RuntimeError with every rank's error (each is reported rather than left to hang the rest
    of the caller). For tests and benchmarks; served instances use Ray actors (ranks.py)."""
    ctx = mp.get_context("spawn")
    queue, init_method = ctx.Queue(), f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_entry, args=(target, r, init_method, args, queue))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [f"rank {rank}: {error}" for rank, _, error in results if error]
    if errors:
        raise RuntimeError(f"{world}-rank run failed: {errors}")
    return [value for _, value, _ in results]


def _rank_entry(target, rank: int, init_method: str, args: tuple, queue) -> None:
    try:
        queue.put((rank, target(rank, init_method, *args), None))
    except Exception as e:  # noqa: BLE001 - report to the parent, do not hang it
        queue.put((rank, None, repr(e)))


def world_min(value: int, device) -> int:
    """The smallest `value` over the instance's ranks (ranks must agree on the block count)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
