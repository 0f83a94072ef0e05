"""What a session with a GPU runs (docs/testing.md): `pytest -m gpu` first, then our engine's
step times on a ~0.9B Llama shape in bf16 through `placement profile --device cuda`, set beside
the planner's analytic latency model for the same shape on the catalog entry of this GPU and
the memory-bandwidth floor of a batch-1 decode step.

    python3 bench/gpu_check.py --hardware H200 --out DIR

Writes DIR/gpu-profile.json (the profile, loadable by `placement plan --profile`) and
DIR/gpu-check.json (profile rows against the analytic model)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.engine_bench import ModelShape, write_checkpoint  # noqa: E402
from cluster.placement.hardware import get_hardware, load_catalog  # noqa: E402
from cluster.placement.latency import AnalyticLatency  # noqa: E402
from cluster.placement.model_spec import ModelSpec  # noqa: E402
from cluster.placement.profile import profile_engine  # noqa: E402

# ~0.9B parameters: 16 layers, hidden 2048, 32 query / 16 KV heads of 64, MLP 5632, vocab 32000.
SHAPE = ModelShape(num_layers=16, hidden_size=2048, vocab_size=32000, max_position_embeddings=2048)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hardware", default="H200")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a quick smoke run of this script")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    shape = SHAPE if args.device == "cuda" else ModelShape(num_layers=2, hidden_size=128)
    model_dir = write_checkpoint(Path(tempfile.mkdtemp()) / "llama", shape, seed=0)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"  # the engine runs the checkpoint's dtype
    config_path.write_text(json.dumps(config))
    print(f"checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)

    start = time.perf_counter()
    profile = profile_engine(
        str(model_dir), args.device, args.hardware, quick=args.device == "cpu", repeats=3
    )
    print(f"profiled in {time.perf_counter() - start:.1f} s on {profile['device']}", flush=True)
    (args.out / "gpu-profile.json").write_text(json.dumps(profile, indent=1))

    spec = ModelSpec.from_dict(profile["model"])
    hardware = get_hardware(args.hardware, load_catalog())
    model = AnalyticLatency(spec, hardware)
    weight_bytes = spec.weight_bytes
    rows = {
        "hardware": args.hardware,
        "device": profile["device"],
        "params": spec.num_params,
        "batch1_decode_floor_s": weight_bytes / (hardware.mem_bandwidth),
        "fit": profile["fit"],
        "prefill": [
            {
                "input_lens": row["input_lens"],
                "measured_s": row["time_s"],
                "analytic_s": model.prefill_time(
                    sum(row["input_lens"]),
                    sum(n * n for n in row["input_lens"]),
                    len(row["input_lens"]),
                ),
            }
            for row in profile["prefill"]
        ],
        "decode": [
            {
                "batch": row["batch_size"],
                "context_sum": row["context_len_sum"],
                "measured_s": row["time_s"],
                "analytic_s": model.decode_time(row["batch_size"], row["context_len_sum"]),
            }
            for row in profile["decode"]
        ],
    }
    (args.out / "gpu-check.json").write_text(json.dumps(rows, indent=1))
    for kind in ("prefill", "decode"):
        for row in rows[kind]:
            key = row.get("input_lens") or (row["batch"], row["context_sum"])
            ratio = row["measured_s"] / row["analytic_s"]
            print(
                f"{kind} {key}: measured {row['measured_s'] * 1e3:.2f} ms, "
                f"analytic {row['analytic_s'] * 1e3:.2f} ms, x{ratio:.1f}"
            )
    print(f"batch-1 decode floor {rows['batch1_decode_floor_s'] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
