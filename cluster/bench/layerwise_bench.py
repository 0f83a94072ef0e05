"""`cluster bench layerwise`: does pulling the KV layer by layer while the prefill still
computes later layers (Splitwise's layer-wise transfer) shorten the time until the decode
instance holds a request's whole KV?

Two Ray actor processes. The prefill side runs our engine (role prefill) on a seeded random
Llama of the given shape and owns a NixlKVAgent over its KV pool; forward hooks on the decoder
layers announce progress to the decode side with NIXL notifications. The decode side, another
agent over a pool of the same shape, answers them:

    whole      after the last layer: one READ of every block (what the cluster does today)
    layerwise  after layer i: a READ of layer i of every block (read_layers), while the
               prefill goes on with layer i + 1

Measured from the prefill's start to the decode side's last READ done ("KV ready"), median
over repeats, both modes interleaved; plus the prefill's own compute time in each mode (the
pulls run on the same two cores here, so they can slow it) and a whole pull on its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from cluster.bench.common import int_list, report

DEFAULTS = {"prompt_lens": (256, 1024), "num_layers": 8, "hidden_size": 1024, "repeats": 5}
QUICK = {"prompt_lens": (64,), "num_layers": 2, "hidden_size": 128, "repeats": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--prompt-lens", type=int_list, help="prompt tokens (256,1024)")
    parser.add_argument("--num-layers", type=int, help="layers of the bench model (8)")
    parser.add_argument("--hidden-size", type=int, help="hidden size, head_dim 64 (1024)")
    parser.add_argument("--repeats", type=int, help="timed runs per mode and length (5)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")


class PrefillSide:
    def __init__(self, model_dir: str, max_len: int):
        import torch

        from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
        from cluster.engine.llm_engine import LLMEngine
        from cluster.kv_transfer.agent import NixlKVAgent

        torch.set_num_threads(1)  # one core computes, the other is the decode side's
        blocks = 2 * (max_len // 16 + 2)
        config = EngineConfig(
            model=model_dir, role="prefill", max_model_len=max_len + 8,
            cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_len + 8),
        )  # fmt: skip
        self.engine = LLMEngine(config)
        self.agent = NixlKVAgent("lw-prefill", self.engine.runner.kv_cache, layerwise=True)
        self.mode, self.request_id, self.peer = "whole", "", ""
        layers = list(self.engine.runner.model.layers.values())
        layers[0].register_forward_pre_hook(lambda *_: self._announce_blocks())
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, i=i: self._layer_done(i))

    def info(self):
        return self.agent.info()

    def kv_shape(self) -> tuple:
        return tuple(self.engine.runner.kv_cache.shape)

    def add_remote(self, info) -> None:
        self.peer = self.agent.add_remote(info)
        # NIXL connects to a peer on first use and a notification sent while it connects
        # can be lost (seen here: the first one never arrived); connect before timing.
        for _ in range(3):
            self.agent.send_notification(self.peer, b"hello")
            time.sleep(0.05)

    def _announce_blocks(self) -> None:
        ids = self.engine.block_manager.block_ids(self.request_id)
        message = f"B{self.start:.9f}:{','.join(map(str, ids))}"
        self.agent.send_notification(self.peer, message.encode())

    def _layer_done(self, i: int) -> None:
        if self.mode == "layerwise":
            self.agent.send_notification(self.peer, f"L{i}".encode())

    def prefill(self, mode: str, prompt_len: int, seed: int) -> float:
        """One prefill; returns its compute seconds (the step, hooks included)."""
        import random

        from cluster.engine.sampling_params import SamplingParams

        self.mode, self.request_id = mode, f"lw-{seed}"
        prompt = [random.Random(seed).randrange(3, 4000) for _ in range(prompt_len)]
        self.engine.add_request(self.request_id, prompt, SamplingParams(max_tokens=1))
        self.start = time.time()
        self.engine.step()
        compute_s = time.time() - self.start
        self.agent.send_notification(self.peer, b"D")
        self.engine.release(self.request_id)
        return compute_s


class DecodeSide:
    def __init__(self, kv_shape: tuple):
        import torch

        from cluster.kv_transfer.agent import NixlKVAgent

        torch.set_num_threads(1)
        self.pool = torch.zeros(kv_shape)
        self.agent = NixlKVAgent("lw-decode", self.pool, layerwise=True)
        self.num_layers = self.agent.layout.num_layers

    def info(self):
        return self.agent.info()

    def add_remote(self, info) -> None:
        self.peer = self.agent.add_remote(info)

    def receive(self, mode: str, timeout_s: float = 60.0) -> dict:
        """Answer one prefill's notifications; seconds from its start to the KV in place."""
        start, ids, handles, pending, ready_s, ended = None, None, [], [], None, False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, message in self.agent.get_notifications():
                text = message.decode()
                if text.startswith("B"):
                    stamp, _, id_text = text[1:].partition(":")
                    start, ids = float(stamp), [int(x) for x in id_text.split(",")]
                elif text.startswith("L") and mode == "layerwise":
                    pending.append(
                        self.agent.read_layers(self.peer, ids, ids, [int(text[1:])], b"")
                    )
                elif text == "D":  # the prefill's step returned
                    ended = True
                    if mode == "whole":
                        pending.append(self.agent.read_blocks(self.peer, ids, ids, b""))
            for handle in list(pending):
                state = self.agent.poll(handle)
                if state != "PROC":
                    assert state == "DONE", state
                    self.agent.release(handle)
                    pending.remove(handle)
                    handles.append(handle)
            wanted = self.num_layers if mode == "layerwise" else 1
            if ready_s is None and len(handles) >= wanted and not pending:
                ready_s = time.time() - start
            if ready_s is not None and ended:  # every message of this prefill consumed
                return {"ready_s": ready_s, "num_reads": len(handles),
                        "num_bytes": sum(h.num_bytes for h in handles)}  # fmt: skip
            time.sleep(20e-6)
        raise TimeoutError(f"{mode}: the KV never arrived")

    def pull_alone(self, repeats: int) -> float:
        """A whole pull of the last request's blocks with nothing else running."""
        return statistics.median(self._pull_once() for _ in range(repeats))

    def _pull_once(self) -> float:
        ids = list(range(self._last_num_blocks))
        start = time.perf_counter()
        handle = self.agent.read_blocks(self.peer, ids, ids, b"")
        while self.agent.poll(handle) == "PROC":
            pass
        self.agent.release(handle)
        return time.perf_counter() - start

    def set_num_blocks(self, n: int) -> None:
        self._last_num_blocks = n


def run(args) -> dict:
    import ray

    from cluster.bench.engine_bench import ModelShape, write_checkpoint

    opt = {k: getattr(args, k, None) or (QUICK if args.quick else DEFAULTS)[k] for k in DEFAULTS}
    lens = list(opt["prompt_lens"])
    with tempfile.TemporaryDirectory() as tmp:
        shape = ModelShape(opt["num_layers"], opt["hidden_size"], max_position_embeddings=4096)
        model_dir = str(write_checkpoint(Path(tmp) / "model", shape, seed=0))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            rows = _measure(model_dir, lens, opt["repeats"])
        finally:
            ray.shutdown()
    result = {"model": {"num_layers": opt["num_layers"], "hidden_size": opt["hidden_size"],
                        "dtype": "float32"}, "rows": rows}  # fmt: skip
    report(result, table(result), args)
    return result


def _measure(model_dir: str, lens: list[int], repeats: int) -> list[dict]:
    import ray

    prefill = ray.remote(num_cpus=0)(PrefillSide).remote(model_dir, max(lens))
    decode = ray.remote(num_cpus=0)(DecodeSide).remote(ray.get(prefill.kv_shape.remote()))
    ray.get(decode.add_remote.remote(ray.get(prefill.info.remote())))
    ray.get(prefill.add_remote.remote(ray.get(decode.info.remote())))
    rows = []
    for n in lens:
        samples: dict[str, list] = {"whole": [], "layerwise": []}
        for r in range(repeats + 1):  # the first round warms both sides up
            for mode in ("whole", "layerwise"):
                ready = decode.receive.remote(mode)
                compute_s = ray.get(prefill.prefill.remote(mode, n, seed=r))
                got = ray.get(ready)
                if r:
                    samples[mode].append((got["ready_s"], compute_s, got["num_reads"]))
        ray.get(decode.set_num_blocks.remote(-(-n // 16)))
        alone = ray.get(decode.pull_alone.remote(max(3, repeats)))
        rows.append(_row(n, samples, alone))
    return rows


def _row(prompt_len: int, samples: dict, alone_s: float) -> dict:
    """Medians per mode. The tail (KV ready minus the prefill's own compute time, per run)
    is what a request waits for its KV after the prefill: what layer-wise pulls can hide.
    Run-to-run noise in the compute (seconds on a shared CPU) swamps the ready times
    themselves, so compare tails."""
    med = {m: [statistics.median(x[i] for x in s) for i in range(2)] for m, s in samples.items()}
    tail = {m: statistics.median(x[0] - x[1] for x in s) * 1e3 for m, s in samples.items()}
    whole, layer = med["whole"], med["layerwise"]
    return {
        "whole_tail_ms": tail["whole"],
        "layerwise_tail_ms": tail["layerwise"],
        "prompt_len": prompt_len,
        "whole_ready_ms": whole[0] * 1e3,
        "layerwise_ready_ms": layer[0] * 1e3,
        "saving_ms": (whole[0] - layer[0]) * 1e3,
        "whole_compute_ms": whole[1] * 1e3,
        "layerwise_compute_ms": layer[1] * 1e3,
        "pull_alone_ms": alone_s * 1e3,
        "layerwise_reads": samples["layerwise"][0][2],
    }


def table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"bench Llama {m['num_layers']} layers x {m['hidden_size']} ({m['dtype']}); tail = KV "
        "ready (at the decode side) minus the prefill's compute; medians",
        f"{'prompt':>7s} {'prefill ms':>11s} {'tail whole ms':>14s} {'tail layerwise ms':>18s} "
        f"{'pull alone ms':>14s} {'reads':>6s}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['prompt_len']:7d} {r['whole_compute_ms']:11.1f} {r['whole_tail_ms']:14.2f} "
            f"{r['layerwise_tail_ms']:18.2f} {r['pull_alone_ms']:14.2f} "
            f"{r['layerwise_reads']:6d}"
        )
    return "\n".join(lines)
