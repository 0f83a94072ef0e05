"""`cluster bench chaos`: the serving path under faults (issue 14, "harden the serving path").

A disaggregated deployment of the real (tiny by default) model on a Ray cluster started here
serves open-loop gRPC load while an injector makes a fault every `--fault-interval` seconds:

    kill_prefill       SIGKILL a prefill instance's process (Ray restarts it)
    kill_decode        SIGKILL a decode instance's process
    kill_rank          SIGKILL a follower rank of a tensor-parallel decode instance (--tp-decode)
    stop_instance      SIGSTOP an instance for --stop-s (past its load-poll timeout and the
                       KV pull deadline), then SIGCONT
    drop_notification  arm `kv.notify` = drop once on a decode instance (cluster/faults.py):
                       the prefill never hears that its blocks were pulled; its lease frees them

Every request is greedy with a per-request bound; its outcome is one of

    completed  the stream ended OK (then `wrong` if its tokens differ from a colocated
               reference engine's, computed here before the run)
    failed     the stream ended with an error status (a clean failure: the client knows)
    hung       no end within --request-timeout (DEADLINE_EXCEEDED)

After the load, once every instance answers again, each instance's block manager checks
itself and every block must be free (`leaked_blocks` counts those still taken). Goal under
the `retry` policy with >= 1 fault per 10 s: hung 0, wrong 0, leaked_blocks 0, completed
>= 95 % of requests. Measurements live in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.bench.common import report, resolve
from cluster.loop_thread import LoopThread

DEFAULTS = {"duration": 600.0, "rate": 2.0, "fault_interval": 5.0, "request_timeout": 120.0}
QUICK = {"duration": 40.0, "rate": 2.0, "fault_interval": 5.0, "request_timeout": 60.0}
FAULT_KINDS = ("kill_prefill", "kill_decode", "kill_rank", "stop_instance", "drop_notification")
_NUM_BLOCKS = 256  # per instance: the tiny model's blocks are small, the load is light
_HEALTHY_WAIT_S = 180.0  # after the load: every instance back (a restart takes seconds)
_LEAK_WAIT_S = 30.0  # then every block free (leases end after lease_s + grace_s)
_CALL_TIMEOUT_S = 10.0  # the injector's Ray calls (pid, inject_fault)
_MAX_WRONG_SHOWN = 10  # wrong requests listed in full in the result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    add("--output", type=Path, help="also write the JSON result to this file")
    add("--quick", action="store_true", help=f"a short run for CI ({QUICK['duration']:.0f} s)")
    add("--duration", type=float, help=f"seconds of load ({DEFAULTS['duration']:.0f})")
    add("--rate", type=float, help=f"requests per second, Poisson ({DEFAULTS['rate']})")
    add("--fault-interval", type=float, help="seconds between faults (5)")
    add("--faults", default=",".join(FAULT_KINDS),
        help="fault kinds to draw from, comma-separated (default: all that apply)")  # fmt: skip
    add("--stop-s", type=float, default=8.0, help="how long stop_instance keeps it stopped")
    add("--request-timeout", type=float, help="seconds; a request not done by then hung (120)")
    add("--output-len", type=int, default=16, help="tokens per request (greedy, ignore_eos)")
    add("--min-prompt-len", type=int, default=8)
    add("--max-prompt-len", type=int, default=96)
    add("--num-prefill", type=int, default=2)
    add("--num-decode", type=int, default=2)
    add("--tp-decode", type=int, default=1, help="tensor-parallel size of each decode instance")
    add("--policy", default="retry", choices=("retry", "recompute", "fail"),
        help="the requests' failure policy")  # fmt: skip
    add("--model", default=None, help="checkpoint folder (default: the tiny model)")
    add("--seed", type=int, default=0, help="prompts, arrivals and fault draws")


def run(args: argparse.Namespace) -> dict:
    opt = _options(args)
    plans = _plans(opt)
    reference = _reference(opt, plans)
    # Ray's driver prints worker deaths (here: every kill) on stdout, which --json keeps
    # for the result alone.
    with contextlib.redirect_stdout(sys.stderr), _Deployment(opt) as cluster:
        injector = _Injector(cluster, opt)
        injector.start()
        try:
            outcomes = cluster.loop.run(
                _load(cluster.target, plans, opt),
                timeout_s=opt["duration"] + opt["request_timeout"] + 120,
            )
        finally:
            injector.stop()
        recovered_s = cluster.wait_healthy(_HEALTHY_WAIT_S)
        blocks = cluster.check_blocks(_LEAK_WAIT_S)
        faults = injector.summary(cluster)
    result = _summarise(opt, plans, reference, outcomes, faults, blocks, recovered_s)
    report(result, format_table(result), args)
    return result


def _options(args: argparse.Namespace) -> dict:
    opt = {k: resolve(args, k, DEFAULTS, QUICK) for k in DEFAULTS}
    for name in ("stop_s", "output_len", "min_prompt_len", "max_prompt_len",
                 "num_prefill", "num_decode", "tp_decode", "policy", "model", "seed"):  # fmt: skip
        opt[name] = getattr(args, name)
    kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
    if opt["tp_decode"] == 1:
        kinds = tuple(k for k in kinds if k != "kill_rank")  # no follower rank to kill
    opt["faults"] = kinds
    if opt["rate"] <= 0 or opt["duration"] <= 0 or opt["fault_interval"] <= 0:
        raise ValueError("--rate, --duration and --fault-interval must be > 0")
    if not 1 <= opt["min_prompt_len"] <= opt["max_prompt_len"]:
        raise ValueError("need 1 <= --min-prompt-len <= --max-prompt-len")
    return opt


# -- the requests and their reference -------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Plan:
    prompt_ids: list[int]
    arrival_s: float  # offset from the start of the load


@dataclass(slots=True)
class _Outcome:
    status: str  # completed | failed | hung
    token_ids: list[int] = field(default_factory=list)
    e2e_s: float = 0.0
    error: str = ""
    num_recomputes: int = 0
    instances: str = ""  # the last run's prefill -> decode instances
    finish_reason: str = ""


def _plans(opt: dict) -> list[_Plan]:
    """Poisson arrivals over the duration; random token-id prompts (above the special ids)."""
    rng = random.Random(opt["seed"])
    plans, t = [], rng.expovariate(opt["rate"])
    while t < opt["duration"]:
        n = rng.randint(opt["min_prompt_len"], opt["max_prompt_len"])
        plans.append(_Plan([rng.randrange(3, 500) for _ in range(n)], t))
        t += rng.expovariate(opt["rate"])
    return plans


def _reference(opt: dict, plans: list[_Plan]) -> list[list[int]]:
    """Greedy tokens of every prompt from a colocated engine in this process."""
    from cluster.engine.config import CacheConfig, EngineConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=opt["model"], cache=CacheConfig(num_blocks=1024)))
    params = SamplingParams(max_tokens=opt["output_len"], temperature=0.0, ignore_eos=True)
    outs = engine.generate([p.prompt_ids for p in plans], params)
    return [list(o.token_ids) for o in outs]


# -- the load -------------------------------------------------------------------------------


async def _load(target: str, plans: list[_Plan], opt: dict) -> list[_Outcome]:
    """Open loop: each request leaves at its arrival time, whatever the server is doing."""
    import grpc

    from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc

    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.PDClusterStub(channel)
        start, tasks = loop.time(), []
        for i, plan in enumerate(plans):
            await asyncio.sleep(max(0.0, start + plan.arrival_s - loop.time()))
            tasks.append(asyncio.ensure_future(_request(stub, f"chaos-{i}", plan, opt)))
        await asyncio.sleep(max(0.0, start + opt["duration"] - loop.time()))  # faults go on
        return await asyncio.gather(*tasks)


async def _request(stub, request_id: str, plan: _Plan, opt: dict) -> _Outcome:
    import grpc

    from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb

    params = pb.SamplingParams(max_tokens=opt["output_len"], temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=plan.prompt_ids),
                                 sampling_params=params, failure_policy=opt["policy"])  # fmt: skip
    start, out = time.monotonic(), _Outcome("completed")
    try:
        async for response in stub.Generate(request, timeout=opt["request_timeout"]):
            out.token_ids += response.token_ids
            if response.finish_reason:  # the last response carries the timing
                timing, out.finish_reason = response.timing, response.finish_reason
                out.num_recomputes = timing.num_recomputes
                out.instances = f"{timing.prefill_instance} -> {timing.decode_instance}"
    except grpc.aio.AioRpcError as e:
        hung = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        out.status, out.error = ("hung" if hung else "failed"), f"{e.code().name}: {e.details()}"
    out.e2e_s = time.monotonic() - start
    return out


# -- the deployment -------------------------------------------------------------------------


class _Deployment:
    """Ray (started here unless it already runs), the pools as Ray actors with fault
    injection on, and the router's gRPC server on a free loopback port."""

    def __init__(self, opt: dict):
        self.opt = opt

    def __enter__(self) -> _Deployment:
        import ray

        from cluster.launch import start_ray
        from cluster.router.grpc_server import start_grpc_server

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # address="local": a cluster of our own, never one another process runs here
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2),
                     include_dashboard=False, log_to_driver=False)  # fmt: skip
        self.loop = LoopThread()
        self.router = self.server = None
        try:
            self.router = self.loop.run(start_ray(self._config()), timeout_s=600)
            self.server, port = self.loop.run(start_grpc_server(self.router, port=0), 30)
        except BaseException:
            self.__exit__()
            raise
        self.target = f"127.0.0.1:{port}"
        return self

    def _config(self):
        from cluster.launch import DeploymentConfig, PoolSpec
        from cluster.workers.base import TransferSettings

        opt = self.opt
        decode_engine = {"tensor_parallel_size": opt["tp_decode"]} if opt["tp_decode"] > 1 else {}
        return DeploymentConfig(
            model=opt["model"],
            engine={"num_blocks": _NUM_BLOCKS, "fault_injection": True},
            prefill=PoolSpec(num_instances=opt["num_prefill"]),
            decode=PoolSpec(num_instances=opt["num_decode"], engine=decode_engine),
            # Short leases so that a lost notification's blocks come back within the check;
            # a deadline under --stop-s so that a READ from a stopped instance runs out.
            transfer=TransferSettings(lease_s=5.0, grace_s=1.0, deadline_s=5.0),
            router={"failure_policy": opt["policy"], "instance_wait_s": 60.0},
        )

    def __exit__(self, *exc) -> None:
        import ray

        try:
            if self.server is not None:
                self.loop.run(self.server.stop(None), timeout_s=30)
            if self.router is not None:
                self.loop.run(self.router.shutdown(), timeout_s=60)
            self.loop.close()
        finally:
            if self._owns_ray:
                ray.shutdown()

    def wait_healthy(self, timeout_s: float) -> float | None:
        """Seconds until the router sees every instance healthy again; None if it never did."""
        start = time.monotonic()
        while not all(i.healthy for i in self.router.instances):
            if time.monotonic() - start > timeout_s:
                return None
            time.sleep(0.5)
        return time.monotonic() - start

    def check_blocks(self, timeout_s: float) -> dict:
        """Each instance's block manager checks itself (every rank's, for a parallel one) and
        reports (free, total); poll until every block is free or the time is up."""
        deadline = time.monotonic() + timeout_s
        broken: dict[str, str] = {}  # instance -> integrity error (kept even if it passes later)
        while True:
            answers = {i.instance_id: self._check(i) for i in self.router.instances}
            for name, answer in answers.items():
                if isinstance(answer, AssertionError):
                    broken.setdefault(name, f"{type(answer).__name__}: {answer}")
            counts = {k: v for k, v in answers.items() if isinstance(v, tuple)}
            done = len(counts) == len(answers) and all(f == t for f, t in counts.values())
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return {
            "leaked_blocks": sum(t - f for f, t in counts.values()),
            "leaked_by_instance": {k: t - f for k, (f, t) in counts.items() if f != t},
            "integrity_errors": broken,
            "unchecked_instances": {
                k: f"{type(v).__name__}: {v}"[:300] for k, v in answers.items() if k not in counts
            },
        }

    def _check(self, instance) -> tuple[int, int] | BaseException:
        try:
            free, total = self.loop.run(instance.client.call("check_integrity", timeout=60), 90)
            return int(free), int(total)
        except Exception as e:  # noqa: BLE001 - the caller sorts lost from broken
            return e


# -- the injector ---------------------------------------------------------------------------


class _Injector:
    """Every fault_interval seconds one fault, of a kind drawn from those that have a target
    now (a healthy instance not stopped by us); counts what it did by kind."""

    def __init__(self, cluster: _Deployment, opt: dict):
        self.cluster, self.opt = cluster, opt
        self.rng = random.Random(opt["seed"] + 1)
        self.counts: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()  # "kind: error" -> count
        self.log: list[tuple[float, str, str]] = []  # (seconds into the run, kind, target)
        self._stopped: dict[int, tuple[str, threading.Timer]] = {}  # pid -> (who, SIGCONT)
        self._lock = threading.Lock()  # _stopped: the injector's thread and the timers'
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-injector", daemon=True)
        self._start = 0.0
        self.drops = _HitCounter("kv.notify")

    def start(self) -> None:
        self._start = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=60)
        with self._lock:
            stopped, self._stopped = self._stopped, {}
        for pid, (_, timer) in stopped.items():
            timer.cancel()
            _signal(pid, signal.SIGCONT)

    def _loop(self) -> None:
        end = self._start + self.opt["duration"]
        while not self._done.wait(self.opt["fault_interval"]) and time.monotonic() < end:
            self.drops.read(self._targets("decode"))  # (not one we stopped: it would not answer)
            self._inject_one()

    def _inject_one(self) -> None:
        kinds = list(self.opt["faults"])
        self.rng.shuffle(kinds)
        for kind in kinds:  # the first kind that has a target now
            try:
                target = getattr(self, f"_{kind}")()
            except Exception as e:  # noqa: BLE001 - a target that vanished: try another
                self.errors[f"{kind}: {type(e).__name__}: {e}"[:200]] += 1
                continue
            if target is not None:
                self.counts[kind] += 1
                self.log.append((round(time.monotonic() - self._start, 1), kind, target))
                return
        self.counts["skipped"] += 1

    def _targets(self, role: str) -> list:
        return [
            i for i in self.cluster.router.instances
            if i.role == role and i.healthy and i.instance_id not in self._stopped_ids()
        ]  # fmt: skip

    def _stopped_ids(self) -> set[str]:
        with self._lock:
            return {name for name, _ in self._stopped.values()}

    def _pick(self, role: str):
        targets = self._targets(role)
        return self.rng.choice(targets) if targets else None

    def _kill_prefill(self) -> str | None:
        return self._kill(self._pick("prefill"))

    def _kill_decode(self) -> str | None:
        return self._kill(self._pick("decode"))

    def _kill(self, instance) -> str | None:
        if instance is None:
            return None
        _signal(_pid(instance.client.actor), signal.SIGKILL)
        return instance.instance_id

    def _kill_rank(self) -> str | None:
        import ray

        from cluster.workers.ranks import RAY_NAMESPACE, actor_name

        instance = self._pick("decode")
        if instance is None:
            return None
        rank = self.rng.randrange(1, self.opt["tp_decode"])
        name = actor_name(instance.instance_id, rank)
        _signal(_pid(ray.get_actor(name, namespace=RAY_NAMESPACE)), signal.SIGKILL)
        return name

    def _stop_instance(self) -> str | None:
        if self._stopped:  # one stopped instance at a time
            return None
        targets = self._targets("prefill") + self._targets("decode")
        if not targets:
            return None
        instance = self.rng.choice(targets)
        pid = _pid(instance.client.actor)
        timer = threading.Timer(self.opt["stop_s"], self._resume, (pid,))
        with self._lock:
            self._stopped[pid] = (instance.instance_id, timer)
        _signal(pid, signal.SIGSTOP)
        timer.start()
        return instance.instance_id

    def _resume(self, pid: int) -> None:
        with self._lock:
            stopped = self._stopped.pop(pid, None)
        if stopped is not None:
            _signal(pid, signal.SIGCONT)

    def _drop_notification(self) -> str | None:
        import ray

        instance = self._pick("decode")
        if instance is None:
            return None
        ref = instance.client.actor.inject_fault.remote("kv.notify", "drop", "", 1)
        ray.get(ref, timeout=_CALL_TIMEOUT_S)
        return instance.instance_id

    def summary(self, cluster: _Deployment) -> dict:
        """What was injected, what could not be, and how many armed notification drops
        fired (read on every tick and at the end: hits since an instance's last reading
        before it was killed are missed, so this is a lower bound)."""
        return {
            "faults": {k: n for k in (*self.opt["faults"], "skipped") if (n := self.counts[k])},
            "fault_errors": dict(self.errors),
            "notify_drops_fired": self.drops.read(cluster.router.instances),
            "fault_log": self.log,
        }


class _HitCounter:
    """How often an armed fault point fired on the decode instances, across restarts (a
    restarted instance counts from 0 again)."""

    def __init__(self, point: str):
        self.point = point
        self._last: dict[str, int] = {}
        self._before_restarts = 0

    def read(self, instances) -> int:
        import ray

        for i in instances:
            if i.role != "decode" or not i.healthy:
                continue
            try:
                hits = ray.get(i.client.actor.fault_hits.remote(self.point), timeout=5)
            except Exception:  # noqa: BLE001 - down or stopped: read it next time
                continue
            last = self._last.get(i.instance_id, 0)
            if hits < last:  # restarted since
                self._before_restarts += last
            self._last[i.instance_id] = hits
        return self._before_restarts + sum(self._last.values())


def _pid(actor) -> int:
    import ray

    return int(ray.get(actor.pid.remote(), timeout=_CALL_TIMEOUT_S))


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # already gone (killed, restarting): nothing to do
        pass


# -- the result -----------------------------------------------------------------------------


def _summarise(opt, plans, reference, outcomes, faults, blocks, recovered_s) -> dict:
    by_status = collections.Counter(o.status for o in outcomes)
    completed = [(o, ref) for o, ref in zip(outcomes, reference, strict=True)
                 if o.status == "completed"]  # fmt: skip
    e2e = sorted(o.e2e_s for o, _ in completed)
    wrong = [
        _wrong(i, plan, o, ref)
        for i, (plan, o, ref) in enumerate(zip(plans, outcomes, reference, strict=True))
        if o.status == "completed" and o.token_ids != ref
    ]
    num_faults = sum(v for k, v in faults["faults"].items() if k != "skipped")
    return {
        "requests": len(plans),
        "completed": by_status["completed"],
        "failed": by_status["failed"],
        "hung": by_status["hung"],
        "wrong": len(wrong),
        "leaked_blocks": blocks["leaked_blocks"],
        "faults": faults["faults"],
        "completed_ratio": by_status["completed"] / len(plans) if plans else 0.0,
        "faults_per_10s": 10 * num_faults / opt["duration"],
        "errors": dict(collections.Counter(o.error for o in outcomes if o.error)),
        "retried_requests": sum(o.num_recomputes > 0 for o, _ in completed),
        "e2e_p50_s": statistics.median(e2e) if e2e else None,
        "e2e_p99_s": e2e[min(len(e2e) - 1, int(0.99 * len(e2e)))] if e2e else None,
        "recovered_s": recovered_s,
        "wrong_requests": wrong[:_MAX_WRONG_SHOWN],
        **{k: v for k, v in blocks.items() if k != "leaked_blocks"},
        **{k: v for k, v in faults.items() if k != "faults"},
        "options": {k: v for k, v in opt.items()},
    }


def _wrong(index: int, plan: _Plan, out: _Outcome, expected: list[int]) -> dict:
    """What a bug report needs about one completed request whose tokens were wrong."""
    return {
        "request_id": f"chaos-{index}",
        "arrival_s": round(plan.arrival_s, 2),
        "prompt_len": len(plan.prompt_ids),
        "instances": out.instances,
        "num_recomputes": out.num_recomputes,
        "finish_reason": out.finish_reason,
        "expected": expected,
        "got": out.token_ids,
    }


def format_table(result: dict) -> str:
    o = result["options"]
    lines = [
        f"chaos: {o['duration']:.0f} s at {o['rate']} req/s, a fault every "
        f"{o['fault_interval']} s, policy {o['policy']}, {o['num_prefill']} prefill + "
        f"{o['num_decode']} decode (TP{o['tp_decode']})",
        f"{'requests':>10}{'completed':>11}{'failed':>8}{'hung':>6}{'wrong':>7}{'leaked':>8}"
        f"{'ratio':>8}{'p50 s':>8}{'p99 s':>8}",
        f"{result['requests']:>10}{result['completed']:>11}{result['failed']:>8}"
        f"{result['hung']:>6}{result['wrong']:>7}{result['leaked_blocks']:>8}"
        f"{result['completed_ratio']:>8.1%}{_seconds(result['e2e_p50_s']):>8}"
        f"{_seconds(result['e2e_p99_s']):>8}",
        "faults: " + ", ".join(f"{k} {v}" for k, v in result["faults"].items()),
    ]
    for title, key in (("error", "errors"), ("injector error", "fault_errors"),
                       ("leaked", "leaked_by_instance"), ("integrity error", "integrity_errors"),
                       ("not checked", "unchecked_instances")):  # fmt: skip
        lines += [f"{title}: {what}: {n}" for what, n in result[key].items()]
    if result["recovered_s"] is None:
        lines.append(f"not every instance was healthy {_HEALTHY_WAIT_S:.0f} s after the load")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
