"""`cluster bench router`: what the serving path adds around the engine, and TTFT of
disaggregated against colocated serving at zero load.

1. Overhead. Engines with model_runner=noop (no model work; scheduling, blocks and the KV pool
   are real). Baseline: the same engine in this process (AsyncLLMEngine, no router, no RPC).
   Then `cluster serve` in a child process, colocated and disaggregated, driven by a gRPC
   client here, one request at a time. Added per request = p50 TTFT(cluster) - p50
   TTFT(engine); per token = p50 TPOT(cluster) - p50 TPOT(engine). In disaggregated mode the
   per-request figure includes the prefill -> decode handoff with its (real) KV pull.
   The serving tax (serving_tax.py): CPU seconds of every process of the served cluster per
   1,000 generated tokens at a steady rate, on the same servers.
2. TTFT at zero load with a real model (the engine bench's seeded random Llama), per prompt
   length, colocated against disaggregated, with the KV transfer part (server-reported
   `timing.transfer_s`) shown separately.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from cluster.bench import serving_tax
from cluster.bench.common import int_list, report, resolve
from cluster.bench.local_cluster import LocalCluster

DEFAULTS = {"requests": 200, "output_len": 32, "prompt_lens": (16, 256, 1024), "ttft_requests": 20,
            "tax_rate": 20.0, "tax_duration": 20.0}  # fmt: skip
QUICK = {"requests": 10, "output_len": 4, "prompt_lens": (16,), "ttft_requests": 3,
         "tax_rate": 10.0, "tax_duration": 1.0}  # fmt: skip
_NUM_BLOCKS = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    add("--output", type=Path, help="also write the JSON result to this file")
    add("--quick", action="store_true", help="a tiny run for tests")
    add("--requests", type=int, help=f"requests per overhead point ({DEFAULTS['requests']})")
    add("--output-len", type=int, help=f"tokens per request ({DEFAULTS['output_len']})")
    add("--prompt-lens", type=int_list, help="TTFT prompt lengths (16,256,1024)")
    add("--ttft-requests", type=int, help="requests per TTFT point (20)")
    add("--model", help="model for the TTFT part (default: the engine bench's 8-layer Llama)")
    add("--skip-ttft", action="store_true", help="only the overhead part")
    add("--tax-rate", type=float, help="requests/s for the serving tax (20)")
    add("--tax-duration", type=float, help="seconds of load for the serving tax (20)")


def run(args: argparse.Namespace) -> dict:
    opt = {k: resolve(args, k, DEFAULTS, QUICK) for k in DEFAULTS}
    with tempfile.TemporaryDirectory(prefix="pd-bench-router-") as tmp:
        tiny = _tiny_model()
        overhead = {"engine": _engine_baseline(tiny, opt)}
        tax = {}
        for mode in ("colocated", "disaggregated"):
            with _server(tiny, mode, "noop") as server:
                overhead[mode] = _cluster_run(server.target, opt, [5, 6, 7, 8])
                tax[mode] = serving_tax.measure(
                    server.target, server.proc.pid, opt["tax_rate"], opt["tax_duration"], 32
                )
        ttft = []
        if not args.skip_ttft:
            model = args.model or _bench_model(Path(tmp), quick=args.quick)
            for mode in ("colocated", "disaggregated"):
                with _server(model, mode, "model") as server:
                    for n in opt["prompt_lens"]:
                        prompt = [3 + (i * 7) % 500 for i in range(n)]
                        point = _cluster_run(
                            server.target,
                            {**opt, "requests": opt["ttft_requests"], "output_len": 2},
                            prompt,
                            distinct=True,
                        )
                        ttft.append({"mode": mode, "prompt_len": n, **point})
    result = _summarise(overhead, ttft, opt)
    result["tax"] = tax
    report(result, format_table(result), args)
    return result


# -- the runs -------------------------------------------------------------------------------


def _engine_baseline(model: str, opt: dict) -> dict:
    """The noop engine in this process: first token and token gaps, no serving around it."""
    from cluster.engine.async_engine import AsyncLLMEngine
    from cluster.engine.config import CacheConfig, EngineConfig
    from cluster.engine.sampling_params import SamplingParams

    config = EngineConfig(model=model, model_runner="noop", cache=CacheConfig(_NUM_BLOCKS))
    engine = AsyncLLMEngine.from_config(config)
    params = SamplingParams(max_tokens=opt["output_len"], temperature=0.0, ignore_eos=True)

    async def one(i: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        times = []
        async for _ in engine.generate([5, 6, 7, 8], params, f"r{i}"):
            times.append(time.perf_counter())
        return times[0] - start, _tpot(times)

    async def all_() -> list:
        return [await one(i) for i in range(opt["requests"])]

    try:
        runs = asyncio.run(all_())
    finally:
        engine.shutdown()
    return _stats(runs)


def _cluster_run(target: str, opt: dict, prompt: list[int], distinct: bool = False) -> dict:
    """Sequential gRPC requests; client-side TTFT and ITL, plus the server's timing."""
    import grpc

    from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
    from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc

    params = pb.SamplingParams(max_tokens=opt["output_len"], temperature=0, ignore_eos=True)
    runs, transfer, server_ttft = [], [], []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PDClusterStub(channel)
        for i in range(opt["requests"] + 1):  # the first warms connections and caches
            ids = [(prompt[0] + i) % 500 + 3, *prompt[1:]] if distinct else prompt
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=ids), sampling_params=params, cache_salt=f"{i}"
            )
            start = time.perf_counter()
            times, last = [], None
            for response in stub.Generate(request, timeout=600):
                times += [time.perf_counter()] * max(1, len(response.token_ids))
                last = response
            if i == 0:
                continue
            runs.append((times[0] - start, _tpot(times)))
            transfer.append(last.timing.transfer_s)
            server_ttft.append(last.timing.ttft_s)
    out = _stats(runs)
    out["transfer_p50_s"] = statistics.median(transfer)
    out["server_ttft_p50_s"] = statistics.median(server_ttft)
    return out


def _tpot(times: list[float]) -> float:
    """Time per output token after the first, per docs/architecture.md (one timestamp per token)."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0


def _stats(runs: list[tuple[float, float]]) -> dict:
    ttfts = [t for t, _ in runs]
    tpots = [t for _, t in runs]
    return {
        "num_requests": len(runs),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p90_s": _quantile(ttfts, 0.9),
        "tpot_p50_s": statistics.median(tpots),
        "tpot_p90_s": _quantile(tpots, 0.9),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summarise(overhead: dict, ttft: list[dict], opt: dict) -> dict:
    base = overhead["engine"]
    added = {
        mode: {
            "per_request_ms": (overhead[mode]["ttft_p50_s"] - base["ttft_p50_s"]) * 1e3,
            "per_token_ms": (overhead[mode]["tpot_p50_s"] - base["tpot_p50_s"]) * 1e3,
        }
        for mode in ("colocated", "disaggregated")
    }
    for point in ttft:
        point["transfer_share"] = point["transfer_p50_s"] / point["server_ttft_p50_s"]
    return {"options": opt, "overhead": overhead, "added": added, "ttft": ttft}


def format_table(result: dict) -> str:
    o, a = result["overhead"], result["added"]
    lines = [
        "serving overhead (noop engine, zero load, p50; client-side over gRPC)",
        f"{'path':<16}{'TTFT ms':>10}{'TPOT ms':>10}{'added/req ms':>15}{'added/token ms':>16}",
    ]
    for path in ("engine", "colocated", "disaggregated"):
        extra = a.get(path)
        lines.append(
            f"{path:<16}{o[path]['ttft_p50_s'] * 1e3:>10.2f}{o[path]['tpot_p50_s'] * 1e3:>10.3f}"
            + (
                f"{extra['per_request_ms']:>15.2f}{extra['per_token_ms']:>16.3f}"
                if extra
                else f"{'-':>15}{'-':>16}"
            )
        )
    if result.get("tax"):
        lines += ["", "serving tax (noop engine, steady rate; CPU s of every server process)"]
        for mode, t in result["tax"].items():
            lines.append(
                f"{mode:<16}{t['cpu_s_per_1k_tokens']:>8.3f} CPU s / 1k tokens "
                f"({t['cpu_s']:.2f} s for {t['generated_tokens']} tokens at {t['rate']:g} req/s)"
            )
    if result["ttft"]:
        lines += [
            "",
            "TTFT at zero load (real model, p50)",
            f"{'prompt':>7}{'mode':>15}{'TTFT ms':>10}{'transfer ms':>13}{'share':>8}",
        ]
        for p in result["ttft"]:
            lines.append(
                f"{p['prompt_len']:>7}{p['mode']:>15}{p['ttft_p50_s'] * 1e3:>10.1f}"
                f"{p['transfer_p50_s'] * 1e3:>13.2f}{p['transfer_share']:>8.1%}"
            )
    return "\n".join(lines)


# -- helpers --------------------------------------------------------------------------------


def _tiny_model() -> str:
    from cluster.engine.tiny import default_model_dir

    return str(default_model_dir())


def _bench_model(tmp: Path, quick: bool) -> str:
    from cluster.bench.engine_bench import DEFAULTS as ENGINE
    from cluster.bench.engine_bench import QUICK as ENGINE_QUICK
    from cluster.bench.engine_bench import ModelShape, write_checkpoint

    preset = ENGINE_QUICK if quick else ENGINE
    shape = ModelShape(preset["num_layers"], preset["hidden_size"], max_position_embeddings=4096)
    return str(write_checkpoint(tmp / "bench-model", shape, seed=0))


def _server(model: str, mode: str, runner: str) -> LocalCluster:
    engine = {"model_runner": runner, "num_blocks": _NUM_BLOCKS}
    return LocalCluster({"model": model, "mode": mode, "engine": engine})
