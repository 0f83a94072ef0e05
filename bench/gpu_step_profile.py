"""Where a decode step of our engine goes on a GPU: the ~0.9B bf16 shape of gpu_check.py, a
batch of decodes stepped under torch.profiler, the top operators by host (CPU) time and by
device time, and how busy the device was over the steps.

    python3 bench/gpu_step_profile.py --out DIR [--batch 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from cluster.bench.engine_bench import ModelShape, write_checkpoint  # noqa: E402
from cluster.engine.config import CacheConfig, EngineConfig  # noqa: E402
from cluster.engine.llm_engine import LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402

SHAPE = ModelShape(num_layers=16, hidden_size=2048, vocab_size=32000, max_position_embeddings=2048)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SHAPE if args.device == "cuda" else ModelShape(num_layers=2, hidden_size=128)
    model_dir = write_checkpoint(Path(tempfile.mkdtemp()) / "llama", shape, seed=0)
    config = json.loads((model_dir / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=args.device,
                                    cache=CacheConfig(num_blocks=4096)))  # fmt: skip
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.steps + 10, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch):
        vocab = shape.vocab_size
        engine.add_request(None, [rng.randrange(3, vocab) for _ in range(512)], params)
    while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):  # warm
        engine.step()
    sync = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sync else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        if sync:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if sync else 0.0
    summary = {
        "batch": args.batch,
        "steps": args.steps,
        "step_ms": wall / args.steps * 1e3,
        "device_busy_ms_per_step": device_us / 1e3 / args.steps,
        "device_busy_share": device_us / 1e6 / wall,
        "kernel_launches_per_step": sum(e.count for e in events if e.key == "cudaLaunchKernel")
        / args.steps,
    }
    print(json.dumps(summary, indent=1))
    (args.out / "step-profile.json").write_text(json.dumps(summary, indent=1))
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25)
    print(by_cpu)
    (args.out / "step-profile-cpu.txt").write_text(by_cpu)
    if sync:
        by_dev = events.table(sort_by="self_device_time_total", row_limit=15)
        print(by_dev)
        (args.out / "step-profile-device.txt").write_text(by_dev)


if __name__ == "__main__":
    main()
