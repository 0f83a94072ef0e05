"""`cluster bench reshard`: what a KV pull between instances of different TP/PP layouts costs,
against a same-layout pull of the same bytes in the same run.

Two Ray actor processes. The holder keeps every rank pool of a prefill instance of the given
layout (a model of --layers x --kv-heads x --head-dim, bf16, block size 16), each behind its
own NixlKVAgent, filled with the model-wide KV's slice; the puller keeps one decode rank's
pool of the other layout. For each case the puller re-shards a prompt's scattered blocks
(reshard.plan_reads: one READ per overlapping prefill rank, descriptors per block, layer and
K/V merged where contiguous) and checks the bytes against the model-wide KV; then, as the
baseline, it pulls the same number of bytes as whole blocks from a holder pool laid out like
its own (read_blocks: prepared descriptors, one per block run). Timed in the puller from the
first post to the last READ done; median over repeats, interleaved, warm-up excluded.

A decode rank's pull is what this times: in an instance every rank pulls its own share at the
same time from its own process (and, on GPUs, its own NIC or NVLink), so the instance's KV is
in place after the slowest rank's pull, not the sum.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from cluster.bench.common import int_list, report

DEFAULTS = {"tokens": (512, 2048, 8192), "layers": 32, "kv_heads": 8, "head_dim": 128,
            "repeats": 7}  # fmt: skip
QUICK = {"tokens": (64,), "layers": 4, "kv_heads": 4, "head_dim": 64, "repeats": 2}
BLOCK_SIZE = 16
# (prefill TP, PP) -> (decode TP, PP); the decode rank timed is the last one.
CASES = [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (2, 1)), ((4, 1), (2, 2)), ((2, 1), (2, 1))]


def _shard(tp: int, pp: int, rank: int, g: dict) -> dict:
    return {"tp_rank": rank % tp, "tp_size": tp, "pp_rank": rank // tp, "pp_size": pp,
            "model_layers": g["layers"], "model_kv_heads": g["kv_heads"]}  # fmt: skip


def _pool(shard: dict, g: dict, num_blocks: int, fill: bool) -> torch.Tensor:
    from cluster.engine.parallel import kv_head_range, layer_range

    l0, l1 = layer_range(shard["pp_rank"], shard["pp_size"], g["layers"])
    h0, h1 = kv_head_range(shard["tp_rank"], shard["tp_size"], g["kv_heads"])
    pool = torch.zeros(num_blocks, h1 - h0, l1 - l0, 2, BLOCK_SIZE, g["head_dim"],
                       dtype=torch.bfloat16)  # fmt: skip
    if fill:  # element value = f(block, head, layer, kv): checkable after any re-sharding
        b = torch.arange(num_blocks).view(-1, 1, 1, 1, 1, 1)
        h = torch.arange(h0, h1).view(1, -1, 1, 1, 1, 1)
        lay = torch.arange(l0, l1).view(1, 1, -1, 1, 1, 1)
        kv = torch.arange(2).view(1, 1, 1, -1, 1, 1)
        tags = ((b * 7 + lay * 3 + kv * 5 + h * 11) % 97).to(torch.bfloat16)  # small
        pool.copy_(tags.expand_as(pool))
    return pool


class Holder:
    """The prefill instance's rank pools (and same-layout twins for the baseline)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.agents, self.pools = {}, {}

    def open(self, name: str, shard: dict, g: dict, num_blocks: int):
        from cluster.kv_transfer.agent import NixlKVAgent

        self.pools[name] = _pool(shard, g, num_blocks, fill=True)
        self.agents[name] = NixlKVAgent(name, self.pools[name], **shard)
        return self.agents[name].info()

    def close_all(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.agents, self.pools = {}, {}


class Puller:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.agent = self.pool = None

    def open(self, shard: dict, g: dict, num_blocks: int, name: str) -> None:
        from cluster.kv_transfer.agent import NixlKVAgent

        if self.agent is not None:
            self.agent.close()
        self.pool = _pool(shard, g, num_blocks, fill=False)
        self.agent = NixlKVAgent(name, self.pool, **shard)
        self.expected = _pool(shard, g, num_blocks, fill=True)

    def time_case(self, infos: list, twin, remote_ids, local_ids, repeats: int) -> dict:
        """Alternating re-sharded and same-layout pulls; seconds, bytes and descriptors."""
        from cluster.kv_transfer.reshard import plan_reads

        plan = plan_reads(self.agent.layout, [i.layout for i in infos])
        names = {i: self.agent.add_remote(infos[i]) for i in plan}
        twin_name = self.agent.add_remote(twin)

        def resharded():
            start = time.perf_counter()
            reads = [self.agent.read_pieces(names[i], pieces, remote_ids, local_ids)
                     for i, pieces in plan.items()]  # fmt: skip
            self._wait(reads)
            return time.perf_counter() - start, reads

        def same_layout():
            start = time.perf_counter()
            # The same bytes: the twin's blocks are laid out like this pool's.
            read = self.agent.read_blocks(twin_name, remote_ids, local_ids, b"")
            self._wait([read])
            return time.perf_counter() - start, [read]

        resharded(), same_layout()  # warm-up: endpoint wireup
        rs, sl = [], []
        for _ in range(repeats):
            self.pool.zero_()
            rs.append(resharded())
            self._check(local_ids, remote_ids)
            sl.append(same_layout())
        r_reads, s_reads = rs[-1][1], sl[-1][1]
        return {
            "resharded_s": [t for t, _ in rs],
            "same_layout_s": [t for t, _ in sl],
            "num_reads": len(r_reads),
            "resharded_bytes": sum(r.num_bytes for r in r_reads),
            "same_layout_bytes": sum(r.num_bytes for r in s_reads),
            "resharded_descs": sum(r.num_descs for r in r_reads),
            "same_layout_descs": sum(r.num_descs for r in s_reads),
        }

    def _wait(self, reads) -> None:
        for read in reads:
            while self.agent.poll(read) == "PROC":
                pass
            self.agent.release(read)
            if read.state != "DONE":
                raise RuntimeError(f"READ from {read.remote_name!r} ended {read.state}")

    def _check(self, local_ids, remote_ids) -> None:
        got = self.pool[torch.tensor(local_ids)]
        if not torch.equal(got, self.expected[torch.tensor(remote_ids)]):
            raise RuntimeError("re-sharded blocks do not hold the holder's bytes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--tokens", type=int_list, help="prompt tokens (512,2048,8192)")
    parser.add_argument("--layers", type=int, help="model layers (32, Llama-3-8B)")
    parser.add_argument("--kv-heads", type=int, help="model KV heads (8)")
    parser.add_argument("--head-dim", type=int, help="head dimension (128)")
    parser.add_argument("--repeats", type=int, help="timed pulls per case and path (7)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")


def run(args: argparse.Namespace) -> dict:
    import ray

    preset = QUICK if args.quick else DEFAULTS
    g = {k: getattr(args, k, None) or preset[k] for k in ("layers", "kv_heads", "head_dim")}
    tokens, repeats = args.tokens or preset["tokens"], args.repeats or preset["repeats"]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        holder = ray.remote(num_cpus=0)(Holder).remote()
        puller = ray.remote(num_cpus=0)(Puller).remote()
        for n_tokens in tokens:
            num_blocks = -(-n_tokens // BLOCK_SIZE)
            pool_blocks = 2 * num_blocks  # ids scatter, as an allocator's do
            rng = random.Random(n_tokens)
            remote_ids = rng.sample(range(pool_blocks), num_blocks)
            local_ids = rng.sample(range(pool_blocks), num_blocks)
            for (ptp, ppp), (dtp, dpp) in CASES:
                tag = f"{n_tokens}-{ptp}{ppp}{dtp}{dpp}"
                infos = ray.get([
                    holder.open.remote(f"src-{tag}-{r}", _shard(ptp, ppp, r, g), g, pool_blocks)
                    for r in range(ptp * ppp)
                ])  # fmt: skip
                dst = _shard(dtp, dpp, dtp * dpp - 1, g)
                twin = ray.get(holder.open.remote(f"twin-{tag}", dst, g, pool_blocks))
                ray.get(puller.open.remote(dst, g, pool_blocks, f"dst-{tag}"))
                r = ray.get(puller.time_case.remote(infos, twin, remote_ids, local_ids, repeats))
                ray.get(holder.close_all.remote())
                rows.append(_row(n_tokens, (ptp, ppp), (dtp, dpp), r))
        ray.get(puller.open.remote(_shard(1, 1, 0, g), g, 1, "dst-close"))
    finally:
        if started:
            ray.shutdown()
    result = {
        "model": {**g, "block_size": BLOCK_SIZE, "dtype": "bfloat16"},
        "repeats": repeats,
        "rows": rows,
    }
    report(result, format_table(result), args)
    return result


def _row(n_tokens: int, prefill, decode, r: dict) -> dict:
    rs, sl = statistics.median(r["resharded_s"]), statistics.median(r["same_layout_s"])
    return {
        "tokens": n_tokens,
        "prefill": {"tp": prefill[0], "pp": prefill[1]},
        "decode": {"tp": decode[0], "pp": decode[1]},
        "bytes": r["resharded_bytes"],
        "num_reads": r["num_reads"],
        "resharded_descs": r["resharded_descs"],
        "same_layout_descs": r["same_layout_descs"],
        "resharded_ms": rs * 1e3,
        "same_layout_ms": sl * 1e3,
        "ratio": rs / sl,
        "resharded_gbps": r["resharded_bytes"] / rs / 1e9,
        "samples": {k: r[k] for k in ("resharded_s", "same_layout_s")},
    }


def format_table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"KV re-sharding, one decode rank's pull: {m['layers']} layers x {m['kv_heads']} KV "
        f"heads x {m['head_dim']}, bf16, block {m['block_size']}; median of {result['repeats']}",
        f"{'tokens':>6} {'prefill':>8} {'decode':>8} {'MiB':>8} {'reads':>5} {'descs':>7} "
        f"{'re-shard ms':>11} {'same ms':>8} {'ratio':>6} {'GB/s':>6}",
    ]
    for r in result["rows"]:
        prefill, decode = (f"TP{r[side]['tp']}PP{r[side]['pp']}" for side in ("prefill", "decode"))
        lines.append(
            f"{r['tokens']:>6} {prefill:>8} {decode:>8} {r['bytes'] / 2**20:>8.1f} "
            f"{r['num_reads']:>5} {r['resharded_descs']:>7} {r['resharded_ms']:>11.2f} "
            f"{r['same_layout_ms']:>8.2f} {r['ratio']:>6.2f} {r['resharded_gbps']:>6.2f}"
        )
    return "\n".join(lines)
