"""`cluster bench pipeline`: do a pipeline-parallel instance's micro-batches keep its stages
busy? The same work on one engine (PP=1) and on PP=2 instances whose steps are cut into 1 (no
overlap: each stage idles while the other works), 2 or 4 micro-batches.

Each rank is its own process with one thread (on this 2-core host, two stages really run side
by side), over gloo; a seeded random Llama of the given shape. Two phases, timed apart:

    prefill  --batch prompts of --prompt-len tokens in one step each run (compute-bound: what
             micro-batching is for; with stages of equal cost, m micro-batches finish in
             ~(m + 1) / (2m) of PP=1's time, GPipe's bubble)
    decode   --batch requests decoding --output-len tokens from short prompts (memory-bound:
             each micro-batch would read its stage's weights again, so steps under
             pipeline_microbatch_min_tokens tokens are not split and the stages take turns)

Median over --repeats after a warm-up run; every configuration must produce PP=1's tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from cluster.bench.common import report
from cluster.engine.parallel import run_local_ranks

DEFAULTS = {"num_layers": 8, "hidden_size": 1024, "batch": 8, "prompt_len": 256,
            "output_len": 32, "repeats": 3}  # fmt: skip
QUICK = {"num_layers": 2, "hidden_size": 128, "batch": 4, "prompt_len": 64, "output_len": 4,
         "repeats": 1}  # fmt: skip
CONFIGS = [(1, 0), (2, 1), (2, 2), (2, 4)]  # (pp, micro-batches)


def _rank(rank: int, init_method: str, pp: int, micro: int, model_dir: str, opt: dict) -> tuple:
    import dataclasses
    import time

    import torch

    from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(
        model=model_dir, pipeline_parallel_size=pp, pipeline_parallel_rank=rank,
        pipeline_microbatches=micro, dist_init_method=init_method,
        cache=CacheConfig(num_blocks=opt["batch"] * 16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=opt["batch"], max_num_batched_tokens=8192),
    ))  # fmt: skip
    phases = {
        "prefill": (opt["prompt_len"], SamplingParams(max_tokens=1)),
        "decode": (8, SamplingParams(max_tokens=opt["output_len"], ignore_eos=True)),
    }
    times: dict[str, list[float]] = {name: [] for name in phases}
    tokens = []
    for rep in range(opt["repeats"] + 1):  # the first is warm-up
        for name, (length, params) in phases.items():
            prompts = [[3 + (rep * 131 + i * 17 + j) % 4000 for j in range(length)]
                       for i in range(opt["batch"])]  # fmt: skip
            start = time.perf_counter()
            outs = engine.generate(prompts, dataclasses.replace(params, temperature=0.0))
            if rep:
                times[name].append(time.perf_counter() - start)
            tokens += [o.token_ids for o in outs]
    return times, tokens


def _measure(model_dir: str, pp: int, micro: int, opt: dict) -> tuple[dict, list]:
    """Rank 0's times and tokens (every rank returns the tokens the last stage sampled)."""
    return run_local_ranks(_rank, pp, (pp, micro, model_dir, opt), timeout_s=1800)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    helps = {
        "num_layers": "layers",
        "hidden_size": "hidden size",
        "batch": "requests a step",
        "prompt_len": "prompt tokens",
        "output_len": "tokens out",
        "repeats": "timed runs",
    }
    for key, text in helps.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=int, help=f"{text} ({DEFAULTS[key]})")
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
            row = {"pp": pp, "microbatches": micro or pp, "same_tokens_as_pp1": tokens == reference}
            for phase, samples in times.items():
                row[phase] = {"seconds": samples, "median_s": statistics.median(samples)}
            rows.append(row)
    for row in rows:
        for phase in ("prefill", "decode"):
            row[phase]["speedup_vs_pp1"] = rows[0][phase]["median_s"] / row[phase]["median_s"]
    result = {"workload": opt, "rows": rows}
    report(result, format_table(result), args)
    return result


def format_table(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"Pipeline micro-batching: {w['num_layers']} layers x {w['hidden_size']}; prefill "
        f"{w['batch']} x {w['prompt_len']} tokens, decode {w['batch']} x {w['output_len']} "
        "tokens; 1 thread a rank",
        f"{'PP':>3} {'micro':>6} {'prefill s':>10} {'vs PP=1':>8} {'decode s':>9} "
        f"{'vs PP=1':>8} {'same tokens':>12}",
    ]
    for r in result["rows"]:
        p, d = r["prefill"], r["decode"]
        lines.append(
            f"{r['pp']:>3} {r['microbatches']:>6} {p['median_s']:>10.3f} "
            f"{p['speedup_vs_pp1']:>7.2f}x {d['median_s']:>9.3f} {d['speedup_vs_pp1']:>7.2f}x "
            f"{str(r['same_tokens_as_pp1']):>12}"
        )
    return "\n".join(lines)
