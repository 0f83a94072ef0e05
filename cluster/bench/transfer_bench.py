"""`cluster bench transfer`: how fast one NixlKVAgent pulls KV blocks from another process,
against a plain memcpy of the same bytes in the same run.

Two Ray actors each hold an engine-shaped KV pool (kv_transfer/layout.py) behind a
NixlKVAgent: the holder plays the prefill rank, the puller the decode rank. For every point
of a grid of (total bytes, blocks per pull) the puller reads a scattered, shuffled set of the
holder's blocks into a scattered, shuffled set of its own, so descriptor merging almost never
applies and a pull of k blocks is ~k descriptors; the largest size is also pulled as one
contiguous run (one descriptor). Pools have twice the blocks a pull needs, so ids scatter.

All timing happens inside the puller, from read_blocks() to poll() == "DONE" (release not
included); Ray only carries the samples back. The first pulls of each point, which include
UCX's endpoint wireup, are warm-up and not timed. The baseline is `dst.copy_(src)` of the
same number of bytes between two preallocated tensors in the puller, on one thread (NIXL's
CPU path is one process_vm_readv per descriptor on the puller's thread, so a one-thread copy
is the like-for-like ceiling), timed right after every pull: on a shared host both halves of
the ratio then see the same neighbours.

fixed_cost_us is measured once, as the median pull of one 4 KiB block, and repeated in every
row; the bytes of such a pull take well under a microsecond to copy, so it is the per-pull
overhead (post, completion, flush round trip to the holder) with the handshake excluded.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.bench.common import int_list, report, resolve

KiB, MiB = 1 << 10, 1 << 20
MIN_BLOCK_BYTES = 4 * KiB  # below this a "block" is smaller than any real engine's
HEAD_DIM, MAX_KV_HEADS = 128, 8
FIXED_COST_BLOCK_BYTES = 4 * KiB
MEMCPY_THREADS = 1

# Option defaults, and what --quick replaces; an option given on the command line wins.
DEFAULTS = {
    "sizes": tuple(64 * KiB * 4**i for i in range(7)),  # 64 KiB ... 256 MiB
    "block_counts": (1, 16, 256, 4096),
    "min_time_s": 0.2,
    "min_reps": 5,
    "max_reps": 1000,
}
QUICK = {
    "sizes": (64 * KiB, 1 * MiB),
    "block_counts": (1, 16),
    "min_time_s": 0.02,
    "min_reps": 3,
    "max_reps": 50,
}
NUM_WARMUP = 3


@dataclass(slots=True, frozen=True)
class Repeats:
    """Time at least min_reps samples and at least min_time_s, but never more than max_reps."""

    min_time_s: float
    min_reps: int
    max_reps: int
    num_warmup: int = NUM_WARMUP

    def __post_init__(self) -> None:
        if not 1 <= self.min_reps <= self.max_reps:
            raise ValueError(
                f"need 1 <= min_reps <= max_reps, got {self.min_reps}, {self.max_reps}"
            )


@dataclass(slots=True, frozen=True)
class TransferPoint:
    """One pull: total_bytes in num_blocks equal blocks, scattered or one contiguous run."""

    total_bytes: int
    num_blocks: int
    is_contiguous: bool = False

    def __post_init__(self) -> None:
        if self.total_bytes % self.num_blocks:
            raise ValueError(f"{self.total_bytes} bytes do not split into {self.num_blocks} blocks")

    @property
    def block_bytes(self) -> int:
        return self.total_bytes // self.num_blocks

    @property
    def num_pool_blocks(self) -> int:
        return 2 * self.num_blocks

    @property
    def pattern(self) -> str:
        return "contiguous" if self.is_contiguous else "scattered"

    def block_ids(self, seed: int) -> tuple[list[int], list[int]]:
        """(remote ids, local ids); scattered ids are distinct random picks in random order."""
        if self.is_contiguous:
            return list(range(self.num_blocks)), list(range(self.num_blocks))
        rng = random.Random(seed)
        pool = range(self.num_pool_blocks)
        return rng.sample(pool, self.num_blocks), rng.sample(pool, self.num_blocks)


def make_grid(sizes: tuple[int, ...], block_counts: tuple[int, ...]) -> list[TransferPoint]:
    """Every (size, count) whose blocks are at least MIN_BLOCK_BYTES, scattered; plus the
    largest size in its most blocks as one contiguous run."""
    points = [
        TransferPoint(size, count)
        for size in sorted(sizes)
        for count in sorted(block_counts)
        if size % count == 0 and size // count >= MIN_BLOCK_BYTES
    ]
    if not points:
        raise ValueError(f"no size splits into the block counts with >= {MIN_BLOCK_BYTES} B")
    largest = max(p.total_bytes for p in points)
    most = max(p.num_blocks for p in points if p.total_bytes == largest)
    return [*points, TransferPoint(largest, most, is_contiguous=True)]


def kv_shape(block_bytes: int, num_blocks: int, dtype: torch.dtype) -> tuple[int, ...]:
    """An engine pool shape [num_blocks, num_kv_heads, 1 layer, 2, block_size, head_dim] whose
    block is exactly block_bytes: head_dim 128, up to 8 KV heads, block_size the rest."""
    per_head_token = 2 * HEAD_DIM * dtype.itemsize
    if block_bytes % per_head_token:
        raise ValueError(f"block_bytes {block_bytes} is not a multiple of {per_head_token}")
    head_tokens = block_bytes // per_head_token
    num_kv_heads = math.gcd(head_tokens, MAX_KV_HEADS)
    return (num_blocks, num_kv_heads, 1, 2, head_tokens // num_kv_heads, HEAD_DIM)


# -- the two processes --------------------------------------------------------------------------


class TransferRank:
    """One side: a KV pool behind a NixlKVAgent; on the puller, also the timing loops. Run as
    a Ray actor (wrapped in _run, so importing this module does not import Ray)."""

    def __init__(self, progress_delay_us: int) -> None:
        torch.set_num_threads(MEMCPY_THREADS)
        self.progress_delay_us = progress_delay_us
        self.agent = None
        self.kv_cache: torch.Tensor | None = None

    def open(self, name: str, shape: tuple[int, ...], dtype: str, is_holder: bool):
        """A fresh pool, every page touched. The holder's block i holds i % 256 (exact in
        fp32 and bf16) so the puller can check what landed where; the puller's holds -1."""
        from cluster.engine.kv_pool import allocate_kv_pool
        from cluster.kv_transfer.agent import NixlKVAgent

        huge_pages = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"  # set per run, see _run
        kv_cache = allocate_kv_pool(shape, getattr(torch, dtype), torch.device("cpu"), huge_pages)
        if is_holder:
            kv_cache.view(shape[0], -1).copy_(_block_tags(shape[0], kv_cache.dtype)[:, None])
        else:
            kv_cache.fill_(-1)
        self.kv_cache = kv_cache
        self.agent = NixlKVAgent(name, kv_cache, progress_delay_us=self.progress_delay_us)
        return self.agent.info()

    def add_remote(self, info) -> str:
        return self.agent.add_remote(info)

    def drain_notifications(self) -> int:
        return len(self.agent.get_notifications())

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.agent = self.kv_cache = None

    def time_pulls(
        self, remote_name: str, remote_ids, local_ids, repeats: Repeats, memcpy_bytes: int
    ) -> dict:
        """Per sample: seconds to post a pull (read_blocks), to complete it (until DONE) and,
        when memcpy_bytes > 0, to copy that many bytes right after it, so that both sides of
        the ratio see the same neighbours on a shared host. Then check what landed."""
        src = torch.ones(memcpy_bytes, dtype=torch.uint8)
        dst = torch.zeros(memcpy_bytes, dtype=torch.uint8)

        def sample() -> tuple[float, float, int, float]:
            post_s, pull_s, num_descs = self._pull(remote_name, remote_ids, local_ids)
            return post_s, pull_s, num_descs, _copy_s(dst, src) if memcpy_bytes else 0.0

        post_s, pull_s, num_descs, memcpy_s = zip(*_repeat(sample, repeats), strict=True)
        self._check_pulled(remote_ids, local_ids)
        return {
            "post_s": list(post_s),
            "pull_s": list(pull_s),
            "memcpy_s": list(memcpy_s) if memcpy_bytes else [],
            "num_descs": num_descs[-1],
        }

    def _pull(self, remote_name: str, remote_ids, local_ids) -> tuple[float, float, int]:
        agent = self.agent
        start = time.perf_counter()
        handle = agent.read_blocks(remote_name, remote_ids, local_ids, b"bench")
        posted = time.perf_counter()
        while agent.poll(handle) == "PROC":
            pass
        done = time.perf_counter()
        agent.release(handle)
        if handle.state != "DONE":
            raise RuntimeError(f"pull from {remote_name!r} ended in {handle.state}")
        return posted - start, done - start, handle.num_descs

    def _check_pulled(self, remote_ids, local_ids) -> None:
        landed = self.kv_cache[torch.tensor(local_ids)].view(len(local_ids), -1)
        expected = _block_tags(max(remote_ids) + 1, landed.dtype)[torch.tensor(remote_ids)]
        if not bool((landed == expected[:, None]).all()):
            raise RuntimeError("pulled blocks do not hold the holder's bytes")


def _copy_s(dst: torch.Tensor, src: torch.Tensor) -> float:
    start = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - start


def _block_tags(num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(num_blocks) % 256).to(dtype)


def _repeat(sample: Callable[[], Any], repeats: Repeats) -> list[Any]:
    for _ in range(repeats.num_warmup):
        sample()
    samples: list[Any] = []
    start = time.perf_counter()
    while len(samples) < repeats.max_reps and (
        len(samples) < repeats.min_reps or time.perf_counter() - start < repeats.min_time_s
    ):
        samples.append(sample())
    return samples


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    add("--output", type=Path, help="also write the JSON result to this file")
    add("--quick", action="store_true", help="a tiny run for tests: 64 KiB and 1 MiB, 1-16 blocks")
    add("--sizes", type=_size_list, help="comma-separated totals, e.g. 64K,1M (64K...256M)")
    add("--block-counts", type=int_list, help="blocks per pull, comma-separated (1,16,256,4096)")
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="KV pool dtype")
    add("--min-time-s", type=float, help=f"time each point at least this long ({d['min_time_s']})")
    add("--min-reps", type=int, help=f"at least this many timed pulls a point ({d['min_reps']})")
    add("--max-reps", type=int, help=f"at most this many timed pulls a point ({d['max_reps']})")
    add(
        "--progress-delay-us",
        type=int,
        default=10_000,
        help="NixlKVAgent progress thread's poll delay, both sides (default 10000, as agent.py)",
    )
    add(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="pools and memcpy buffers on 4 KiB pages (default: transparent huge pages, as the "
        "engine allocates its KV pool)",
    )
    add("--seed", type=int, default=0, help="seed for the scattered block ids")


def _size_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(_parse_size(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes like 64K,1M,4096, got {text!r}")
    return values


def _parse_size(text: str) -> int:
    """ "64K" -> 65536, "1M" -> 1048576, "4096" -> 4096 (binary units)."""
    units = {"K": KiB, "M": MiB, "G": 1 << 30}
    scale = units.get(text[-1].upper())
    return int(text[:-1]) * scale if scale else int(text)


# -- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Run the sweep, print the table (and JSON with --json), return the result."""
    opt = {name: resolve(args, name, DEFAULTS, QUICK) for name in DEFAULTS}
    grid = make_grid(opt["sizes"], opt["block_counts"])
    repeats = Repeats(opt["min_time_s"], opt["min_reps"], opt["max_reps"])
    result = _run(args, grid, repeats)
    report(result, format_table(result), args)
    return result


def _run(args: argparse.Namespace, grid: list[TransferPoint], repeats: Repeats) -> dict:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Pools come from the engine's allocate_kv_pool; torch's CPU allocator also madvises
    # memcpy buffers >= 2 MiB for huge pages when this is set, so both sides match.
    thp_env = {"THP_MEM_ALLOC_ENABLE": "1" if args.huge_pages else "0"}
    rank_cls = ray.remote(num_cpus=0)(TransferRank).options(runtime_env={"env_vars": thp_env})
    holder, puller = (rank_cls.remote(args.progress_delay_us) for _ in range(2))
    try:
        bench = _Bench(holder, puller, args.dtype, args.seed, repeats)
        fixed_point = TransferPoint(FIXED_COST_BLOCK_BYTES, 1)
        fixed = bench.measure(fixed_point, time_memcpy=False, repeats=_fixed_repeats(repeats))
        rows = [bench.row(point, fixed["pull_us"]) for point in grid]
    finally:
        for rank in (holder, puller):
            ray.kill(rank)
        if started_ray:
            ray.shutdown()
    return {
        "results": rows,
        "fixed_cost_us": fixed["pull_us"],
        "fixed_cost_method": (
            f"median pull of 1 block of {FIXED_COST_BLOCK_BYTES} B over {fixed['reps']} reps "
            "after warm-up (no handshake), measured once and repeated in every row"
        ),
        "device": "cpu",
        "dtype": args.dtype,
        "memcpy_threads": MEMCPY_THREADS,
        "progress_delay_us": args.progress_delay_us,
        "huge_pages": args.huge_pages,
        "repeats": asdict(repeats),
        "seed": args.seed,
        "load_average": os.getloadavg()[0],
    }


def _fixed_repeats(repeats: Repeats) -> Repeats:
    # A 4 KiB pull is tens of microseconds: take as many samples as the sweep allows.
    return Repeats(repeats.min_time_s, repeats.max_reps, repeats.max_reps)


@dataclass(slots=True)
class _Bench:
    """Drives the two actors through one point at a time: fresh pools and agents per point
    (the block shape changes), timing in the puller, everything closed before the next."""

    holder: Any
    puller: Any
    dtype: str
    seed: int
    repeats: Repeats
    num_points: int = 0

    def row(self, point: TransferPoint, fixed_cost_us: float) -> dict:
        m = self.measure(point, time_memcpy=True, repeats=self.repeats)
        nixl_gb_s = point.total_bytes / (m["pull_us"] * 1e-6) / 1e9
        memcpy_gb_s = point.total_bytes / (m["memcpy_us"] * 1e-6) / 1e9
        row = {
            "total_bytes": point.total_bytes,
            "num_blocks": point.num_blocks,
            "nixl_gb_s": nixl_gb_s,
            "memcpy_gb_s": memcpy_gb_s,
            "fraction": nixl_gb_s / memcpy_gb_s,
            "fixed_cost_us": fixed_cost_us,
            "block_bytes": point.block_bytes,
            "pattern": point.pattern,
            **m,
        }
        print(_format_row(row), file=sys.stderr)
        return row

    def measure(self, point: TransferPoint, time_memcpy: bool, repeats: Repeats) -> dict:
        import ray

        self.num_points += 1
        holder_name, puller_name = (f"bench-{side}-{self.num_points}" for side in "hp")
        shape = kv_shape(point.block_bytes, point.num_pool_blocks, getattr(torch, self.dtype))
        info = ray.get(self.holder.open.remote(holder_name, shape, self.dtype, True))
        try:
            ray.get(self.puller.open.remote(puller_name, shape, self.dtype, False))
            ray.get(self.puller.add_remote.remote(info))
            remote_ids, local_ids = point.block_ids(self.seed)
            memcpy_bytes = point.total_bytes if time_memcpy else 0
            pulls = ray.get(
                self.puller.time_pulls.remote(
                    holder_name, remote_ids, local_ids, repeats, memcpy_bytes
                )
            )
            ray.get(self.holder.drain_notifications.remote())
        finally:
            ray.get([self.puller.close.remote(), self.holder.close.remote()])
        return _summarize(pulls)


def _summarize(pulls: dict) -> dict:
    summary = {
        "num_descs": pulls["num_descs"],
        "pull_us": statistics.median(pulls["pull_s"]) * 1e6,
        "post_us": statistics.median(pulls["post_s"]) * 1e6,
        "reps": len(pulls["pull_s"]),
    }
    if pulls["memcpy_s"]:
        summary["memcpy_us"] = statistics.median(pulls["memcpy_s"]) * 1e6
    return summary


# -- output -------------------------------------------------------------------------------------


_HEADER = (
    f"{'total':>9} {'blocks':>6} {'block':>9} {'pattern':>10} {'descs':>5} {'pull us':>9} "
    f"{'post us':>8} {'memcpy us':>9} {'nixl GB/s':>9} {'memcpy GB/s':>11} {'fraction':>8}"
)


def format_table(result: dict) -> str:
    lines = [
        f"NIXL READ (UCX, DRAM, 2 processes) against a {result['memcpy_threads']}-thread "
        f"memcpy; {result['dtype']} pools{' on huge pages' if result['huge_pages'] else ''}, "
        f"progress_delay_us {result['progress_delay_us']}, "
        f"load average {result['load_average']:.2f}",
        f"fixed cost {result['fixed_cost_us']:.1f} us: {result['fixed_cost_method']}",
        _HEADER,
        *(_format_row(r) for r in result["results"]),
    ]
    return "\n".join(lines)


def _format_row(r: dict) -> str:
    return (
        f"{_format_bytes(r['total_bytes']):>9} {r['num_blocks']:>6} "
        f"{_format_bytes(r['block_bytes']):>9} {r['pattern']:>10} {r['num_descs']:>5} "
        f"{r['pull_us']:>9.1f} {r['post_us']:>8.1f} {r['memcpy_us']:>9.1f} "
        f"{r['nixl_gb_s']:>9.2f} {r['memcpy_gb_s']:>11.2f} {r['fraction']:>8.2f}"
    )


def _format_bytes(num_bytes: int) -> str:
    for unit, size in (("MiB", MiB), ("KiB", KiB)):
        if num_bytes >= size and num_bytes % size == 0:
            return f"{num_bytes // size} {unit}"
    return f"{num_bytes} B"
