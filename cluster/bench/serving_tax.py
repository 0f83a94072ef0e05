"""The serving tax: CPU seconds that every process of a served cluster (router, workers, Ray's
own daemons) spends per 1,000 generated tokens, on the noop model runner (no model work) at a
steady request rate. What remains is the price of serving itself: RPCs, event loops,
scheduling, the KV handoff, streaming.

The cluster is `cluster serve` in a child process (LocalCluster); every process under it is
counted (Ray's GCS and raylet are its children, the worker actors the raylet's), the load
generator here is not. CPU time is read with psutil before and after the load window.
"""

from __future__ import annotations

import asyncio
import time

import psutil

_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def cpu_seconds(root_pid: int) -> dict[int, float]:
    """user + system CPU seconds of a process and every descendant, by pid."""
    out = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def measure(target: str, root_pid: int, rate: float, duration_s: float, output_len: int) -> dict:
    """Send requests at `rate` per second for `duration_s` (evenly spaced, open loop) to the
    gRPC server at `target`; return the CPU seconds its process tree spent meanwhile."""
    return asyncio.run(_measure(target, root_pid, rate, duration_s, output_len))


async def _measure(target, root_pid, rate, duration_s, output_len) -> dict:
    import grpc

    from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
    from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc

    params = pb.SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.PDClusterStub(channel)

        async def one(i: int) -> int:
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=_PROMPT), sampling_params=params, cache_salt=str(i)
            )
            n = 0
            async for response in stub.Generate(request, timeout=120):
                n += len(response.token_ids)
            return n

        for i in range(5):  # warm connections, caches and code paths
            await one(-1 - i)
        await asyncio.sleep(1.0)
        before, start = cpu_seconds(root_pid), time.monotonic()
        num = int(rate * duration_s)
        tasks = []
        for i in range(num):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        tokens = sum(await asyncio.gather(*tasks))
        wall = time.monotonic() - start
        after = cpu_seconds(root_pid)
    # Processes alive at both ends (none should come or go under steady load).
    spent = sum(after[pid] - before[pid] for pid in after if pid in before)
    return {
        "rate": rate,
        "duration_s": wall,
        "num_requests": num,
        "generated_tokens": tokens,
        "cpu_s": spent,
        "num_processes": len(after),
        "cpu_s_per_1k_tokens": spent / tokens * 1000 if tokens else float("nan"),
    }
