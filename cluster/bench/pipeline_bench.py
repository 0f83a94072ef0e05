"""`cluster bench pipeline`: do a pipeline-parallel instance's micro-batches keep its stages
busy? The same workload on one engine (PP=1) and on PP=2 instances whose steps are cut into
1 (no overlap: each stage idles while the other works), 2 or 4 micro-batches.

Each rank is its own process with one thread (on this 2-core host, two stages really run side
by side), over gloo; a seeded random Llama of the given shape. The workload is a batch of
prompts decoded together (--batch x --prompt-len, --output-len tokens each, ignore_eos),
timed from the first step to the last; median over --repeats. With perfect overlap and
stages of equal cost, PP=2 finishes a step in ~1/2 of PP=1's compute (each stage has half the
layers) plus what the split and the sends cost; one micro-batch gives ~1x (serialised
stages), m micro-batches ~(m + 1) / (2m) of PP=1 (GPipe's bubble).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import tempfile
from pathlib import Path

from cluster.bench.common import report

DEFAULTS = {"num_layers": 8, "hidden_size": 1024, "batch": 32, "prompt_len": 128,
            "output_len": 32, "repeats": 3}  # fmt: skip
QUICK = {"num_layers": 2, "hidden_size": 128, "batch": 4, "prompt_len": 16, "output_len": 4,
         "repeats": 1}  # fmt: skip
CONFIGS = [(1, 0), (2, 1), (2, 2), (2, 4)]  # (pp, micro-batches)


def _rank(rank: int, pp: int, micro: int, port: int, model_dir: str, opt: dict, queue) -> None:
    import time

    import torch

    from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    try:
        engine = LLMEngine(EngineConfig(
            model=model_dir, pipeline_parallel_size=pp, pipeline_parallel_rank=rank,
            pipeline_microbatches=micro, dist_init_method=f"tcp://127.0.0.1:{port}",
            cache=CacheConfig(num_blocks=opt["batch"] * 16, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=opt["batch"], max_num_batched_tokens=8192),
        ))  # fmt: skip
        params = SamplingParams(max_tokens=opt["output_len"], temperature=0.0, ignore_eos=True)
        times = []
        for rep in range(opt["repeats"] + 1):  # the first is warm-up
            prompts = [[3 + (rep * 131 + i * 17 + j) % 4000 for j in range(opt["prompt_len"])]
                       for i in range(opt["batch"])]  # fmt: skip
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            times.append(time.perf_counter() - start)
        tokens = [o.token_ids for o in outs]
        queue.put((rank, times[1:], tokens, None))
    except Exception as e:  # noqa: BLE001 - report, do not hang the parent
        queue.put((rank, None, None, repr(e)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(model_dir: str, pp: int, micro: int, opt: dict) -> tuple[list[float], list]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, pp, micro, port, model_dir, opt, queue))
             for r in range(pp)]  # fmt: skip
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [e for *_, e in results if e]
    if errors:
        raise RuntimeError(f"PP={pp} run failed: {errors}")
    return results[0][1], results[0][2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    for name, help_ in (("num-layers", "layers (8)"), ("hidden-size", "hidden size (1024)"),
                        ("batch", "requests decoded together (32)"),
                        ("prompt-len", "prompt tokens (128)"), ("output-len", "tokens out (32)"),
                        ("repeats", "timed runs (3)")):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, help=help_)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")


def run(args: argparse.Namespace) -> dict:
    from cluster.bench.engine_bench import ModelShape, write_checkpoint

    preset = QUICK if args.quick else DEFAULTS
    opt = {k: getattr(args, k, None) or preset[k] for k in DEFAULTS}
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        shape = ModelShape(opt["num_layers"], opt["hidden_size"], max_position_embeddings=2048)
        model_dir = str(write_checkpoint(Path(tmp) / "model", shape, seed=0))
        for pp, micro in CONFIGS:
            times, tokens = _measure(model_dir, pp, micro, opt)
            reference = reference or tokens
            rows.append({"pp": pp, "microbatches": micro or pp, "seconds": times,
                         "median_s": statistics.median(times),
                         "same_tokens_as_pp1": tokens == reference})  # fmt: skip
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup_vs_pp1"] = base / row["median_s"]
    result = {"workload": opt, "rows": rows}
    report(result, format_table(result), args)
    return result


def format_table(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"Pipeline micro-batching: {w['num_layers']} layers x {w['hidden_size']}, batch "
        f"{w['batch']} x {w['prompt_len']} prompt + {w['output_len']} out, 1 thread a rank",
        f"{'PP':>3} {'micro':>6} {'median s':>9} {'vs PP=1':>8} {'same tokens':>12}",
    ]
    for r in result["rows"]:
        lines.append(f"{r['pp']:>3} {r['microbatches']:>6} {r['median_s']:>9.3f} "
                     f"{r['speedup_vs_pp1']:>7.2f}x {str(r['same_tokens_as_pp1']):>12}")  # fmt: skip
    return "\n".join(lines)
