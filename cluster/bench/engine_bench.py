"""`cluster bench engine`: output-token throughput of our LLMEngine against transformers'
`generate` with static batches, on one random-weight Llama and one seeded workload.

Both sides run the same checkpoint in fp32 on the CPU, greedy, with no early stop. At
concurrency N the engine keeps up to N requests in flight (continuous batching, chunked
prefill); transformers runs the requests N at a time in arrival order, each batch left-padded
to its longest prompt and decoded to its longest output. Throughput counts only the tokens
each request asked for, so the padding and the tail that static batching computes for nothing
show up as lost time: that gap is what continuous batching exists to close.

The checkpoint is written by `transformers` itself (LlamaConfig + from_config + save_pretrained)
so the engine loads a real Hugging Face folder; the tokenizer is the tiny default's, which
only has to load, since prompts are passed as token ids.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.bench.common import int_list, report, resolve
from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams

PAD_TOKEN_ID = 2  # the tiny tokenizer's <|pad|>; prompts are drawn above the special ids
_FIRST_PROMPT_ID = 3
_BLOCK_SIZE = 16

# Option defaults, and what --quick replaces; an option given on the command line wins.
DEFAULTS = {
    "num_layers": 8,
    "hidden_size": 512,
    "num_requests": 64,
    "prompt_len": (16, 512),
    "output_len": (8, 256),
    "concurrency": (1, 8, 32, 64),
    "batch1_requests": 8,
}
QUICK = {
    "num_layers": 2,
    "hidden_size": 128,
    "num_requests": 8,
    "prompt_len": (8, 64),
    "output_len": (4, 32),
    "concurrency": (1, 4),
    "batch1_requests": 4,
}


@dataclass(slots=True, frozen=True)
class ModelShape:
    """A GQA Llama: head_dim 64, half as many KV heads as query heads, MLP 2.75x hidden."""

    num_layers: int
    hidden_size: int
    head_dim: int = 64
    vocab_size: int = 4096
    max_position_embeddings: int = 1024

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.hidden_size < self.head_dim or self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size must be a multiple of {self.head_dim}")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.num_heads // 2)

    @property
    def intermediate_size(self) -> int:
        return -(-self.hidden_size * 11 // 4 // 64) * 64  # 512 -> 1408, as in the brief

    def as_dict(self) -> dict:
        derived = ("num_heads", "num_kv_heads", "intermediate_size")
        return asdict(self) | {name: getattr(self, name) for name in derived}


@dataclass(slots=True, frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    add("--output", type=Path, help="also write the JSON result to this file")
    add("--quick", action="store_true", help="a tiny run for tests: 2 layers, 8 short requests")
    add("--num-layers", type=int, help=f"decoder layers (default {d['num_layers']})")
    add("--hidden-size", type=int, help=f"multiple of 64 (default {d['hidden_size']})")
    add("--num-requests", type=int, help=f"requests in the workload (default {d['num_requests']})")
    add("--prompt-len", type=_int_range, help="MIN,MAX prompt tokens, log-uniform (16,512)")
    add("--output-len", type=_int_range, help="MIN,MAX output tokens, log-uniform (8,256)")
    add("--concurrency", type=int_list, help="comma-separated N values (default 1,8,32,64)")
    add(
        "--batch1-requests",
        type=int,
        help=f"at N=1 time only the first K requests (default {d['batch1_requests']})",
    )
    add("--threads", type=int, help="torch.set_num_threads before timing (default: leave it)")
    add("--max-num-batched-tokens", type=int, default=2048, help="engine per-step token budget")
    add("--seed", type=int, default=0, help="seed for the weights and the workload")


def _int_range(text: str) -> tuple[int, int]:
    values = int_list(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with MIN <= MAX, got {text!r}")
    return values


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark, print the table (and JSON with --json), return the result."""
    from transformers.utils import logging as hf_logging

    num_threads, had_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # save/load bars would bury the table on stderr
    try:
        result = _run(args)
    finally:
        torch.set_num_threads(num_threads)
        if had_bars:
            hf_logging.enable_progress_bar()
    report(result, format_table(result), args)
    return result


def _run(args: argparse.Namespace) -> dict:
    opt = {name: resolve(args, name, DEFAULTS, QUICK) for name in DEFAULTS}
    longest = opt["prompt_len"][1] + opt["output_len"][1]
    max_len = max(1024, -(-longest // _BLOCK_SIZE) * _BLOCK_SIZE)  # see _make_engine
    shape = ModelShape(opt["num_layers"], opt["hidden_size"], max_position_embeddings=max_len)
    requests = make_workload(
        opt["num_requests"], opt["prompt_len"], opt["output_len"], shape.vocab_size, args.seed
    )
    with tempfile.TemporaryDirectory(prefix="cluster-bench-engine-") as tmp:
        model_dir = write_checkpoint(Path(tmp), shape, args.seed)
        rows = [
            _measure(model_dir, _subset(requests, n, opt["batch1_requests"]), n, args)
            for n in opt["concurrency"]
        ]
    return {
        "results": rows,
        "model": shape.as_dict(),
        "workload": _describe_workload(requests, opt, args),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def _subset(requests: list[BenchRequest], concurrency: int, batch1: int) -> list[BenchRequest]:
    return requests[:batch1] if concurrency == 1 else requests


def _measure(model_dir: Path, requests: list[BenchRequest], concurrency: int, args) -> dict:
    engine_s = time_engine(model_dir, requests, concurrency, args.max_num_batched_tokens)
    _warn_if_busy(f"engine at concurrency {concurrency}")
    hf_s = time_hf(model_dir, requests, concurrency)
    _warn_if_busy(f"transformers at concurrency {concurrency}")
    num_tokens = sum(r.output_len for r in requests)
    engine_tok_s, hf_tok_s = num_tokens / engine_s, num_tokens / hf_s
    print(
        f"concurrency {concurrency}: engine {engine_s:.2f} s, transformers {hf_s:.2f} s",
        file=sys.stderr,
    )
    return {
        "concurrency": concurrency,
        "engine_tok_s": engine_tok_s,
        "hf_tok_s": hf_tok_s,
        "speedup": engine_tok_s / hf_tok_s,
        "num_requests": len(requests),
        "engine_s": engine_s,
        "hf_s": hf_s,
    }


def _warn_if_busy(label: str) -> None:
    # With every core given to OpenMP, one busy neighbour makes each barrier wait for a
    # descheduled thread (~16 ms a matmul on a 2-core box): such a timing is not the code's.
    load = os.getloadavg()[0]
    if load > torch.get_num_threads() + 1:
        print(
            f"warning: load average {load:.1f} after {label}: other processes share the "
            "cores, so this timing is unreliable (--threads 1 suffers less)",
            file=sys.stderr,
        )


def _describe_workload(requests: list[BenchRequest], opt: dict, args) -> dict:
    return {
        "num_requests": len(requests),
        "batch1_requests": min(opt["batch1_requests"], len(requests)),
        "prompt_len_range": list(opt["prompt_len"]),
        "output_len_range": list(opt["output_len"]),
        "num_prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "num_output_tokens": sum(r.output_len for r in requests),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "seed": args.seed,
    }


def format_table(result: dict) -> str:
    m, w = result["model"], result["workload"]
    lines = [
        f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_heads']}/{m['num_kv_heads']} heads, vocab {m['vocab_size']}; "
        f"fp32 on cpu, {result['torch_threads']} threads",
        f"workload: prompts {w['prompt_len_range']}, outputs {w['output_len_range']} "
        f"(log-uniform), seed {w['seed']}",
        f"{'concurrency':>11} {'requests':>8} {'engine tok/s':>12} {'hf tok/s':>9} "
        f"{'speedup':>7} {'engine s':>8} {'hf s':>7}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['concurrency']:>11} {r['num_requests']:>8} {r['engine_tok_s']:>12.1f} "
            f"{r['hf_tok_s']:>9.1f} {r['speedup']:>6.2f}x {r['engine_s']:>8.2f} {r['hf_s']:>7.2f}"
        )
    return "\n".join(lines)


# -- inputs -----------------------------------------------------------------------------------


def write_checkpoint(model_dir: Path, shape: ModelShape, seed: int) -> Path:
    """Save a seeded random-weight Llama of `shape` with save_pretrained, plus the tiny
    default's tokenizer files. No eos id: neither side may stop before its budget."""
    from transformers import LlamaConfig

    from cluster.engine.tiny import default_model_dir, save_random_checkpoint

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return save_random_checkpoint(config, model_dir, seed, default_model_dir())


def make_workload(
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """Requests with log-uniform prompt and output lengths and random prompt ids."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        num_prompt = _log_uniform(rng, *prompt_len)
        ids = [rng.randrange(_FIRST_PROMPT_ID, vocab_size) for _ in range(num_prompt)]
        requests.append(BenchRequest(ids, _log_uniform(rng, *output_len)))
    return requests


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    value = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min(high, max(low, value))


_WARMUP = BenchRequest([_FIRST_PROMPT_ID] * 8, 4)


# -- the two sides ----------------------------------------------------------------------------


def time_engine(
    model_dir: Path, requests: list[BenchRequest], concurrency: int, max_num_batched_tokens: int
) -> float:
    """Seconds from the first add_request to the last finished output."""
    engine = _make_engine(model_dir, requests, concurrency, max_num_batched_tokens)
    engine.generate([_WARMUP.prompt_token_ids], _greedy(_WARMUP.output_len))
    start = time.perf_counter()
    for i, request in enumerate(requests):
        engine.add_request(f"bench-{i}", request.prompt_token_ids, _greedy(request.output_len))
    num_tokens = 0
    while engine.has_unfinished():
        num_tokens += sum(len(out.token_ids) for out in engine.step() if out.finished)
    elapsed = time.perf_counter() - start
    _check_num_tokens("engine", num_tokens, requests)
    return elapsed


def _make_engine(model_dir: Path, requests, concurrency: int, max_batched: int) -> LLMEngine:
    # KV for the N longest requests at once, so no run is slowed by preemption; no prefix
    # cache, so no run profits from an earlier one's blocks.
    max_blocks = max(-(-(len(r.prompt_token_ids) + r.output_len) // _BLOCK_SIZE) for r in requests)
    cache = CacheConfig(
        block_size=_BLOCK_SIZE,
        num_blocks=min(concurrency, len(requests)) * max_blocks + 1,
        enable_prefix_caching=False,
    )
    scheduler = SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=concurrency)
    config = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=max_blocks * _BLOCK_SIZE,  # fits the pool, which a default might not
        cache=cache,
        scheduler=scheduler,
    )
    return LLMEngine(config)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def time_hf(model_dir: Path, requests: list[BenchRequest], concurrency: int) -> float:
    """Seconds to run the requests through `generate` in static batches of `concurrency`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    _hf_generate(model, [_WARMUP])
    start = time.perf_counter()
    for i in range(0, len(requests), concurrency):
        _hf_generate(model, requests[i : i + concurrency])
    return time.perf_counter() - start


@torch.inference_mode()
def _hf_generate(model, batch: list[BenchRequest]) -> None:
    prompt_len = max(len(r.prompt_token_ids) for r in batch)
    input_ids = torch.full((len(batch), prompt_len), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, request in enumerate(batch):
        start = prompt_len - len(request.prompt_token_ids)
        input_ids[row, start:] = torch.tensor(request.prompt_token_ids)
        attention_mask[row, start:] = 1
    max_new = max(r.output_len for r in batch)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=PAD_TOKEN_ID,
    )
    if out.shape[1] != prompt_len + max_new:
        raise RuntimeError(f"transformers stopped early: {out.shape[1] - prompt_len} tokens")


def _check_num_tokens(side: str, num_tokens: int, requests: list[BenchRequest]) -> None:
    expected = sum(r.output_len for r in requests)
    if num_tokens != expected:
        raise RuntimeError(f"{side} produced {num_tokens} output tokens, expected {expected}")
