"""The prompt-cache side channel, measured (docs/security.md, docs/benchmarks.md).

    .venv/bin/python bench/tenant_isolation.py [--pairs 16] [--tokens 160,1024]

For each mode (colocated, disaggregated) and prompt length, an in-process router with real
engines (the tiny model) behind the real HTTP API, called by the official `openai` client:
a victim sends a secret prompt and re-sends it (its own hit); an attacker sends the secret
(the probe) and a fresh prompt of the same length. Latencies are of one-token completions.
Reported: medians, cached tokens the attacker saw, and one-sided Mann-Whitney p-values of
"own re-send faster than fresh" (the channel's strength) and "probe faster than fresh" (the
leak). Run once with tenants (an auth file: isolation) and once without (one shared cache:
the control, where the probe is a hit)."""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.engine.tiny import write_tiny_model  # noqa: E402
from cluster.launch import create_local  # noqa: E402
from cluster.loop_thread import LoopThread  # noqa: E402
from cluster.router.http_server import start_http_server, stop_http_server  # noqa: E402
from cluster.router.tenants import Auth  # noqa: E402

KEYS = {"victim": "victim-key", "attacker": "attacker-key"}
AUTH = {"tenants": {n: {"key_sha256": hashlib.sha256(k.encode()).hexdigest()}
                    for n, k in KEYS.items()}}  # fmt: skip


def measure(model_dir: str, mode: str, isolated: bool, tokens: int, pairs: int) -> dict:
    loop = LoopThread()
    router = loop.run(create_local(model_dir=model_dir, mode=mode))
    auth = Auth.from_dict(AUTH) if isolated else None
    http, task, port = loop.run(start_http_server(router, port=0, auth=auth))
    clients = {n: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=k, max_retries=0)
               for n, k in KEYS.items()}  # fmt: skip
    name = router.model_info.name
    rng = random.Random(f"{mode}-{tokens}")

    def send(who: str, prompt: list[int]) -> tuple[float, int]:
        start = time.perf_counter()
        out = clients[who].completions.create(model=name, prompt=prompt, max_tokens=1,
                                              temperature=0)  # fmt: skip
        return time.perf_counter() - start, out.usage.prompt_tokens_details.cached_tokens

    own, fresh, probe, probe_cached = [], [], [], []
    try:
        for i in range(pairs):
            secret = [rng.randrange(1, 500) for _ in range(tokens)]
            other = [rng.randrange(1, 500) for _ in range(tokens)]
            send("victim", secret)
            own.append(send("victim", secret)[0])
            order = [("probe", secret), ("fresh", other)]
            for kind, prompt in order if i % 2 else order[::-1]:
                elapsed, cached = send("attacker", prompt)
                if kind == "probe":
                    probe.append(elapsed)
                    probe_cached.append(cached)
                else:
                    fresh.append(elapsed)
    finally:
        loop.run(stop_http_server(http, task))
        loop.run(router.shutdown())
        loop.close()
    ms = lambda xs: statistics.median(xs) * 1e3
    return {
        "mode": mode, "isolated": isolated, "tokens": tokens, "pairs": pairs,
        "own_ms": ms(own), "fresh_ms": ms(fresh), "probe_ms": ms(probe),
        "probe_cached_max": max(probe_cached),
        "p_own": mannwhitneyu(own, fresh, alternative="less").pvalue,
        "p_probe": mannwhitneyu(probe, fresh, alternative="less").pvalue,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--tokens", default="160,1024", help="prompt lengths, comma-separated")
    parser.add_argument("--modes", default="colocated,disaggregated")
    args = parser.parse_args()
    model_dir = str(write_tiny_model(tempfile.mkdtemp(prefix="tiny-")))
    print(
        "| mode | tenants | prompt tokens | own re-send ms | fresh ms | probe ms | probe "
        "cached tokens (max) | p(own < fresh) | p(probe < fresh) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for isolated in (True, False):
            for tokens in map(int, args.tokens.split(",")):
                r = measure(model_dir, mode, isolated, tokens, args.pairs)
                print(f"| {mode} | {'auth file' if isolated else 'none (control)'} | {tokens} "
                      f"| {r['own_ms']:.1f} | {r['fresh_ms']:.1f} | {r['probe_ms']:.1f} | "
                      f"{r['probe_cached_max']} | {r['p_own']:.1g} | {r['p_probe']:.2g} |",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
