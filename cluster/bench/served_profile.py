"""`placement profile --target ADDR`: profile a *served* deployment through its gRPC API, so
that the fitted latency model includes what serving adds around the engine (router, Ray
hops, the KV handoff, streaming each token), not only the engine's steps.

    prefill rows   k requests of L prompt tokens sent together at zero load, one output
                   token each: the batch's time is the last TTFT the client sees
    decode rows    B requests of C prompt tokens sent together, N output tokens each: the
                   row's time is the median TPOT, its Σctx is B x (C + N/2)

The rows have the shape `placement profile` writes for the bare engine, so `placement plan
--profile` and `cluster bench serve --profile` take either. A served profile measures one
instance at a time, so on a machine whose instances share cores it still misses the
contention between busy prefill and decode instances.
"""

from __future__ import annotations

import asyncio
import statistics
from datetime import UTC, datetime

import numpy as np

from cluster.bench.loadgen import GrpcBackend, RequestPlan, RequestRecord, build_requests
from cluster.placement.latency import fit_profile
from cluster.placement.model_spec import load_model_spec

PREFILL_LENS = (16, 64, 128, 256, 512, 1024)
PREFILL_BATCHES = (1, 2, 4)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (32, 256, 768)
DECODE_TOKENS = 24


async def _together(backend, plans: list[RequestPlan]) -> list[RequestRecord]:
    records = [RequestRecord(len(p.prompt_ids), p.output_len) for p in plans]
    await asyncio.gather(*(backend.send(p, r) for p, r in zip(plans, records, strict=True)))
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise ValueError(f"a profiling request failed: {failed[0]}")
    return records


def _plans(info: dict, lens: list[int], output_len: int, seed: int) -> list[RequestPlan]:
    n = len(lens)
    return build_requests(np.array(lens), np.full(n, output_len), np.zeros(n),
                          info["vocab_size"], info["max_model_len"], seed=seed)  # fmt: skip


async def _rows(backend, info: dict, quick: bool, repeats: int, seed: int):
    limit = info["max_model_len"] - DECODE_TOKENS - 1
    prefill, decode = [], []
    lens = [n for n in PREFILL_LENS if n <= limit][:: 2 if quick else 1]
    for n in lens:
        for k in PREFILL_BATCHES[: 2 if quick else 3]:
            times = []
            for r in range(repeats):
                records = await _together(backend, _plans(info, [n] * k, 1, seed + r))
                times.append(max(rec.ttft_s for rec in records))
            prefill.append({"input_lens": [n] * k, "time_s": statistics.median(times)})
    batches = DECODE_BATCHES[::2] if quick else DECODE_BATCHES
    for b in batches:
        for c in [c for c in DECODE_CONTEXTS if c <= limit]:
            tpots = []
            for r in range(repeats):
                records = await _together(backend, _plans(info, [c] * b, DECODE_TOKENS, seed + r))
                tpots += [rec.tpot_s for rec in records]
            decode.append({"batch_size": b, "context_len_sum": b * (c + DECODE_TOKENS // 2),
                           "time_s": statistics.median(tpots)})  # fmt: skip
    return prefill, decode


async def _profile(target: str, api_key: str | None, quick: bool, repeats: int, seed: int):
    async with GrpcBackend(target, api_key) as backend:
        info = await backend.model_info()
        await _together(backend, _plans(info, [16], 2, seed))  # warm-up
        prefill, decode = await _rows(backend, info, quick, repeats, seed)
    return info, prefill, decode


def profile_served(
    target: str,
    model: str | None = None,
    hardware: str = "CPU",
    api_key: str | None = None,
    quick: bool = False,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Profile the deployment at `target` (gRPC host:port). `model`: its checkpoint folder,
    for the model's shape (default: the embedded tiny model)."""
    from cluster.engine.tiny import default_model_dir

    spec = load_model_spec(str(model or default_model_dir()))
    info, prefill, decode = asyncio.run(_profile(target, api_key, quick, repeats, seed))
    profile = {
        "version": 1, "hardware": hardware, "device": f"served at {target}",
        "served": True, "model": spec.to_dict(), "dtype": spec.dtype, "tp": 1, "pp": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "prefill": prefill, "decode": decode,
    }  # fmt: skip
    profile["fit"] = fit_profile(profile)
    return profile
