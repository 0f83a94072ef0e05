"""`cluster bench routing`: KV-aware routing (`router: {policy: kv}`) against load-based
routing (`policy: load`, the default) on the same multi-turn workload at the same session
rates (multiturn.py), each policy on its own freshly started cluster.

    per policy, per rate   p50/p90 TTFT and TPOT, joint SLO attainment, prefix hit ratios
                           (all, prefill instances', decode instances': cache_figures), KV
                           bytes pulled per request and per follow-up turn, the share of
                           prompts prefilled on the decode instance (timing.local_prefill)
    per policy             goodput: the highest session rate meeting the attainment target
                           with every lower rate meeting it too
    ratios                 load / kv P90 TTFT at each rate, kv / load goodput

The rate is sessions started per second; requests per second come with it. `--workload
random` sends the same prompt lengths as one-turn requests that share nothing, at the same
request rate: the control, where remembering prefixes cannot help and kv must not lose.
With `--emulate` the clusters are emulated accelerators (cluster/emulate.py) running
`--time-scale` times slower; every figure comes back in the emulated hardware's time and the
result says it is emulated. `--target` measures a running cluster under the one policy it
runs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.bench.common import int_list, resolve, run_reported
from cluster.bench.loadgen import BenchError, GrpcBackend, RequestPlan, RequestRecord
from cluster.bench.multiturn import (
    MOONCAKE_BLOCK_TOKENS,
    Conversations,
    Session,
    SessionSpec,
    build_sessions,
    load_trace,
    retime,
    run_sessions,
    save_trace,
    session_rate_of,
    single_turns,
)
from cluster.bench.serve_bench import to_real_world
from cluster.bench.serve_metrics import goodput_from_curve, summarize_run

POLICIES = ("load", "kv")
# The tiny model on CPU (SLOs tight enough that its load shows on a small machine).
DEFAULTS = {"rates": (1.0, 2.0, 4.0, 8.0), "duration": 20.0, "max_sessions": 200,
            "system_prompts": 4, "system_len": 512, "turns": (2, 6), "user_len": 64,
            "answer_len": 32, "think_time": 2.0, "ttft": 0.1, "tpot": 0.025,
            "prefill": 2, "decode": 1, "time_scale": 1.0}  # fmt: skip
# OPT-13B-sized conversations on emulated A100s; SLOs: DistServe's chatbot targets.
EMULATED = {**DEFAULTS, "rates": (1.0, 2.0, 4.0), "duration": 30.0, "user_len": 128,
            "answer_len": 128, "ttft": 0.25, "tpot": 0.1, "prefill": 4, "decode": 2,
            "time_scale": 8.0}  # fmt: skip
QUICK = {**DEFAULTS, "rates": (1.0,), "duration": 2.0, "max_sessions": 3, "system_prompts": 2,
         "system_len": 64, "turns": (2, 2), "user_len": 16, "answer_len": 4,
         "think_time": 0.1}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    add("--output", type=Path, help="also write the JSON result to this file")
    add("--quick", action="store_true", help="a tiny run for tests")
    add("--policies", default=",".join(POLICIES),
        help="router policies to compare (load,kv); with --target: the one it runs")  # fmt: skip
    add("--workload", choices=("multiturn", "random"), default="multiturn",
        help="random: the same lengths as one-turn requests sharing no prefix")  # fmt: skip
    add("--rates", type=_float_list, help="session rates, sessions/s (1,2,4,8; emulated 1,2,4)")
    add("--duration", type=float, help="seconds of session arrivals per rate (20; emulated 30)")
    add("--max-sessions", type=int, help="sessions per rate at most (200)")
    add("--ttft", type=float, help="TTFT target, seconds (0.1; emulated 0.25)")
    add("--tpot", type=float, help="TPOT target, seconds (0.025; emulated 0.1)")
    add("--attainment", type=float, default=0.9, help="SLO attainment target of goodput")
    add("--seed", type=int, default=0)
    w = parser.add_argument_group("the conversations")
    w.add_argument("--system-prompts", type=int, help="distinct shared system prompts (4)")
    w.add_argument("--system-len", type=int, help="tokens of a system prompt (512)")
    w.add_argument("--turns", type=int_list, help="turns per session: N or MIN,MAX (2,6)")
    w.add_argument("--user-len", type=int, help="mean tokens of a user message (64)")
    w.add_argument("--user-spread", type=float, default=0.5,
                   help="user messages are uniform in mean x [1 - s, 1 + s]")  # fmt: skip
    w.add_argument("--answer-len", type=int, help="output tokens per turn (32)")
    w.add_argument("--think-time", type=float, help="mean seconds between answer and turn (2)")
    t = parser.add_argument_group("traces")
    t.add_argument("--trace", type=Path, help="replay this JSONL trace instead (see docs)")
    t.add_argument("--save-trace", type=Path, help="write the first rate's workload here")
    t.add_argument("--replay", choices=("closed", "fixed"),
                   help="closed: think times after answers; fixed: the timestamps (default: "
                   "closed when every follow-up turn has think_time)")  # fmt: skip
    t.add_argument("--block-tokens", type=int, default=MOONCAKE_BLOCK_TOKENS,
                   help="tokens per hash id of Mooncake-style lines (512)")  # fmt: skip
    d = parser.add_argument_group("the deployment")
    d.add_argument("--prefill", type=int, help="prefill instances (2; emulated 4)")
    d.add_argument("--decode", type=int, help="decode instances (1; emulated 2)")
    d.add_argument("--model", help="checkpoint folder (default: the tiny model); with "
                   "--emulate: a preset such as opt-13b or a config.json")  # fmt: skip
    d.add_argument(
        "--emulate",
        metavar="HARDWARE",
        help="serve emulated instances of this catalog hardware (e.g. A100-80GB)",
    )
    d.add_argument("--time-scale", type=float,
                   help="the emulated cluster runs this many times slower (8)")  # fmt: skip
    d.add_argument("--tp", type=int, default=1,
                   help="with --emulate: each instance stands for this many devices, "
                        "tensor-parallel (1)")  # fmt: skip
    d.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        help="kv: router.local_prefill_max_tokens (default: the router's)",
    )
    d.add_argument("--local-prefill-tpot", type=float,
                   help="kv: router.local_prefill_tpot_s, seconds (emulated seconds under "
                        "--emulate; default: unset)")  # fmt: skip
    d.add_argument("--target", help="host:port of a running cluster (gRPC) to measure instead")
    d.add_argument("--api-key", default=None)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 0.5,1,2, got {text!r}")
    return tuple(sorted(values))


@dataclass(slots=True, frozen=True)
class Options:
    """Every setting of one benchmark, resolved once from the command line."""

    policies: tuple[str, ...]
    workload: str
    rates: tuple[float, ...]  # sessions/s (a trace without --rates: its own)
    duration_s: float
    max_sessions: int
    slo: dict
    seed: int
    conversations: Conversations
    trace: tuple[SessionSpec, ...] | None
    save_trace: Path | None
    fixed_timing: bool
    block_tokens: int
    prefill: int
    decode: int
    model: str | None
    emulate: str | None
    time_scale: float
    tp: int
    local_prefill: dict  # router settings of conditional disaggregation, as given
    target: str | None
    api_key: str | None

    @property
    def kv_bytes_scale(self) -> float:
        """Emulated instances pull stand-in blocks; this turns their bytes into the model's."""
        if not self.emulate:
            return 1.0
        from cluster.engine.emulation import STANDIN_HEAD_DIM
        from cluster.placement.model_spec import load_model_spec

        standin = 2 * STANDIN_HEAD_DIM * 4  # K and V, fp32, one layer, one head
        return load_model_spec(self.model).kv_bytes_per_token / standin


def _options(args: argparse.Namespace) -> Options:
    defaults = EMULATED if args.emulate else DEFAULTS
    opt = {k: resolve(args, k, defaults, QUICK) for k in DEFAULTS}
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or not policies:
        raise ValueError(f"--policies: unknown {unknown}; known: {', '.join(POLICIES)}")
    if args.emulate and not args.model:
        raise ValueError("--emulate needs --model: a preset (e.g. opt-13b) or a config.json")
    if opt["ttft"] <= 0 or opt["tpot"] <= 0 or not 0 < args.attainment <= 1:
        raise ValueError("--ttft and --tpot must be > 0 and --attainment in (0, 1]")
    if opt["time_scale"] < 1:
        raise ValueError("--time-scale must be >= 1")
    if args.tp < 1 or (args.tp > 1 and not args.emulate):
        raise ValueError("--tp must be >= 1, and above 1 only with --emulate")
    conversations = Conversations(
        opt["system_prompts"], opt["system_len"], opt["turns"], opt["user_len"],
        args.user_spread, opt["answer_len"], opt["think_time"],
    )  # fmt: skip
    trace = tuple(load_trace(args.trace, opt["system_len"])) if args.trace else None
    rates = opt["rates"] if trace is None else args.rates or (session_rate_of(list(trace)),)
    replay = args.replay or ("closed" if _has_think_times(trace) else "fixed")
    return Options(
        policies=policies,
        workload=args.workload,
        rates=rates,
        duration_s=opt["duration"],
        max_sessions=opt["max_sessions"],
        slo={"ttft_s": opt["ttft"], "tpot_s": opt["tpot"], "attainment": args.attainment},
        seed=args.seed,
        conversations=conversations,
        trace=trace,
        save_trace=args.save_trace,
        fixed_timing=replay == "fixed",
        block_tokens=args.block_tokens,
        prefill=opt["prefill"],
        decode=opt["decode"],
        model=args.model,
        emulate=args.emulate,
        time_scale=opt["time_scale"],
        tp=args.tp,
        local_prefill=_local_prefill(args, opt["time_scale"] if args.emulate else 1.0),
        target=args.target,
        api_key=args.api_key,
    )


def _has_think_times(trace: tuple[SessionSpec, ...] | None) -> bool:
    if trace is None:
        return True
    return all(t.think_time_s is not None for s in trace for t in s.turns[1:])


def run(args: argparse.Namespace) -> dict:
    opt = _options(args)
    return run_reported(args, lambda: _run(opt), format_table)


def _run(opt: Options) -> dict:
    from cluster.bench.local_cluster import LocalCluster

    started = datetime.datetime.now().isoformat(timespec="seconds")
    policies = {}
    if opt.target:  # one policy: whichever the cluster there runs
        label = opt.policies[0] if len(opt.policies) == 1 else "target"
        policies[label] = asyncio.run(_measure(opt, opt.target, label))
        policies[label]["deployment"] = f"the cluster at {opt.target} (its policy: {label})"
    else:
        for policy in opt.policies:
            config = serve_config(opt, policy)
            print(f"routing bench: policy {policy}, {describe(opt)}", file=sys.stderr)
            with LocalCluster(config) as cluster:
                policies[policy] = asyncio.run(_measure(opt, cluster.target, policy))
            policies[policy]["deployment"] = describe(opt)
    return {
        "workload": _workload_summary(opt),
        "slo": opt.slo,
        "emulated": _emulated(opt),
        "router": opt.local_prefill,  # (router seconds)
        "policies": policies,
        "ratios": ratios(policies),
        "machine": machine(),
        "date": started,
    }


# -- the deployments --------------------------------------------------------------------------


def serve_config(opt: Options, policy: str) -> dict:
    """The `cluster serve --config` mapping of one policy's cluster. Validated here, so a
    router without the setting fails with its own message, not a silent child process."""
    from cluster.launch import DeploymentConfig

    router = {"policy": policy, **opt.local_prefill}
    if opt.emulate:  # the engines' seats and KV are the limits, as in emulated_bench
        router.update(max_in_flight=100_000, max_queued=100_000)
    config = DeploymentConfig(
        model=None if opt.emulate else opt.model,
        mode="disaggregated",
        router=router,
    )
    config.prefill.num_instances, config.decode.num_instances = opt.prefill, opt.decode
    if opt.tp > 1:
        config.engine["tensor_parallel_size"] = opt.tp
    config.router_settings()  # ValueError: this build's router has no such policy
    if opt.emulate:
        from cluster.emulate import EmulationSettings, emulate

        emulate(config, EmulationSettings(opt.emulate, opt.model, opt.time_scale))
    return dataclasses.asdict(config)


def _local_prefill(args: argparse.Namespace, time_scale: float) -> dict:
    """The kv policy's conditional-disaggregation settings given on the command line, in the
    router's seconds (a TPOT target in emulated seconds runs time_scale times longer)."""
    out = {}
    if args.local_prefill_max_tokens is not None:
        out["local_prefill_max_tokens"] = args.local_prefill_max_tokens
    if args.local_prefill_tpot is not None:
        out["local_prefill_tpot_s"] = args.local_prefill_tpot * time_scale
    return out


def describe(opt: Options) -> str:
    if opt.emulate:
        tp = f" TP{opt.tp}" if opt.tp > 1 else ""
        return (f"{opt.prefill} prefill + {opt.decode} decode{tp}, emulated {opt.model} on "
                f"{opt.emulate}, time scale {opt.time_scale:g}")  # fmt: skip
    return f"{opt.prefill} prefill + {opt.decode} decode, {opt.model or 'tiny model'}, CPU"


def _emulated(opt: Options) -> dict | None:
    if not opt.emulate:
        return None
    return {"hardware": opt.emulate, "model": opt.model, "time_scale": opt.time_scale,
            "kv_bytes_scale": opt.kv_bytes_scale,
            "note": "emulated accelerators: every figure is the emulator's, in the emulated "
                    "hardware's time, not measured on it"}  # fmt: skip


# -- measuring one policy ---------------------------------------------------------------------


async def _measure(opt: Options, target: str, policy: str) -> dict:
    async with GrpcBackend(target, opt.api_key) as backend:
        info = await backend.model_info()
        await _warm_up(backend, info)
        runs = []
        for index, rate in enumerate(opt.rates):
            runs.append(await _run_rate(backend, opt, info, rate, index))
            print(_run_line(policy, runs[-1]), file=sys.stderr)
    return {
        "policy": policy,
        "model": info["model_id"],
        "instances": len(info["instances"]),
        "runs": runs,
        **_goodput(runs, opt.slo["attainment"]),
    }


async def _run_rate(backend, opt: Options, info: dict, rate: float, index: int) -> dict:
    load = _workload(opt, rate, index, info)
    if index == 0 and opt.save_trace:  # the same for every policy: same seed
        save_trace(load.specs, opt.save_trace)
    # Every session starts, and has until twice its last turn's nominal time to finish
    # (closed-loop turns leave later than nominal: after their answers).
    last = max(t.timestamp_s for s in load.sessions for t in s.turns)
    cap = max(opt.duration_s, last + 1.0) * opt.time_scale
    records, duration = await run_sessions(
        backend, load.sessions, opt.time_scale, cap, opt.fixed_timing
    )
    run = figures(records, duration, (rate, load.request_rate), opt)
    run["num_turns_planned"] = sum(len(s.turns) for s in load.sessions)
    return run


@dataclass(slots=True, frozen=True)
class _Load:
    specs: list[SessionSpec]  # as sent (what --save-trace writes)
    sessions: list[Session]
    request_rate: float  # offered: the session rate x turns per session


def _workload(opt: Options, rate: float, index: int, info: dict) -> _Load:
    """One rate's sessions. Each rate draws fresh prompts (seed + index), so no run finds
    another's prefixes in a cache. The random workload sends the same prompts' lengths as
    one-turn requests at the multi-turn workload's request rate."""
    seed = opt.seed + index
    if opt.trace is not None:
        specs = retime(list(opt.trace), session_rate_of(list(opt.trace)) / rate)
    else:
        n = int(np.clip(round(rate * opt.duration_s), 1, opt.max_sessions))
        specs = dataclasses.replace(opt.conversations, session_rate=rate).sample(n, seed)
    vocab, max_len = info["vocab_size"], info["max_model_len"]
    sessions = build_sessions(specs, vocab, max_len, seed, opt.block_tokens)
    request_rate = rate * sum(len(s.turns) for s in sessions) / len(sessions)
    if opt.workload == "random":
        specs = single_turns(sessions, request_rate, seed)
        sessions = build_sessions(specs, vocab, max_len, seed, opt.block_tokens)
    return _Load(specs, sessions, request_rate)


async def _warm_up(backend: GrpcBackend, info: dict) -> None:
    """One short request before the first run (connections, lazy paths); its failure fails
    the benchmark."""
    record = RequestRecord(16, 4)
    ids = np.random.default_rng(12345).integers(3, info["vocab_size"], 16).tolist()
    await backend.send(RequestPlan(ids, 4, 0.0), record)
    if not record.ok:
        raise BenchError(f"the warm-up request failed: {record.error}")


# -- the figures ------------------------------------------------------------------------------


def figures(
    records: list[RequestRecord], duration_s: float, rates: tuple[float, float], opt: Options
) -> dict:
    """One run in real-world units: its (session, offered request) rates, latencies,
    attainment, and what the caches did."""
    rate, request_rate = rates
    k = opt.time_scale
    slo = {**opt.slo, "ttft_s": opt.slo["ttft_s"] * k, "tpot_s": opt.slo["tpot_s"] * k}
    run = to_real_world(summarize_run(records, duration_s, rate / k, slo), k)
    out = {
        "session_rate": rate,
        "request_rate": request_rate,
        "request_throughput": run["request_throughput"],
        "num_sessions": len({r.session_id for r in records}),
        "num_requests": len(records),
        "completed": run["completed"],
        "failed": run["failed"],
        "ttft_p50_ms": run["median_ttft_ms"],
        "ttft_p90_ms": run["p90_ttft_ms"],
        "tpot_p50_ms": run["median_tpot_ms"],
        "tpot_p90_ms": run["p90_tpot_ms"],
        "attainment": run["attainment"],
        "ttft_attainment": run["ttft_attainment"],
        "tpot_attainment": run["tpot_attainment"],
        **cache_figures(records, opt.kv_bytes_scale),
        "first_error": next((r.error for r in records if r.error), None),
    }
    if opt.fixed_timing:
        delays = [r.send_delay_s / k for r in records]
        out["send_delay_p90_ms"] = float(np.percentile(delays, 90)) * 1e3 if delays else 0.0
    return out


def cache_figures(records: list[RequestRecord], kv_bytes_scale: float = 1.0) -> dict:
    """What the caches saved, over the prompt tokens of completed requests. The server's
    usage.cached_tokens counts the hits of the instance that ran the prompt (the prefill
    instance on a handoff, the decode instance on a local prefill), timing.kv_hit_tokens
    the tokens a decode instance already had on a handoff, so did not pull. So:

        prefix_hit_ratio    cached_tokens: prompt tokens not recomputed, wherever it ran
        prefill_hit_ratio   cached_tokens of handoffs: the prefill instances' hits
        decode_hit_ratio    kv_hit_tokens + cached_tokens of local prefills: the decode
                            instances' hits (tokens neither pulled nor recomputed there)

    (cached_tokens + kv_hit_tokens would count a token twice when both ends of a handoff
    had it.) Also KV bytes pulled per request and per follow-up turn, and the share of
    local prefills. None where the server does not report a figure."""
    ok = [r for r in records if r.ok]
    prompt_tokens = max(1, sum(r.input_len for r in ok))
    reported = [r for r in ok if r.cached_tokens is not None]
    local = sum(r.cached_tokens for r in reported if r.local_prefill)
    cached = sum(r.cached_tokens for r in reported)
    hits = [r.kv_hit_tokens for r in ok if r.kv_hit_tokens is not None]
    flags = [r.local_prefill for r in ok if r.local_prefill is not None]
    return {
        "prefix_hit_ratio": cached / prompt_tokens if reported else None,
        "prefill_hit_ratio": (cached - local) / prompt_tokens if reported else None,
        "decode_hit_ratio": (local + sum(hits)) / prompt_tokens if hits or local else None,
        "kv_bytes_per_request": _mean_bytes(ok, kv_bytes_scale),
        "kv_bytes_per_followup": _mean_bytes([r for r in ok if r.turn >= 1], kv_bytes_scale),
        "local_prefill_share": float(np.mean(flags)) if flags else None,
    }


def _mean_bytes(records: list[RequestRecord], scale: float) -> float | None:
    values = [r.kv_bytes for r in records if r.kv_bytes is not None]
    return float(np.mean(values)) * scale if values else None


def _goodput(runs: list[dict], target: float) -> dict:
    curve = [{"rate": r["session_rate"], "attainment": r["attainment"]} for r in runs]
    goodput = goodput_from_curve(sorted(curve, key=lambda p: p["rate"]), target)
    at = next((r for r in runs if r["session_rate"] == goodput), None)
    return {
        "goodput_session_rate": goodput,
        "goodput_request_rate": at["request_rate"] if at else 0.0,
    }


def ratios(policies: dict) -> dict:
    """load / kv P90 TTFT at each rate both ran (above 1: kv is faster), kv / load goodput."""
    if not all(p in policies for p in POLICIES):
        return {}
    load, kv = policies["load"], policies["kv"]
    kv_runs = {r["session_rate"]: r for r in kv["runs"]}
    p90 = [
        {"session_rate": r["session_rate"],
         "load_over_kv": r["ttft_p90_ms"] / kv_runs[r["session_rate"]]["ttft_p90_ms"]}
        for r in load["runs"]
        if r["session_rate"] in kv_runs and kv_runs[r["session_rate"]]["ttft_p90_ms"] > 0
    ]  # fmt: skip
    base = load["goodput_session_rate"]
    return {
        "p90_ttft_load_over_kv": p90,
        "goodput_kv_over_load": kv["goodput_session_rate"] / base if base else None,
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]}  # fmt: skip


def _workload_summary(opt: Options) -> dict:
    if opt.trace is not None:
        source = {"trace_sessions": len(opt.trace), "trace_turns": sum(len(s.turns) for s in
                                                                        opt.trace)}  # fmt: skip
    else:
        source = {"conversations": dataclasses.asdict(opt.conversations)}
    return {"kind": opt.workload, "replay": "fixed" if opt.fixed_timing else "closed",
            "duration_s": opt.duration_s, "max_sessions": opt.max_sessions, "seed": opt.seed,
            **source}  # fmt: skip


# -- output -------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _run_line(policy: str, run: dict) -> str:
    return (
        f"  {policy} at {run['session_rate']:g} sessions/s ({run['request_rate']:.2f} req/s): "
        f"{run['completed']}/{run['num_requests']} done, attainment {run['attainment']:.1%}, "
        f"p90 TTFT {run['ttft_p90_ms']:.0f} ms, prefix hits {_pct(run['prefix_hit_ratio'])}, "
        f"local prefills {_pct(run['local_prefill_share'])}"
    )


def format_table(result: dict) -> str:
    emulated = result["emulated"]
    title = f"routing: {result['workload']['kind']} workload"
    if emulated:
        title += f" -- EMULATED {emulated['model']} on {emulated['hardware']} (not measured on it)"
    lines = [
        title,
        f"{'policy':<8}{'sess/s':>7}{'req/s':>7}{'TTFT p50/p90 ms':>17}{'TPOT p50/p90 ms':>17}"
        f"{'attain':>8}{'hit':>5}{'pf':>5}{'dec':>5}{'KV MB/req':>10}{'/follow':>9}{'local':>6}",
    ]
    for name, policy in result["policies"].items():
        for r in policy["runs"]:
            lines.append(
                f"{name:<8}{r['session_rate']:>7.3g}{r['request_rate']:>7.2f}"
                f"{r['ttft_p50_ms']:>8.0f}/{r['ttft_p90_ms']:<8.0f}"
                f"{r['tpot_p50_ms']:>8.1f}/{r['tpot_p90_ms']:<8.1f}{r['attainment']:>8.1%}"
                f"{_pct(r['prefix_hit_ratio']):>5}{_pct(r['prefill_hit_ratio']):>5}"
                f"{_pct(r['decode_hit_ratio']):>5}{_mb(r['kv_bytes_per_request']):>10}"
                f"{_mb(r['kv_bytes_per_followup']):>9}{_pct(r['local_prefill_share']):>6}"
            )
    goodputs = ", ".join(
        f"{name} {p['goodput_session_rate']:g} sessions/s ({p['goodput_request_rate']:.2f} req/s)"
        for name, p in result["policies"].items()
    )
    lines.append(f"goodput at {result['slo']['attainment']:.0%} attainment: {goodputs}")
    r = result["ratios"]
    if r:
        per_rate = ", ".join(f"{p['session_rate']:g}: {p['load_over_kv']:.2f}x"
                             for p in r["p90_ttft_load_over_kv"])  # fmt: skip
        g = r["goodput_kv_over_load"]
        lines.append(f"P90 TTFT load/kv by rate: {per_rate or '-'}; goodput kv/load: "
                     f"{'-' if g is None else f'{g:.2f}x'}")  # fmt: skip
    return "\n".join(lines)
