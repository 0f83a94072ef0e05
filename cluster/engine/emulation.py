"""The emulated model runner (`model_runner: emulated`): a real engine (scheduler, block
manager, prefix cache, preemption, roles, KV pool and NIXL transfers) whose forward pass is a
sleep for the step time the placement latency model predicts for exactly that batch on the
emulated device and instance shape (cluster/placement/latency.py), times `time_scale`.

What is emulated and what is real:

    step time      AnalyticLatency(model, hardware, tp, pp) of the step's prefill tokens,
                   attention pairs, decode batch and contexts, x time_scale
    KV capacity    the planner's memory model (weights, activation reserve, KV per token)
                   for the instance's TP x PP devices, in blocks
    KV pool        a stand-in of STANDIN_BLOCK_BYTES per block, pulled over NIXL for real;
                   the decode side then waits what the model's KV bytes would take on the
                   deployment's link (transfer_delay_s)
    tokens         deterministic: a hash of the prompt and the position, so every mode and
                   instance shape produces the same text for the same prompt; under a
                   grammar (structured outputs) the next token the grammar allows from
                   there. Penalties, logit_bias and min_tokens are ignored (no logits);
                   every reported logprob, prompt logprobs included, is 0
    processes      one per instance whatever its TP x PP (no ranks, no process group)

Kernel speed is what it does not show: these are the step times of an engine that runs at
the latency model's efficiency (about vLLM's), not our engine's (docs/benchmarks.md, "Our
engine on an H200"). Numbers measured on an emulated cluster are labelled emulated.
"""

from __future__ import annotations

import bisect
import threading
import time
import zlib
from dataclasses import dataclass

import torch

from cluster.engine.config import EngineConfig, ModelConfig
from cluster.engine.kv_pool import allocate_kv_pool
from cluster.engine.model_runner import ModelRunner, follow_grammar, made_up_output
from cluster.engine.parallel import PPStage, TPGroup

STANDIN_HEAD_DIM = 4  # fp32 stand-in: 2 (K, V) x block_size x 4 x 4 bytes = 512 B a block


@dataclass(slots=True, frozen=True)
class Emulation:
    """What one emulated instance stands for. `model`: a preset name or a config.json;
    `kv_bandwidth`: bytes/s its KV pulls get (decode instances; the deployment works it out
    from the plan's affinity, see cluster/emulate.py); `kv_capacity_tokens`: None for the
    planner's memory model."""

    hardware: str
    model: str
    tp: int = 1
    pp: int = 1
    time_scale: float = 1.0
    kv_capacity_tokens: int | None = None
    kv_bandwidth: float | None = None
    catalog: str | None = None  # YAML of extra hardware entries

    def __post_init__(self) -> None:
        if not self.time_scale >= 1.0:
            raise ValueError(f"emulation time_scale must be >= 1, got {self.time_scale}")
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"emulation tp and pp must be >= 1, got {self.tp} and {self.pp}")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise ValueError("emulation kv_capacity_tokens must be >= 1")
        if self.kv_bandwidth is not None and not self.kv_bandwidth > 0:
            raise ValueError("emulation kv_bandwidth must be > 0 bytes/s")

    @classmethod
    def from_dict(cls, data: dict) -> Emulation:
        if isinstance(data, Emulation):
            return data
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown emulation keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def resolve(self):
        """(ModelSpec, Hardware, ParallelConfig); ValueError for an unknown name or a shape
        the model cannot take."""
        from cluster.placement.hardware import get_hardware, load_catalog
        from cluster.placement.instance import ParallelConfig, why_invalid
        from cluster.placement.model_spec import load_model_spec

        spec = load_model_spec(self.model)
        hardware = get_hardware(self.hardware, load_catalog(self.catalog))
        parallel = ParallelConfig(hardware, self.tp, self.pp)
        reason = why_invalid(spec, parallel)
        if reason is not None:
            raise ValueError(f"cannot emulate {spec.name} on {parallel.describe()}: {reason}")
        return spec, hardware, parallel

    def label(self) -> str:
        return f"emulated {self.hardware} TP{self.tp}xPP{self.pp}, time scale {self.time_scale:g}"


class EmulatedModelRunner(ModelRunner):
    """ModelRunner's interface without a model (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        if config.world_size > 1:
            raise ValueError(
                "an emulated instance is one process: give its TP x PP in emulation, not in "
                "tensor_parallel_size / pipeline_parallel_size"
            )
        from cluster.placement.instance import kv_capacity_tokens
        from cluster.placement.latency import AnalyticLatency

        emulation = config.emulation
        self.emulation = emulation
        self.spec, self.hardware, parallel = emulation.resolve()
        self.latency = AnalyticLatency(self.spec, self.hardware, emulation.tp, emulation.pp)
        self.time_scale = emulation.time_scale
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.model_config = model_config
        self.block_size = config.cache.block_size
        self.sliding_window = None
        self.tp, self.pp = TPGroup(0, 1, None), PPStage(0, 1, 0, 1)
        self.num_layers, self.num_kv_heads = 1, 1
        capacity = emulation.kv_capacity_tokens or kv_capacity_tokens(self.spec, parallel)
        self.num_blocks = config.cache.num_blocks or max(1, capacity // self.block_size)
        self.kv_cache = allocate_kv_pool(self.kv_cache_shape, self.dtype, self.device)
        self.vocab = model_config.vocab_size
        self.avoid = set(model_config.eos_token_ids)
        self.stats = StepStats()
        self._last_end: float | None = None  # when the last step's sleep ended
        self._continuing = False  # the engine steps again at once (step_done)

    @property
    def kv_cache_shape(self) -> tuple[int, ...]:
        return (self.num_blocks, 1, 1, 2, self.block_size, STANDIN_HEAD_DIM)

    def step_time(self, plan) -> float:
        """The latency model's time for this batch, in emulated (real-world) seconds."""
        chunk_tokens, pairs, batch, context = 0, 0.0, 0, 0
        for request in plan.requests:
            n = plan.num_scheduled_tokens[request.request_id]
            done = request.num_computed_tokens
            if request.is_prefilling:
                chunk_tokens += n
                pairs += n * done + n * n / 2
            else:
                batch += 1
                context += done + n
        if not chunk_tokens:
            return self.latency.decode_time(batch, context)
        return self.latency.mixed_time(chunk_tokens, pairs, batch, context)

    def step_done(self, more_work: bool) -> None:
        self._continuing = more_work

    def execute(self, plan, block_tables, generators, grammar=None):
        """Sleep to the step's deadline. Steps that follow each other at once are timed
        back to back from the end of the previous one, so the engine's own time between
        steps (scheduling, outputs, streaming: this CPU's, not the emulated device's) is
        taken out of the sleep rather than added to the step; the latency model's per-step
        overhead stands for it. After an idle engine the step counts from now."""
        now = time.perf_counter()
        modelled = self.step_time(plan) * self.time_scale
        start = self._last_end if self._continuing and self._last_end is not None else now
        sampled = []
        for request in plan.requests:
            end = request.num_computed_tokens + plan.num_scheduled_tokens[request.request_id]
            if end == request.num_tokens:
                sampled.append(request)
        token_ids = follow_grammar([self.token(r) for r in sampled], sampled, grammar)
        _sleep_until(start + modelled)
        self._last_end = end = time.perf_counter()
        self._continuing = False
        self.stats.add(modelled, end - start)
        return made_up_output(plan, sampled, token_ids)

    def token(self, request) -> int:
        """The token at this request's next position: a hash of its prompt (length, first
        and last 16 ids) and the position; never below 3 and never an EOS id."""
        prompt = request.prompt_token_ids
        key = f"{len(prompt)}:{prompt[:16]}:{prompt[-16:]}:{request.num_tokens}".encode()
        token = 3 + zlib.crc32(key) % (self.vocab - 3)
        while token in self.avoid:
            token = 3 + (token - 2) % (self.vocab - 3)
        return token

    def transfer_delay_s(self, num_tokens: int) -> float:
        """Emulated seconds a pull of `num_tokens` of this model's KV takes on the
        deployment's link, as the planner models it (placement/search.py transfer_s)."""
        from cluster.placement.search import TRANSFER_FIXED_S

        bandwidth = self.emulation.kv_bandwidth or (
            self.hardware.inter_node_bandwidth * self.emulation.tp * self.emulation.pp
        )
        return TRANSFER_FIXED_S + num_tokens * self.spec.kv_bytes_per_token / bandwidth


def _sleep_until(deadline: float) -> None:
    """time.sleep to within 0.2 ms (it may overshoot by its timer slack), then yield."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left - 0.0002 if left > 0.0004 else 0)


class StepStats:
    """Achieved against modelled step times (real seconds), for the emulator's own check:
    the ratio of each step, kept as a sorted sample of at most MAX_SAMPLES. A step that
    follows another at once is measured from the end of the previous one, so the engine's
    time between steps counts in it."""

    MAX_SAMPLES = 20_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ratios: list[float] = []
        self.num_steps = 0
        self.modelled_s = 0.0
        self.achieved_s = 0.0

    def add(self, modelled: float, achieved: float) -> None:
        with self._lock:
            self.num_steps += 1
            self.modelled_s += modelled
            self.achieved_s += achieved
            if modelled > 0 and len(self.ratios) < self.MAX_SAMPLES:
                bisect.insort(self.ratios, achieved / modelled)

    def summary(self) -> dict:
        with self._lock:
            r = self.ratios

            def q(p: float) -> float | None:
                return r[min(len(r) - 1, int(p * len(r)))] if r else None

            return {
                "num_steps": self.num_steps,
                "modelled_s": self.modelled_s,
                "achieved_s": self.achieved_s,
                "ratio_p50": q(0.5),
                "ratio_p99": q(0.99),
            }
