"""`cluster bench elastic`: elastic pools (issue 17) against static peak provisioning on a
trace whose load shifts. Each variant gets its own freshly started emulated cluster:

    elastic          starts at 1 prefill + 1 decode; the autoscaler adds, removes and flips
    elastic-noflip   the same, with role flipping off
    static-peak      no autoscaler: the pools the planner sizes for the trace's peak phase

The trace is phases of `--phase-s` each, deterministic by seed: Poisson arrivals at a
multiple of `--base-rate`, lengths log-normal (a tail, clipped to the context) from a mix,
chat (short prompts, long answers) or summarization (long prompts, short answers). The
default steps the rate 1x -> 3x -> 1x while the mix shifts from chat to summarization.

Mixed hardware: `--prefill-hardware A,B` and `--decode-hardware C,D` (catalog names; default:
the --emulate type) are the types the autoscaler may choose from (`autoscale.hardware`); its
pools start on the first of each. The static plan is the cheapest pair of types (per
GPU-hour, choose_types' rule) whose largest per-phase pools meet the target in every phase.

While a variant runs, /metrics is sampled every 0.5 s (pool sizes, devices held and their
device-seconds and cost, scaling actions, failed requests). Per window of `--window-s` it
reports the joint SLO attainment of the requests arriving in it (failed requests miss) and the
pools it ran with; windows starting within `--reaction-s` of a phase change are reported but
left out of the "every window meets the target" check. Every rate, SLO and duration is in the
emulated hardware's seconds: the cluster runs `--time-scale` times slower (docs/emulation.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import sys
import time
import urllib.request
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cluster.bench.common import run_reported
from cluster.bench.loadgen import (
    BenchError,
    GrpcBackend,
    RequestPlan,
    RequestRecord,
    build_requests,
    run_open_loop,
)
from cluster.bench.routing_bench import machine
from cluster.bench.serve_metrics import meets
from cluster.elastic.settings import AutoscaleSettings
from cluster.placement import sizing
from cluster.placement.hardware import load_catalog
from cluster.placement.model_spec import load_model_spec
from cluster.placement.workload import LengthDist, Workload

VARIANTS = ("elastic", "elastic-noflip", "static-peak")
ROLES = ("prefill", "decode")
DEFAULT_PHASES = "1:chat,3:chat,3:summarization,1:summarization"
SAMPLE_INTERVAL_S = 0.5  # real seconds between /metrics samples


def mixes(max_model_len: int) -> dict[str, Workload]:
    """The length mixes (mean, coefficient of variation, floor), clipped to the context."""
    m = max_model_len
    return {
        "chat": Workload("chat", LengthDist(384, 0.35, 32, m), LengthDist(256, 0.5, 16, m)),
        "summarization": Workload(
            "summarization", LengthDist(2500, 0.25, 512, m), LengthDist(64, 0.5, 8, m)
        ),
    }


MIX_NAMES = tuple(mixes(8192))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    add("--output", type=Path, help="also write the JSON result to this file")
    add("--variants", default=",".join(VARIANTS), help=f"which to run ({','.join(VARIANTS)})")
    add("--seed", type=int, default=0)
    add(
        "--server-log",
        metavar="PREFIX",
        help="keep each variant's server log (its autoscaler's decisions) in PREFIX.VARIANT.log",
    )
    t = parser.add_argument_group("the trace (emulated seconds)")
    t.add_argument("--phases", default=DEFAULT_PHASES,
                   help=f"MULTIPLE:MIX,... ({DEFAULT_PHASES})")  # fmt: skip
    t.add_argument("--phase-s", type=float, default=40.0, help="seconds per phase (40)")
    t.add_argument("--base-rate", type=float, default=3.0, help="requests/s at 1x (3)")
    t.add_argument("--window-s", type=float, default=10.0, help="attainment window (10)")
    t.add_argument("--reaction-s", type=float, default=20.0,
                   help="windows this soon after a load change go unchecked (20)")  # fmt: skip
    s = parser.add_argument_group("the SLO (emulated seconds)")
    s.add_argument("--ttft", type=float, default=1.0, help="TTFT target (1.0)")
    s.add_argument("--tpot", type=float, default=0.1, help="TPOT target (0.1)")
    s.add_argument("--attainment", type=float, default=0.9, help="per-window target (0.9)")
    d = parser.add_argument_group("the deployment")
    d.add_argument("--emulate", default="A100-80GB", metavar="HARDWARE",
                   help="catalog hardware of the emulated instances (A100-80GB)")  # fmt: skip
    d.add_argument("--prefill-hardware", metavar="A,B",
                   help="types the prefill pool may run on (default: --emulate's)")  # fmt: skip
    d.add_argument("--decode-hardware", metavar="C,D",
                   help="types the decode pool may run on (default: --emulate's)")  # fmt: skip
    d.add_argument("--model", default="llama-3-8b", help="emulated model preset (llama-3-8b)")
    d.add_argument("--time-scale", type=float, default=4.0, help="runs this many times slower (4)")
    d.add_argument("--interval", type=float, default=2.0,
                   help="real seconds between the autoscaler's decisions (2)")  # fmt: skip
    d.add_argument("--min-gpus", type=int, default=2, help="elastic pools' floor (2)")
    d.add_argument("--max-gpus", type=int, default=8, help="elastic pools' ceiling (8)")
    headroom = AutoscaleSettings().headroom
    d.add_argument(
        "--headroom",
        type=float,
        default=headroom,
        help=f"the autoscaler sizes for the forecast rate x this ({headroom:g})",
    )
    d.add_argument("--static-prefill", type=int,
                   help="static-peak prefill instances (default: the planner's)")  # fmt: skip
    d.add_argument("--static-decode", type=int,
                   help="static-peak decode instances (default: the planner's)")  # fmt: skip


# -- options ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Phase:
    rate_multiple: float
    mix: str

    def describe(self) -> str:
        return f"{self.rate_multiple:g}x {self.mix}"


def parse_phases(text: str) -> tuple[Phase, ...]:
    """Phases from "1:chat,3:summarization"; ValueError says what is wrong."""
    phases = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        multiple, _, mix = item.partition(":")
        try:
            value = float(multiple)
        except ValueError:
            value = 0.0
        if value <= 0 or mix not in MIX_NAMES:
            raise ValueError(f"--phases: {item!r} is not RATE_MULTIPLE:MIX with a positive "
                             f"multiple and a mix of {', '.join(MIX_NAMES)}")  # fmt: skip
        phases.append(Phase(value, mix))
    if not phases:
        raise ValueError("--phases: give at least one phase, e.g. 1:chat,3:chat")
    return tuple(phases)


@dataclass(slots=True, frozen=True)
class Options:
    """Every setting of one benchmark, resolved once from the command line. Durations and
    rates in emulated seconds, except `interval_s` (the autoscaler's, real)."""

    variants: tuple[str, ...]
    phases: tuple[Phase, ...]
    phase_s: float
    base_rate: float
    window_s: float
    reaction_s: float
    slo: dict
    seed: int
    emulate: str
    model: str
    time_scale: float
    interval_s: float
    min_gpus: int
    max_gpus: int
    headroom: float
    static_pools: tuple[int, int] | None  # (prefill, decode) as given
    server_log: str | None = None
    max_model_len: int = 8192
    hardware: dict[str, tuple[str, ...]] | None = None  # role -> types; None: emulate's only

    def types(self, role: str) -> tuple[str, ...]:
        """The types `role` may run on; the first is where the pool starts."""
        return (self.hardware or {}).get(role, (self.emulate,))

    @property
    def duration_s(self) -> float:
        return self.phase_s * len(self.phases)

    def change_times_s(self) -> list[float]:
        """Where the load changes: each phase start that differs from the phase before."""
        return [i * self.phase_s for i in range(1, len(self.phases))
                if self.phases[i] != self.phases[i - 1]]  # fmt: skip


def _options(args: argparse.Namespace) -> Options:
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    _check_positive(args, "phase_s", "base_rate", "window_s", "ttft", "tpot", "interval")
    if args.reaction_s < 0 or not 0 < args.attainment <= 1:
        raise ValueError("--reaction-s must be >= 0 and --attainment in (0, 1]")
    if args.time_scale < 1:
        raise ValueError("--time-scale must be >= 1")
    if not args.headroom >= 1:
        raise ValueError(f"--headroom must be >= 1, got {args.headroom}")
    if not 2 <= args.min_gpus <= args.max_gpus:
        raise ValueError("need 2 <= --min-gpus <= --max-gpus (a prefill and a decode at least)")
    return Options(
        variants=variants,
        phases=parse_phases(args.phases),
        phase_s=args.phase_s,
        base_rate=args.base_rate,
        window_s=args.window_s,
        reaction_s=args.reaction_s,
        slo={"ttft_s": args.ttft, "tpot_s": args.tpot, "attainment": args.attainment},
        seed=args.seed,
        emulate=args.emulate,
        model=args.model,
        time_scale=args.time_scale,
        interval_s=args.interval,
        min_gpus=args.min_gpus,
        max_gpus=args.max_gpus,
        headroom=args.headroom,
        static_pools=_static_pools(args),
        server_log=getattr(args, "server_log", None),
        max_model_len=load_model_spec(args.model).max_position_embeddings,
        hardware=_hardware(args),
    )


def _hardware(args: argparse.Namespace) -> dict[str, tuple[str, ...]] | None:
    """--prefill-hardware / --decode-hardware, checked against the catalog and the model;
    None when neither is given."""
    given = {r: getattr(args, f"{r}_hardware", None) for r in ROLES}
    if not any(given.values()):
        return None
    catalog = load_catalog()
    out = {}
    for role, text in given.items():
        names = tuple(n.strip() for n in (text or args.emulate).split(",") if n.strip())
        flag = f"--{role}-hardware"
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{flag}: give distinct catalog names, e.g. A100-80GB,L40S")
        for name in names:
            try:
                sizing.instance_type(args.model, name, 1, 1, catalog)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
        out[role] = names
    return out


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")


def _static_pools(args: argparse.Namespace) -> tuple[int, int] | None:
    given = (args.static_prefill, args.static_decode)
    if given == (None, None):
        return None
    if None in given or min(given) < 1:
        raise ValueError("give both --static-prefill and --static-decode, each >= 1")
    return given


# -- the trace --------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Trace:
    """The requests of every phase, in arrival order (emulated seconds from the start)."""

    arrival_s: np.ndarray
    input_lens: np.ndarray
    output_lens: np.ndarray
    phase_ids: np.ndarray

    def plans(self, vocab_size: int, max_model_len: int, time_scale: float, seed: int):
        """The requests to send, arriving `time_scale` times later in real time."""
        return build_requests(self.input_lens, self.output_lens, self.arrival_s * time_scale,
                              vocab_size, max_model_len, seed)  # fmt: skip

    def phase(self, index: int) -> Trace:
        keep = self.phase_ids == index
        return Trace(*(a[keep] for a in dataclasses.astuple(self)))


def build_trace(opt: Options) -> Trace:
    """Each phase a homogeneous Poisson process (a Poisson count of uniform arrivals) with its
    own random stream, so a phase's requests do not depend on the phases before it."""
    workloads = mixes(opt.max_model_len)
    parts = []
    for index, phase in enumerate(opt.phases):
        rng = np.random.default_rng((opt.seed, index))
        n = int(rng.poisson(opt.base_rate * phase.rate_multiple * opt.phase_s))
        arrival = index * opt.phase_s + np.sort(rng.uniform(0, opt.phase_s, n))
        mix = workloads[phase.mix]
        inputs, outputs = mix.input.sample(n, rng), mix.output.sample(n, rng)
        parts.append((arrival, inputs, outputs, np.full(n, index)))
    return Trace(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def phase_summary(opt: Options, trace: Trace) -> list[dict]:
    rows = []
    for index, phase in enumerate(opt.phases):
        part = trace.phase(index)
        rows.append({
            "start_s": index * opt.phase_s, "end_s": (index + 1) * opt.phase_s,
            "rate_multiple": phase.rate_multiple, "mix": phase.mix,
            "rate": opt.base_rate * phase.rate_multiple,
            "num_requests": len(part.arrival_s),
            "realised_rate": len(part.arrival_s) / opt.phase_s,
            "mean_input_len": float(part.input_lens.mean()) if len(part.arrival_s) else 0.0,
            "mean_output_len": float(part.output_lens.mean()) if len(part.arrival_s) else 0.0,
        })  # fmt: skip
    return rows


# -- the deployments --------------------------------------------------------------------------


def static_plan(opt: Options, trace: Trace) -> dict:
    """The static pools for the peak: per pool, the largest the planner sizes over the phases
    (or --static-prefill/--static-decode), on the cheapest pair of the allowed types whose
    pools meet the target in every phase (choose_types' rule: then $/hour, then devices)."""
    kinds = {r: {n: sizing.instance_type(opt.model, n, 1, 1) for n in opt.types(r)}
             for r in ROLES}  # fmt: skip
    if opt.static_pools is not None:
        prefill, decode = opt.static_pools
        pair = (opt.types("prefill")[0], opt.types("decode")[0])
        return {**_plan(prefill, decode, pair, kinds),
                "source": "--static-prefill/--static-decode"}  # fmt: skip
    best, best_key = None, None
    for pair in ((p, d) for p in opt.types("prefill") for d in opt.types("decode")):
        phases = _sized_per_phase(opt, trace, kinds["prefill"][pair[0]], kinds["decode"][pair[1]])
        plan = _plan(max(p["num_prefill"] for p in phases),
                     max(p["num_decode"] for p in phases), pair, kinds)  # fmt: skip
        plan["phases"] = phases
        meets = all(p.get("meets_target", True) for p in phases)
        key = (not meets, plan["cost_per_hour"], plan["num_gpus"])
        if best_key is None or key < best_key:
            best, best_key = plan, key
    source = "cluster.placement.sizing.size_pools per phase, the largest of each pool"
    if len(opt.types("prefill")) * len(opt.types("decode")) > 1:
        source += "; of each pair of types, the cheapest meeting the target"
    return {**best, "source": source}


def _plan(prefill: int, decode: int, pair: tuple[str, str], kinds: dict) -> dict:
    p_kind, d_kind = kinds["prefill"][pair[0]], kinds["decode"][pair[1]]
    cost = p_kind.cost_per_hour(prefill) + d_kind.cost_per_hour(decode)
    return {"num_prefill": prefill, "num_decode": decode,
            "num_gpus": prefill * p_kind.num_gpus + decode * d_kind.num_gpus,
            "prefill_hardware": pair[0], "decode_hardware": pair[1],
            "cost_per_hour": cost}  # fmt: skip


def _sized_per_phase(opt: Options, trace: Trace, prefill: sizing.InstanceType,
                     decode: sizing.InstanceType) -> list[dict]:  # fmt: skip
    """size_pools for each phase's rate and its sampled lengths (a phase without requests
    needs nothing)."""
    rows = []
    for index, phase in enumerate(opt.phases):
        part = trace.phase(index)
        if not len(part.arrival_s):
            continue
        window = sizing.LoadWindow(opt.base_rate * phase.rate_multiple, part.input_lens,
                                   part.output_lens)  # fmt: skip
        sizes = sizing.size_pools(window, prefill, decode, opt.slo["ttft_s"], opt.slo["tpot_s"],
                                  opt.slo["attainment"], seed=opt.seed)  # fmt: skip
        rows.append({"phase": phase.describe(), "num_prefill": sizes.num_prefill,
                     "num_decode": sizes.num_decode, "attainment": sizes.attainment,
                     "meets_target": sizes.meets_target, "reason": sizes.reason})  # fmt: skip
    return rows or [{"phase": "none", "num_prefill": 1, "num_decode": 1}]


def autoscale_section(opt: Options, flip: bool) -> dict:
    section = {"interval_s": opt.interval_s, "min_gpus": opt.min_gpus,
               "max_gpus": opt.max_gpus, "ttft_s": opt.slo["ttft_s"],
               "tpot_s": opt.slo["tpot_s"], "attainment": opt.slo["attainment"], "flip": flip,
               "headroom": opt.headroom}  # fmt: skip
    if opt.hardware is not None:
        section["hardware"] = {r: list(opt.types(r)) for r in ROLES}
    return section


def serve_config(opt: Options, variant: str, static: dict) -> dict:
    """The `cluster serve --config` mapping of one variant's emulated cluster (one device per
    instance: TP1, PP1). Validated here, so a bad autoscale section fails before any start."""
    from cluster.emulate import EmulationSettings, emulate
    from cluster.launch import DeploymentConfig

    is_static = variant == "static-peak"
    config = DeploymentConfig(
        mode="disaggregated",
        router={"max_in_flight": 100_000, "max_queued": 100_000},
        autoscale=None if is_static else autoscale_section(opt, flip=variant == "elastic"),
    )
    if is_static:
        config.prefill.num_instances = static["num_prefill"]
        config.decode.num_instances = static["num_decode"]
    emulate(config, EmulationSettings(opt.emulate, opt.model, opt.time_scale))
    if is_static:  # each pool on its plan's type (the KV link stays --emulate's)
        for role in ROLES:
            getattr(config, role).engine["emulation"]["hardware"] = static[f"{role}_hardware"]
    return dataclasses.asdict(config)


# -- sampling the cluster ---------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PoolSample:
    """One /metrics scrape. Counters are totals since the cluster started; None: the
    cluster does not export that figure (a static cluster has no pool_gpus)."""

    t_s: float  # real seconds from the run's start
    num_instances: dict[str, int]  # per role, serving
    num_draining: dict[str, int]  # per role
    num_gpus: float | None
    gpu_seconds_total: float | None  # real device-seconds
    actions: dict[tuple[str, str, str], float]  # (action, role, cause) -> total
    num_failed: float
    cost_seconds_total: float | None = None  # $/hour x real seconds (pool_cost_seconds)

    def gpus_held(self, devices: dict[str, int]) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return sum((self.num_instances.get(r, 0) + self.num_draining.get(r, 0)) * devices[r]
                   for r in ROLES)  # fmt: skip


def parse_metrics(text: str, t_s: float) -> PoolSample:
    values: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = sample.name.removesuffix("_total")
            values.setdefault(name, []).append((sample.labels, sample.value))

    def by_role(name):
        return {labels["role"]: int(v) for labels, v in values.get(name, [])}

    def scalar(name):
        rows = values.get(name)
        return sum(v for _, v in rows) if rows else None

    actions = {(s["action"], s["role"], s["cause"]): v
               for s, v in values.get("pdcluster:autoscale_actions", [])}  # fmt: skip
    return PoolSample(
        t_s=t_s,
        num_instances=by_role("pdcluster:pool_instances"),
        num_draining=by_role("pdcluster:pool_instances_draining"),
        num_gpus=scalar("pdcluster:pool_gpus"),
        gpu_seconds_total=scalar("pdcluster:gpu_seconds"),
        actions=actions,
        num_failed=scalar("pdcluster:requests_failed") or 0.0,
        cost_seconds_total=scalar("pdcluster:pool_cost_seconds"),
    )


class PoolSampler:
    """Scrapes /metrics every SAMPLE_INTERVAL_S for the length of an async with-block: one
    sample at its start (t = 0), one at its end. A scrape that fails mid-run is skipped."""

    def __init__(self, http_url: str):
        self.url = http_url.removesuffix("/v1") + "/metrics"
        self.samples: list[PoolSample] = []

    async def __aenter__(self) -> PoolSampler:
        try:
            text = await asyncio.to_thread(self._get)
        except OSError as e:
            raise BenchError(f"cannot read {self.url}: {e}") from None
        self.t0 = time.perf_counter()
        self.samples.append(parse_metrics(text, 0.0))
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await self._scrape()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            await self._scrape()

    async def _scrape(self) -> None:
        t_s = time.perf_counter() - self.t0
        try:
            self.samples.append(parse_metrics(await asyncio.to_thread(self._get), t_s))
        except OSError:
            pass

    def _get(self) -> str:
        return urllib.request.urlopen(self.url, timeout=5).read().decode()


def gpu_seconds(samples: list[PoolSample], devices: dict[str, int]) -> tuple[float, str]:
    """Device-seconds held over the samples' span (real seconds), and where they came from:
    the cluster's own counter, else the devices each sample saw held until the next."""
    if len(samples) < 2:
        return 0.0, "none"
    first, last = samples[0], samples[-1]
    if first.gpu_seconds_total is not None and last.gpu_seconds_total is not None:
        return last.gpu_seconds_total - first.gpu_seconds_total, "pdcluster:gpu_seconds_total"
    held = sum(a.gpus_held(devices) * (b.t_s - a.t_s) for a, b in pairwise(samples))
    return held, "instances x devices per instance x time, from the samples"


def dollars(samples: list[PoolSample], devices: dict[str, int], price: float
            ) -> tuple[float, str]:  # fmt: skip
    """Cost-seconds over the samples' span (real seconds; /3600 and / the time scale for the
    emulated dollars), and where they came from: the cluster's own counter, else the
    device-seconds at `price` $/device-hour (the static plan's, for a cluster that does not
    count its cost)."""
    if len(samples) < 2:
        return 0.0, "none"
    first, last = samples[0], samples[-1]
    if first.cost_seconds_total is not None and last.cost_seconds_total is not None:
        return last.cost_seconds_total - first.cost_seconds_total, "pdcluster:pool_cost_seconds"
    used, source = gpu_seconds(samples, devices)
    return used * price, f"{source}, at the static plan's ${price:.4g}/device-hour"


def action_counts(samples: list[PoolSample]) -> list[dict]:
    """Scaling actions taken during the run (the counters' growth), by action, role, cause."""
    if not samples:
        return []
    first, last = samples[0].actions, samples[-1].actions
    rows = [{"action": a, "role": r, "cause": c, "count": int(v - first.get((a, r, c), 0))}
            for (a, r, c), v in sorted(last.items())]  # fmt: skip
    return [row for row in rows if row["count"] > 0]


def timeline(samples: list[PoolSample], devices: dict[str, int], k: float) -> list[dict]:
    return [{"t_s": round(s.t_s / k, 3),
             **{r: s.num_instances.get(r, 0) for r in ROLES},
             **{f"{r}_draining": s.num_draining.get(r, 0) for r in ROLES},
             "gpus": s.gpus_held(devices)} for s in samples]  # fmt: skip


# -- the figures ------------------------------------------------------------------------------


def window_figures(records: list[RequestRecord], samples: list[PoolSample], opt: Options,
                   devices: dict[str, int]) -> list[dict]:  # fmt: skip
    """Per window of opt.window_s (emulated): the requests arriving in it, their joint and
    per-target attainment (a failed request misses), and the pools it ran with."""
    k = opt.time_scale
    ttft, tpot = opt.slo["ttft_s"] * k, opt.slo["tpot_s"] * k
    num_windows = int(np.ceil(opt.duration_s / opt.window_s - 1e-9))
    windows = []
    for i in range(num_windows):
        start, end = i * opt.window_s, min((i + 1) * opt.window_s, opt.duration_s)
        inside = [r for r in records if start <= r.scheduled_s / k < end]
        n = len(inside)
        windows.append({
            "start_s": start, "end_s": end,
            "phase": opt.phases[min(int(start // opt.phase_s), len(opt.phases) - 1)].describe(),
            "num_requests": n,
            "num_failed": sum(not r.ok for r in inside),
            "attainment": sum(meets(r, ttft, tpot) for r in inside) / n if n else None,
            "ttft_attainment": sum(meets(r, ttft, None) for r in inside) / n if n else None,
            "tpot_attainment": sum(meets(r, None, tpot) for r in inside) / n if n else None,
            "in_reaction": _in_reaction(start, opt),
            "pools": _window_pools(samples, start * k, end * k, devices),
        })  # fmt: skip
    return windows


def _in_reaction(start_s: float, opt: Options) -> bool:
    return any(c <= start_s < c + opt.reaction_s for c in opt.change_times_s())


def _window_pools(samples: list[PoolSample], start: float, end: float,
                  devices: dict[str, int]) -> dict | None:  # fmt: skip
    """Mean pool sizes and the most devices held over [start, end) in real seconds (the last
    sample before it when none falls inside)."""
    inside = [s for s in samples if start <= s.t_s < end]
    inside = inside or [s for s in samples if s.t_s < start][-1:]
    if not inside:
        return None
    return {
        **{r: float(np.mean([s.num_instances.get(r, 0) for s in inside])) for r in ROLES},
        "draining": float(np.mean([sum(s.num_draining.values()) for s in inside])),
        "gpus_mean": float(np.mean([s.gpus_held(devices) for s in inside])),
        "gpus_max": max(s.gpus_held(devices) for s in inside),
    }


def window_check(windows: list[dict], target: float) -> dict:
    """Whether every window after the reaction time meets the target (a window without
    requests has nothing to miss)."""
    checked = [w for w in windows if not w["in_reaction"] and w["attainment"] is not None]
    meeting = [w for w in checked if w["attainment"] >= target]
    return {
        "num_checked": len(checked),
        "num_meeting": len(meeting),
        "num_in_reaction": sum(w["in_reaction"] for w in windows),
        "every_window_meets": len(meeting) == len(checked),
        "worst_attainment": min((w["attainment"] for w in checked), default=None),
    }


def variant_figures(records: list[RequestRecord], samples: list[PoolSample], opt: Options,
                    num_planned: int, static: dict) -> dict:  # fmt: skip
    """One variant's result, every time in emulated seconds."""
    k, devices = opt.time_scale, {r: 1 for r in ROLES}
    windows = window_figures(records, samples, opt, devices)
    used, source = gpu_seconds(samples, devices)
    price = static.get("cost_per_hour", 0.0) / static["num_gpus"] if static["num_gpus"] else 0.0
    spent, spent_source = dollars(samples, devices, price)
    duration_s = samples[-1].t_s / k if samples else 0.0
    static_s = static["num_gpus"] * duration_s
    static_dollars = static.get("cost_per_hour", 0.0) * duration_s / 3600
    ttft, tpot = opt.slo["ttft_s"] * k, opt.slo["tpot_s"] * k
    client_failed = sum(not r.ok for r in records)
    return {
        "duration_s": duration_s,
        "num_requests": num_planned,
        "attainment": sum(meets(r, ttft, tpot) for r in records) / max(len(records), 1),
        **_latencies(records, k),
        "windows": windows,
        "window_check": window_check(windows, opt.slo["attainment"]),
        "gpu_seconds": used / k,
        "gpu_seconds_source": source,
        "static_peak_gpu_seconds": static_s,
        "gpu_seconds_over_static_peak": used / k / static_s if static_s else None,
        "dollars": spent / k / 3600,
        "dollars_source": spent_source,
        "static_peak_dollars": static_dollars,
        "dollars_over_static_peak": spent / k / 3600 / static_dollars if static_dollars else None,
        "actions": action_counts(samples),
        "lost": {
            "client_failed": client_failed,
            "not_sent": num_planned - len(records),
            "server_failed": samples[-1].num_failed - samples[0].num_failed if samples else 0,
            "total": client_failed + num_planned - len(records),
            "first_error": next((r.error for r in records if r.error), None),
        },
        "timeline": timeline(samples, devices, k),
    }


def _latencies(records: list[RequestRecord], k: float) -> dict:
    ttfts = [r.ttft_s / k for r in records if r.ok]
    tpots = [r.tpot_s / k for r in records if r.tpot_s is not None]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {"ttft_p50_s": pct(ttfts, 50), "ttft_p90_s": pct(ttfts, 90),
            "tpot_p50_s": pct(tpots, 50), "tpot_p90_s": pct(tpots, 90)}  # fmt: skip


def comparison(variants: dict) -> dict:
    """Flip on against off (attainment and GPU-seconds, on minus off), and each variant's
    GPU-seconds over the static-peak run's (or the static plan's over the same time)."""
    out: dict = {}
    on, off = variants.get("elastic"), variants.get("elastic-noflip")
    if on and off:
        out["flip_minus_noflip"] = {
            "attainment": on["attainment"] - off["attainment"],
            "gpu_seconds": on["gpu_seconds"] - off["gpu_seconds"],
        }
    static = variants.get("static-peak")
    for name in ("elastic", "elastic-noflip"):
        if name not in variants:
            continue
        mine = variants[name]
        base = static["gpu_seconds"] if static else mine["static_peak_gpu_seconds"]
        out[f"{name}_over_static_gpu_seconds"] = mine["gpu_seconds"] / base if base else None
        if "dollars" in mine:
            base = static["dollars"] if static else mine["static_peak_dollars"]
            out[f"{name}_over_static_dollars"] = mine["dollars"] / base if base else None
    if out and not static:  # not run: its plan held for as long as each variant ran
        out["static_basis"] = "the static plan's devices x each variant's own run time"
    return out


# -- running ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    opt = _options(args)
    return run_reported(args, lambda: _run(opt), format_table)


def _run(opt: Options) -> dict:
    from cluster.bench.local_cluster import LocalCluster

    started = datetime.datetime.now().isoformat(timespec="seconds")
    trace = build_trace(opt)
    static = static_plan(opt, trace)
    configs = {v: serve_config(opt, v, static) for v in opt.variants}  # fail before starting
    variants = {}
    for variant, config in configs.items():
        print(f"elastic bench: {variant}, {describe(opt)}", file=sys.stderr)
        log = f"{opt.server_log}.{variant}.log" if opt.server_log else None
        with LocalCluster(config, log_path=log) as cluster:
            variants[variant] = asyncio.run(_measure(opt, trace, cluster, static))
        variants[variant]["start_pools"] = {r: config[r]["num_instances"] for r in ROLES}
        variants[variant]["autoscale"] = config.get("autoscale")
        print(_variant_line(variant, variants[variant]), file=sys.stderr)
    return {
        "workload": _workload(opt, trace),
        "slo": opt.slo,
        "emulated": _emulated(opt),
        "static_plan": static,
        "reaction": _reaction_note(opt),
        "variants": variants,
        "comparison": comparison(variants),
        "machine": machine(),
        "date": started,
    }


async def _measure(opt: Options, trace: Trace, cluster, static: dict) -> dict:
    async with GrpcBackend(cluster.target) as backend:
        info = await backend.model_info()
        await _warm_up(backend, info)
        plans = trace.plans(info["vocab_size"], info["max_model_len"], opt.time_scale, opt.seed)
        cap_s = opt.duration_s * opt.time_scale + 1.0
        async with PoolSampler(cluster.http_url) as sampler:
            records, _ = await run_open_loop(backend, plans, cap_s)
    return variant_figures(records, sampler.samples, opt, len(plans), static)


async def _warm_up(backend: GrpcBackend, info: dict) -> None:
    """One short request before the trace; its failure fails the benchmark."""
    record = RequestRecord(16, 4)
    ids = np.random.default_rng(12345).integers(3, info["vocab_size"], 16).tolist()
    await backend.send(RequestPlan(ids, 4, 0.0), record)
    if not record.ok:
        raise BenchError(f"the warm-up request failed: {record.error}")


def describe(opt: Options) -> str:
    on = opt.emulate
    if opt.hardware is not None:
        on = ", ".join(f"{role} {'|'.join(opt.types(role))}" for role in ROLES)
    return f"emulated {opt.model} on {on} (TP1 instances), time scale {opt.time_scale:g}"


def _workload(opt: Options, trace: Trace) -> dict:
    return {"phases": phase_summary(opt, trace), "phase_s": opt.phase_s,
            "base_rate": opt.base_rate, "window_s": opt.window_s, "seed": opt.seed,
            "num_requests": len(trace.arrival_s),
            "mixes": {n: w.to_dict() for n, w in mixes(opt.max_model_len).items()},
            "arrivals": "poisson", "lengths": "log-normal, clipped to the context"}  # fmt: skip


def _emulated(opt: Options) -> dict:
    return {"hardware": opt.emulate, "model": opt.model, "time_scale": opt.time_scale,
            "prefill_hardware": list(opt.types("prefill")),
            "decode_hardware": list(opt.types("decode")),
            "note": "emulated accelerators: every figure is the emulator's, in the emulated "
                    "hardware's time, not measured on it"}  # fmt: skip


def _reaction_note(opt: Options) -> dict:
    return {"reaction_s": opt.reaction_s, "change_times_s": opt.change_times_s(),
            "note": "windows starting within reaction_s after a phase change are reported "
                    "(in_reaction: true) but left out of the every-window check"}  # fmt: skip


# -- output -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _variant_line(name: str, v: dict) -> str:
    check, lost = v["window_check"], v["lost"]
    return (f"  {name}: attainment {v['attainment']:.1%}, windows after reaction "
            f"{check['num_meeting']}/{check['num_checked']}, {v['gpu_seconds']:.0f} GPU-s, "
            f"${v.get('dollars', 0.0):.2f}, "
            f"{sum(a['count'] for a in v['actions'])} actions, {lost['total']} lost")  # fmt: skip


def format_table(result: dict) -> str:
    e, slo = result["emulated"], result["slo"]
    phases = " -> ".join(f"{p['rate_multiple']:g}x {p['mix']}" for p in result["workload"]
                         ["phases"])  # fmt: skip
    lines = [
        f"elastic: {phases}, {result['workload']['base_rate']:g} req/s at 1x -- EMULATED "
        f"{e['model']} on {e['hardware']} (not measured on it)",
        f"SLO: TTFT {slo['ttft_s']:g} s, TPOT {slo['tpot_s']:g} s, {slo['attainment']:.0%} "
        f"per window after {result['reaction']['reaction_s']:g} s of reaction",
        f"{'variant':<16}{'attain':>8}{'windows ok':>12}{'GPU-s':>9}{'/static':>9}{'$':>8}"
        f"{'/static':>9}{'actions':>9}{'lost':>6}{'failed':>8}",
    ]
    for name, v in result["variants"].items():
        c, lost = v["window_check"], v["lost"]
        ok = f"{c['num_meeting']}/{c['num_checked']}"
        lines.append(f"{name:<16}{v['attainment']:>8.1%}{ok:>12}{v['gpu_seconds']:>9.0f}"
                     f"{_pct(v['gpu_seconds_over_static_peak']):>9}"
                     f"{v.get('dollars', 0.0):>8.2f}{_pct(v.get('dollars_over_static_peak')):>9}"
                     f"{sum(a['count'] for a in v['actions']):>9}{lost['total']:>6}"
                     f"{lost['server_failed']:>8.0f}")  # fmt: skip
    for name, v in result["variants"].items():
        lines += [f"{name} by window:", f"  {'t (s)':<12}{'phase':<20}{'req':>5}{'attain':>8}"
                                        f"{'P':>6}{'D':>6}{'GPUs':>6}"]  # fmt: skip
        lines += [_window_line(w) for w in v["windows"]]
    return "\n".join(lines)


def _window_line(w: dict) -> str:
    pools = w["pools"] or {"prefill": 0, "decode": 0, "gpus_max": 0}
    span = f"{w['start_s']:g}-{w['end_s']:g}"
    mark = "  (reaction)" if w["in_reaction"] else ""
    return (f"  {span:<12}{w['phase']:<20}{w['num_requests']:>5}{_pct(w['attainment']):>8}"
            f"{pools['prefill']:>6.1f}{pools['decode']:>6.1f}{pools['gpus_max']:>6.0f}"
            f"{mark}")  # fmt: skip
