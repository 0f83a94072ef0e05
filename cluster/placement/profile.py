"""`placement profile`: measure our engine on this device and write the profile that the
planner's fitted latency model reads. One engine in this process times single steps: a prefill
step over a whole batch of fresh prompts for a grid of batch shapes, and decode steps for a grid
of (batch size, context length); `latency.fit_profile` then fits DistServe's forms to the rows
and reports their hold-out error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cluster.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tiny import default_model_dir
from cluster.placement.hardware import Hardware, get_hardware, load_catalog
from cluster.placement.latency import fit_profile
from cluster.placement.model_spec import ModelSpec, load_model_spec

PROFILE_VERSION = 1
BLOCK_SIZE = 16
DECODE_STEPS = 3  # timed decode steps per batch and round; odd: the middle step's Σctx is the mean
DECODE_MAX_TOKENS = DECODE_STEPS + 2  # the first token, the timed steps and one spare


@dataclasses.dataclass(slots=True, frozen=True)
class Grid:
    """What to measure. prefill: the prompt lengths of each batch. decode: (batch size,
    typical context length) cells; each request's length is drawn within ±25% of it so that
    Σctx is not an exact multiple of B."""

    prefill: tuple[tuple[int, ...], ...]
    decode: tuple[tuple[int, int], ...]


# Single prompts over the whole range, then batches of equal and of mixed lengths so that the
# fit can tell Σl from Σl² (equal Σl, different Σl²).
FULL_GRID = Grid(
    prefill=(
        *((n,) for n in (16, 32, 64, 128, 256, 384, 512, 768, 1024)),
        (16,) * 8,
        (64,) * 8,
        (128,) * 4,
        (256,) * 4,
        (512,) * 2,
        (256,) * 8,
        (32, 64, 128, 256),
        (16, 512),
        (64, 1024),
        (128, 128, 256, 512, 1024),
    ),
    decode=tuple((b, c) for b in (1, 2, 4, 8, 16, 32) for c in (16, 128, 512, 1024)),
)
QUICK_GRID = Grid(
    prefill=(
        *((n,) for n in (16, 64, 256, 512)),
        (16,) * 4,
        (64,) * 4,
        (128,) * 4,
        (256,) * 4,
        (32, 128, 256),
        (16, 512),
    ),
    decode=tuple((b, c) for b in (1, 4, 16) for c in (32, 128, 512)),
)


# --- measuring -------------------------------------------------------------------------------


def profile_engine(
    model: str | None = None,
    device: str = "cpu",
    hardware: str | None = None,
    quick: bool = False,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Profile the engine on `model` (a checkpoint folder; None: the embedded tiny model).
    Raises ValueError for bad input (no config.json, no CUDA, unknown hardware)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _check_device(device)
    model_dir = str(model or default_model_dir())
    model_config = ModelConfig.from_pretrained(model_dir)  # ValueError without config.json
    hardware_name = resolve_hardware(hardware, device)
    rng = random.Random(seed)
    limit = model_config.max_position_embeddings - DECODE_MAX_TOKENS - 1
    prefill_batches, decode_batches = _concrete_batches(
        QUICK_GRID if quick else FULL_GRID, limit, rng
    )
    config = _engine_config(model_dir, device, seed, prefill_batches, decode_batches)
    engine = LLMEngine(config)
    sync = engine.runner.device.type == "cuda"
    prefill = _prefill_rows(engine, prefill_batches, repeats, rng, sync)
    decode = _decode_rows(engine, decode_batches, repeats, rng, sync)
    engine.check_integrity()
    dtype = str(engine.runner.dtype).removeprefix("torch.")
    profile = {
        "version": PROFILE_VERSION,
        "hardware": hardware_name,
        "device": "cpu" if device == "cpu" else torch.cuda.get_device_name(engine.runner.device),
        "model": _model_spec(model_dir, dtype).to_dict(),
        "dtype": dtype,
        "tp": 1,
        "pp": 1,
        "block_size": config.cache.block_size,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "prefill": prefill,
        "decode": decode,
    }
    profile["fit"] = fit_profile(profile)
    return profile


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device here")
    return device


def _concrete_batches(
    grid: Grid, limit: int, rng: random.Random
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The grid's prompt lengths, capped where the model's context is shorter (duplicates that
    capping makes are dropped), with decode cells drawn as one length per request."""
    if limit < 2:
        raise ValueError("the model's max_position_embeddings is too small to profile")
    prefill = list(dict.fromkeys(tuple(min(n, limit) for n in lens) for lens in grid.prefill))
    cells = dict.fromkeys((b, min(c, limit)) for b, c in grid.decode)
    decode = [
        tuple(min(limit, max(1, round(c * rng.uniform(0.75, 1.25)))) for _ in range(b))
        for b, c in cells
    ]
    return prefill, decode


def _engine_config(
    model_dir: str,
    device: str,
    seed: int,
    prefill: list[tuple[int, ...]],
    decode: list[tuple[int, ...]],
) -> EngineConfig:
    """An engine sized for the grid: every prefill batch fits one step's token budget, every
    batch fits the seats and the KV pool, and nothing more is allocated."""
    longest = max(max(max(lens) for lens in prefill), max(max(lens) for lens in decode))
    need_prefill = max(sum(_blocks(n + 1) for n in lens) for lens in prefill)
    need_decode = max(sum(_blocks(n + DECODE_MAX_TOKENS + 1) for n in lens) for lens in decode)
    seats = max(max(len(lens) for lens in prefill), max(len(lens) for lens in decode))
    return EngineConfig(
        model=model_dir,
        # Scheduling is the same as colocated; the decode role lets decode batches take their
        # prompts' KV as already there (add_remote_request) instead of computing it: the step
        # time does not depend on what the KV holds, and a 32 x 1024 prefill would cost more
        # than all of the decode measurements together.
        role="decode",
        device=device,
        seed=seed,
        max_model_len=longest + DECODE_MAX_TOKENS + 1,
        cache=CacheConfig(
            block_size=BLOCK_SIZE,
            num_blocks=max(need_prefill, need_decode) + 1,
            enable_prefix_caching=False,  # every prefill must compute all of its tokens
        ),
        scheduler=SchedulerConfig(
            # the scheduler seats no more decodes than the token budget
            max_num_batched_tokens=max(seats, max(sum(lens) for lens in prefill)),
            max_num_seqs=seats,
        ),
    )


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def _random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def _timed_step(engine: LLMEngine, sync: bool) -> float:
    """Wall time of one engine step; on CUDA the queue is drained on both sides of it."""
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _prefill_rows(
    engine: LLMEngine,
    batches: list[tuple[int, ...]],
    repeats: int,
    rng: random.Random,
    sync: bool,
) -> list[dict[str, Any]]:
    samples = _measure_rounds(
        batches, lambda lens: [_prefill_once(engine, lens, rng, sync)], repeats
    )
    return [
        {"input_lens": list(lens), "time_s": statistics.median(times)}
        for lens, times in zip(batches, samples, strict=True)
    ]


def _decode_rows(
    engine: LLMEngine,
    batches: list[tuple[int, ...]],
    repeats: int,
    rng: random.Random,
    sync: bool,
) -> list[dict[str, Any]]:
    samples = _measure_rounds(batches, lambda lens: _decode_once(engine, lens, rng, sync), repeats)
    return [
        {
            "batch_size": len(lens),
            "context_len_sum": _decode_context_sum(lens),
            "time_s": statistics.median(times),
        }
        for lens, times in zip(batches, samples, strict=True)
    ]


def _measure_rounds(
    shapes: Sequence[tuple[int, ...]],
    measure: Callable[[tuple[int, ...]], list[float]],
    repeats: int,
) -> list[list[float]]:
    """The times `measure` returns for each shape, taken in rounds over the whole grid: a burst
    of load from elsewhere then spoils one sample of many shapes rather than every sample of
    one. The first round warms every shape up and is dropped."""
    samples: list[list[float]] = [[] for _ in shapes]
    for round_index in range(repeats + 1):
        for shape_samples, shape in zip(samples, shapes, strict=True):
            times = measure(shape)
            if round_index:
                shape_samples.extend(times)
    return samples


def _prefill_once(engine: LLMEngine, lens: Sequence[int], rng: random.Random, sync: bool) -> float:
    """Time of one step that prefills fresh prompts of all of `lens` at once."""
    vocab = engine.model_config.vocab_size
    # max_tokens=1: each request finishes with its first token and frees its blocks, as on a
    # prefill instance.
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    ids = [engine.add_request(None, _random_prompt(rng, n, vocab), params) for n in lens]
    try:
        elapsed = _timed_step(engine, sync)
        _expect_tokens(engine, sum(lens), f"prefill of {list(lens)}")
    finally:
        for request_id in ids:
            engine.abort(request_id)  # a no-op for the finished ones
    return elapsed


def _decode_once(
    engine: LLMEngine, lens: Sequence[int], rng: random.Random, sync: bool
) -> list[float]:
    """Times of DECODE_STEPS steps of len(lens) requests whose prompts have `lens` tokens."""
    vocab = engine.model_config.vocab_size
    # Default sampling (temperature 1), as a typical request; ignore_eos and max_tokens keep
    # every request running through the timed steps.
    params = SamplingParams(max_tokens=DECODE_MAX_TOKENS, ignore_eos=True)
    admitted: list[str] = []
    try:
        for i, n in enumerate(lens):
            request_id = f"profile-decode-{i}"
            if engine.add_remote_request(request_id, _random_prompt(rng, n, vocab), params) is None:
                raise RuntimeError(f"a decode batch of {len(lens)} does not fit the engine")
            admitted.append(request_id)
            engine.commit_remote(request_id, rng.randrange(vocab))
        times = []
        for _ in range(DECODE_STEPS):
            times.append(_timed_step(engine, sync))
            _expect_tokens(engine, len(lens), f"decode of {len(lens)} requests")
    finally:
        for request_id in admitted:
            engine.abort(request_id)
    return times


def _decode_context_sum(lens: Sequence[int]) -> int:
    """Σctx of the middle timed decode step. After commit_remote a request holds its prompt and
    first token; step k attends to prompt + 1 + k tokens (the one it computes included)."""
    return sum(lens) + len(lens) * (1 + DECODE_STEPS // 2)


def _expect_tokens(engine: LLMEngine, expected: int, what: str) -> None:
    """A measurement is only what it claims if the scheduler ran exactly those tokens."""
    if engine.last_step_num_tokens != expected:
        raise RuntimeError(
            f"{what}: the step ran {engine.last_step_num_tokens} tokens, expected {expected}"
        )


def _model_spec(model_dir: str, dtype: str) -> ModelSpec:
    """The checkpoint's shape, in the dtype the engine ran (bytes per weight and KV entry)."""
    spec = load_model_spec(model_dir)
    try:
        return dataclasses.replace(spec, dtype=dtype)
    except ValueError:  # a dtype the planner does not know: keep the checkpoint's
        return spec


def resolve_hardware(name: str | None, device: str) -> str:
    """The catalog name of this device: as given, CPU on cpu, else guessed from the GPU."""
    catalog = load_catalog()
    if name:
        return get_hardware(name, catalog).name
    if device == "cpu":
        return get_hardware("CPU", catalog).name
    return _guess_gpu(catalog, device)


def _guess_gpu(catalog: dict[str, Hardware], device: str) -> str:
    """The catalog GPU whose model name (A100, H100, ...) is in the device's name, the variant
    nearest in memory when there are several."""
    props = torch.cuda.get_device_properties(device)
    gpu = props.name.upper()
    matches = [hw for hw in catalog.values() if hw.kind == "gpu" and hw.name.split("-")[0] in gpu]
    if not matches:
        raise ValueError(f"cannot tell which catalog hardware {props.name!r} is: give --hardware")
    return min(matches, key=lambda hw: abs(hw.memory_bytes - props.total_memory)).name


# --- command line ----------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `profile` to an argparse subparsers object."""
    parser = sub.add_parser(
        "profile",
        help="measure our engine's prefill and decode steps and fit the latency model",
        description=__doc__,
    )
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint folder (default: the embedded tiny model)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--hardware",
        metavar="NAME",
        help="catalog name of this device (default: CPU on cpu, guessed from the GPU's name)",
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="profile a served deployment over gRPC instead (serving overheads included)",
    )
    parser.add_argument("--api-key", default=None, help="with --target: the server's key")
    parser.add_argument("--quick", action="store_true", help="a small grid: seconds, not a minute")
    parser.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per shape")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--output", default="profile.json", metavar="PATH")
    parser.add_argument(
        "--json", action="store_true", help="print the profile on stdout (the summary on stderr)"
    )
    parser.set_defaults(func=run)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if not output.parent.is_dir():  # fail before a minute of measuring, not after
        print(f"error: {output.parent} is not a folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        if args.target:
            from cluster.bench.served_profile import profile_served

            hardware = resolve_hardware(args.hardware, "cpu")
            profile = profile_served(args.target, args.model, hardware, args.api_key,
                                     args.quick, args.repeats, args.seed)  # fmt: skip
        else:
            profile = profile_engine(
                args.model, args.device, args.hardware, args.quick, args.repeats, args.seed
            )
        with output.open("w") as f:
            json.dump(profile, f, indent=1)
            f.write("\n")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(profile, time.perf_counter() - start) + f"\nwrote {output}"
    if args.json:
        print(summary, file=sys.stderr)
        print(json.dumps(profile))
    else:
        print(summary)
    return 0


def summarize(profile: dict[str, Any], elapsed_s: float) -> str:
    """A few lines: what was measured, the fitted coefficients and their hold-out error."""
    fits = profile["fit"]
    lines = [
        f"profiled {profile['model']['name']} ({profile['dtype']}) on {profile['hardware']} "
        f"({profile['device']}) in {elapsed_s:.1f} s: {len(profile['prefill'])} prefill rows, "
        f"{len(profile['decode'])} decode rows"
    ]
    terms = {"prefill": ("", "·Σl", "·Σl²", "·n"), "decode": ("", "·Σctx", "·B")}
    for stage, names in terms.items():
        fit = fits[stage]
        formula = " + ".join(f"{c:.3g}{n}" for c, n in zip(fit["coefficients"], names, strict=True))
        lines.append(
            f"{stage:8s} {formula} s   hold-out error mean {fit['holdout_mean_rel_error']:.1%}"
            f" max {fit['holdout_max_rel_error']:.1%}"
        )
    return "\n".join(lines)
