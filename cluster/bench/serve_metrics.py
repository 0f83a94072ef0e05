"""From per-request records to the numbers of one benchmark run, under the keys of
`vllm bench serve --save-result` (so existing tooling reads them) plus ours: joint SLO
attainment (docs/architecture.md: the share of requests meeting the TTFT *and* the TPOT
target; a failed request meets neither) and the server's mean TTFT breakdown."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from cluster.bench.loadgen import RequestRecord

PERCENTILES = (90, 99)
BREAKDOWN = ("queue", "prefill", "transfer", "first_decode")


def meets(record: RequestRecord, ttft_s: float | None, tpot_s: float | None) -> bool:
    """Whether one request met its targets (None: that target is not checked). A request
    with a single output token has no TPOT and cannot miss it."""
    if not record.ok:
        return False
    if ttft_s is not None and record.ttft_s > ttft_s:
        return False
    tpot = record.tpot_s
    return tpot_s is None or tpot is None or tpot <= tpot_s


def attainment(records: list[RequestRecord], ttft_s: float | None, tpot_s: float | None):
    if not records:
        return 0.0
    return sum(meets(r, ttft_s, tpot_s) for r in records) / len(records)


def _stats(prefix: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1e3
    if ms.size == 0:
        ms = np.zeros(1)  # vLLM reports 0 for an empty metric rather than omitting it
    out = {
        f"mean_{prefix}_ms": float(ms.mean()),
        f"median_{prefix}_ms": float(np.median(ms)),
        f"std_{prefix}_ms": float(ms.std()),
    }
    for p in PERCENTILES:
        out[f"p{p}_{prefix}_ms"] = float(np.percentile(ms, p))
    return out


def summarize_run(
    records: list[RequestRecord],
    duration_s: float,
    request_rate: float,
    slo: dict[str, float],
    burstiness: float = 1.0,
) -> dict:
    """One run (one offered rate): the vLLM keys, attainment, breakdown, per-request arrays."""
    ok = [r for r in records if r.ok]
    ttft, tpot = slo["ttft_s"], slo["tpot_s"]
    good = sum(meets(r, ttft, tpot) for r in records)
    duration_s = max(duration_s, 1e-9)
    input_tokens = sum(r.input_len for r in ok)
    output_tokens = sum(r.num_output_tokens for r in ok)
    run = {
        "request_rate": request_rate,
        "burstiness": burstiness,
        "num_prompts": len(records),
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        **_stats("ttft", [r.ttft_s for r in ok]),
        **_stats("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]),
        **_stats("itl", [x for r in ok for x in r.itls_s]),
        **_stats("e2el", [r.e2e_s for r in ok]),
        "attainment": attainment(records, ttft, tpot),
        "ttft_attainment": attainment(records, ttft, None),
        "tpot_attainment": attainment(records, None, tpot),
        "breakdown_ms": _breakdown(ok),
        "input_lens": [r.input_len for r in records],
        "output_lens": [r.num_output_tokens for r in records],
        "ttfts": [r.ttft_s if r.ok else None for r in records],
        "tpots": [r.tpot_s for r in records],
        "itls": [r.itls_s for r in records],
        "e2els": [r.e2e_s if r.ok else None for r in records],
        "errors": [r.error for r in records],
        "breakdowns": [r.breakdown_s for r in records],
    }
    return run


def _breakdown(ok: list[RequestRecord]) -> dict[str, float] | None:
    parts = [r.breakdown_s for r in ok if r.breakdown_s]
    if not parts:
        return None
    return {key: float(np.mean([p[key] for p in parts])) * 1e3 for key in BREAKDOWN}


def attainment_curve(runs: list[dict]) -> list[dict]:
    """Runs grouped by offered rate, repeated trials averaged, sorted by rate."""
    by_rate: dict[float, list[dict]] = defaultdict(list)
    for run in runs:
        by_rate[round(run["request_rate"], 6)].append(run)
    curve = []
    for rate in sorted(by_rate):
        group = by_rate[rate]
        entry = {"rate": rate, "trials": len(group)}
        for key in ("attainment", "ttft_attainment", "tpot_attainment"):
            entry[key] = float(np.mean([r[key] for r in group]))
        curve.append(entry)
    return curve


def rescore(run: dict, slo: dict[str, float]) -> float:
    """A run's joint attainment under other targets, from its per-request arrays."""
    ttfts, tpots = run["ttfts"], run["tpots"]
    if not ttfts:
        return 0.0
    good = 0
    for ttft, tpot in zip(ttfts, tpots, strict=True):
        if ttft is None or ttft > slo["ttft_s"]:
            continue
        good += tpot is None or tpot <= slo["tpot_s"]
    return good / len(ttfts)


def goodput_from_curve(curve: list[dict], target: float) -> float:
    """The highest measured rate whose attainment meets the target and every lower rate's
    does too (a pass above a failure is noise, not capacity)."""
    best = 0.0
    for point in curve:
        if point["attainment"] < target:
            break
        best = point["rate"]
    return best
