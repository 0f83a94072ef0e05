"""Per-call overhead of plain Ray async actors versus Ray Serve deployments.

The same worker class runs once as plain Ray actors and once as Serve deployments; an asyncio
driver (where our router runs) times N sequential calls after a warm-up, and reports p50/p90 ms:

- unary: a call returning a small dict (driver -> worker);
- stream first item / per item: a 32-item async generator of small dataclasses (time to the
  first item; mean gap between the following items of one stream);
- 2-hop unary / 2-hop stream per item: driver -> worker A -> worker B, A relaying B's answer
  (what the router does for disaggregation); Serve composes A and B with `.bind()`;
- http unary (Serve only): a plain `__call__` ingress on 127.0.0.1:8000 through `urllib`.

Self-contained; needs only `ray[serve]`. Run from the repository root:

    pip install "ray[serve]==2.60.0" && \
        python bench/serve_vs_actors.py --json --output bench-results/serve_vs_actors.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

ITEMS = 32


@dataclass
class Item:
    token_ids: list[int]
    text: str


class Worker:
    """The worker under test; `downstream` (an actor or a DeploymentHandle) makes it hop A."""

    def __init__(self, downstream=None):
        self.downstream = downstream
        self.is_serve = downstream is not None and not isinstance(downstream, ray.actor.ActorHandle)

    async def ping(self, x: int) -> dict:
        return {"ok": True, "x": x}

    async def stream(self, n: int):
        for i in range(n):
            yield Item([i], "tok")

    async def relay(self, x: int) -> dict:
        return await self.downstream.ping.remote(x)  # ObjectRef or DeploymentResponse

    async def relay_stream(self, n: int):
        async for item in stream_of(self.downstream, n, self.is_serve):
            yield item

    async def __call__(self, request) -> dict:  # Serve HTTP ingress
        return {"ok": True}


async def stream_of(target, n: int, is_serve: bool, method: str = "stream"):
    """Iterate `target.<method>(n)` the way each runtime streams."""
    if is_serve:
        async for item in getattr(target.options(stream=True), method).remote(n):
            yield item
    else:
        async for ref in getattr(target, method).options(num_returns="streaming").remote(n):
            yield await ref


def pct(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=10)
    return {"p50_ms": statistics.median(samples) * 1e3, "p90_ms": q[8] * 1e3}


async def measure(fn, n: int, warmup: int) -> list[float] | list[tuple[float, float]]:
    for _ in range(warmup):
        await fn()
    return [await fn() for _ in range(n)]


async def bench(a, is_serve: bool, n: int, warmup: int) -> dict:
    """p50/p90 of every operation against hop A (`a`), which holds hop B."""

    async def unary(method):
        t0 = time.perf_counter()
        await getattr(a, method).remote(1)
        return time.perf_counter() - t0

    async def streamed(method):
        t0 = time.perf_counter()
        times = [time.perf_counter() async for _ in stream_of(a, ITEMS, is_serve, method)]
        assert len(times) == ITEMS
        return times[0] - t0, (times[-1] - times[0]) / (ITEMS - 1)

    out = {"unary": pct(await measure(lambda: unary("ping"), n, warmup))}
    s = await measure(lambda: streamed("stream"), n, warmup)
    out["stream first item"] = pct([f for f, _ in s])
    out["stream per item"] = pct([g for _, g in s])
    out["2-hop unary"] = pct(await measure(lambda: unary("relay"), n, warmup))
    s = await measure(lambda: streamed("relay_stream"), n, warmup)
    out["2-hop stream first item"] = pct([f for f, _ in s])
    out["2-hop stream per item"] = pct([g for _, g in s])
    return out


def http_call() -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen("http://127.0.0.1:8000/", timeout=10) as r:
        json.loads(r.read())
    return time.perf_counter() - t0


async def run(n: int, warmup: int, access_log: bool) -> dict:
    # Plain actors, as cluster/router/clients.py RayClient calls them.
    actor_cls = ray.remote(num_cpus=0)(Worker)
    b = actor_cls.remote()
    a = actor_cls.remote(b)
    actors = await bench(a, False, n, warmup)
    for h in (a, b):
        ray.kill(h)

    # The same class as two Serve deployments, A composed over B; HTTP ingress on A.
    logging = {"enable_access_log": access_log}
    dep = serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config=logging)(Worker)
    app = dep.options(name="A").bind(dep.options(name="B").bind())
    handle = serve.run(app, name="bench", route_prefix="/")
    served = await bench(handle, True, n, warmup)
    for _ in range(warmup):
        http_call()
    served["http unary"] = pct([http_call() for _ in range(n)])
    return {"actors": actors, "serve": served}


def report(res: dict) -> str:
    head = f"{'operation':<24}{'actor p50':>10}{'p90':>8}{'serve p50':>11}{'p90':>8}{'ratio':>7}"
    lines = [head, "-" * len(head)]
    for op, s in res["serve"].items():
        a = res["actors"].get(op)
        ac = f"{a['p50_ms']:>10.3f}{a['p90_ms']:>8.3f}" if a else f"{'-':>10}{'-':>8}"
        ratio = f"{s['p50_ms'] / a['p50_ms']:>7.2f}" if a else f"{'-':>7}"
        lines.append(f"{op:<24}{ac}{s['p50_ms']:>11.3f}{s['p90_ms']:>8.3f}{ratio}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="timed calls per operation")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls before each operation")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--output", type=Path, help="also write the JSON object to this file")
    p.add_argument("--no-access-log", action="store_true", help="Serve: no per-request log line")
    args = p.parse_args()

    # Ray and Serve print their own messages on stdout; keep stdout for the JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            res = asyncio.run(run(args.n, args.warmup, not args.no_access_log))
        finally:
            serve.shutdown()
            ray.shutdown()
    res = {
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "platform": platform.platform(),
        },
        "n": args.n,
        "warmup": args.warmup,
        "stream_items": ITEMS,
        "serve_access_log": not args.no_access_log,
        **res,
    }
    print(report(res), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(res))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
