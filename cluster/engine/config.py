"""Engine configuration: the model's shape read from a Hugging Face config.json, and the
engine's own knobs (cache, scheduler, role). Built once at the edge, passed down as values.

config.json is read as plain JSON rather than through `transformers` so that both the old
(`rope_theta` + `rope_scaling`) and the new (`rope_parameters`) spellings load the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

# architecture -> (model family, q/k/v carry a bias regardless of config, q/k RMSNorm per head)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

Role = Literal["colocated", "prefill", "decode"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def model_identity(path: str) -> str:
    """A short fingerprint of a checkpoint: its config.json, and each weight file's name,
    size and first and last MiB (different weights of the same shapes differ there; the
    whole files would take minutes to hash). Part of the KV layout's compatibility hash."""
    digest = hashlib.blake2b(digest_size=8)
    folder = Path(path)
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(_IDENTITY_SAMPLE_BYTES))
            f.seek(max(0, size - _IDENTITY_SAMPLE_BYTES))
            digest.update(f.read(_IDENTITY_SAMPLE_BYTES))
    return digest.hexdigest()


_IDENTITY_SAMPLE_BYTES = 1 << 20


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, as our model code needs it."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    checkpoint_dtype: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a model folder: it has no config.json")
        return cls.from_dict(json.loads(config_file.read_text()), path=str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], path: str = "") -> ModelConfig:
        arch = _architecture(cfg)
        _, forced_qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        _check_supported(cfg, arch)
        num_heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        rope_theta, rope_scaling = _rope(cfg)
        eos = cfg.get("eos_token_id")
        return cls(
            path=path,
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=forced_qkv_bias or attention_bias,
            o_bias=attention_bias and arch != "Qwen2ForCausalLM",  # Qwen2: q/k/v bias only
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
            sliding_window=_sliding_window(cfg, arch),
            checkpoint_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV bytes one token occupies across all layers (K and V)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    name = archs[0] if archs else f"model_type={cfg.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {name}; supported: {supported}")


def _check_supported(cfg: dict[str, Any], arch: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch} with hidden_act={act!r} is not supported; only 'silu' is")
    for key in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in cfg:
            raise ValueError(f"config.json lacks {key!r}, which a {arch} config must have")


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    if arch == "MistralForCausalLM":
        return cfg.get("sliding_window")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{arch} with use_sliding_window=true is not supported")
    return None


@dataclass(slots=True, frozen=True)
class CacheConfig:
    """Paged KV cache: block size and how much memory the pool may take."""

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: 512 MiB on CPU, see below on CUDA
    gpu_memory_utilization: float = 0.9  # CUDA: share of device memory for weights + KV
    num_blocks: int | None = None  # overrides the memory budget when set
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be > 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    """Iteration-level batching limits.

    max_num_batched_tokens is the per-step token budget (decodes take one each, prefill chunks
    the rest); long_prefill_token_threshold caps one request's chunk so that a long prompt
    cannot take a whole step (0: no cap beyond the budget).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256  # effectively at most max_num_batched_tokens (one token per decode)
    long_prefill_token_threshold: int = 0
    policy: Literal["fcfs", "priority"] = "fcfs"
    # False: no chunking, prefill first (vLLM v0, DistServe's colocated baseline and its
    # prefill instances): a step runs either whole prompts, while they fit the budget (the
    # first always runs, however long), or, when none can start, every decode; never both.
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        if self.long_prefill_token_threshold and not self.chunked_prefill:
            raise ValueError("long_prefill_token_threshold caps chunks: it needs chunked_prefill")


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Everything one engine instance needs. `model` is a checkpoint folder; None means the
    embedded tiny default."""

    model: str | None = None
    role: Role = "colocated"
    device: str = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    # "model": the real forward pass. "noop": no model work at all (deterministic tokens,
    # KV untouched) to measure what serving around the engine costs (`cluster bench router`).
    # "emulated": the step times, KV capacity and transfers of `emulation` (an Emulation or
    # its dict: the model, device and TP x PP emulated; cluster/engine/emulation.py).
    model_runner: str = "model"
    emulation: Any = None
    # Parallelism: this process is tensor-parallel rank `tensor_parallel_rank` of pipeline
    # stage `pipeline_parallel_rank` of an instance of tensor_parallel_size x
    # pipeline_parallel_size ranks meeting at `dist_init_method` (cluster/engine/parallel.py).
    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0
    pipeline_parallel_size: int = 1
    pipeline_parallel_rank: int = 0
    # Micro-batches a step is cut into for the pipeline (0: one per stage), each of at least
    # pipeline_microbatch_min_tokens: a memory-bound step (decodes) gains nothing from
    # overlapping stages and would read each stage's weights once per micro-batch.
    pipeline_microbatches: int = 0
    pipeline_microbatch_min_tokens: int = 128
    dist_init_method: str = ""
    # A collective that waits longer than this for a rank fails, and with it the instance:
    # a rank that hangs (or, under NCCL, dies: its peers wait rather than error) ends the
    # instance's requests by their failure policy after at most this long. It also bounds
    # how far apart the ranks may start (rendezvous, then the first collective after loading).
    dist_timeout_s: float = 300.0
    # Lets tests and `cluster bench chaos` arm the fault points of cluster/faults.py through
    # the worker's inject_fault(); off in any real deployment.
    fault_injection: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.role not in ("colocated", "prefill", "decode"):
            raise ValueError(f"role must be colocated, prefill or decode, got {self.role!r}")
        if self.model_runner not in ("model", "noop", "emulated"):
            raise ValueError(
                f"model_runner must be model, noop or emulated, got {self.model_runner!r}"
            )
        if (self.model_runner == "emulated") != (self.emulation is not None):
            raise ValueError("model_runner emulated and an emulation go together")
        if self.emulation is not None:
            from cluster.engine.emulation import Emulation

            object.__setattr__(self, "emulation", Emulation.from_dict(self.emulation))
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {list(_DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.tensor_parallel_rank < self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_rank must be in [0, {self.tensor_parallel_size}), "
                f"got {self.tensor_parallel_rank}"
            )
        if not 0 <= self.pipeline_parallel_rank < self.pipeline_parallel_size:
            raise ValueError(
                f"pipeline_parallel_rank must be in [0, {self.pipeline_parallel_size}), "
                f"got {self.pipeline_parallel_rank}"
            )
        if self.pipeline_microbatches < 0:
            raise ValueError(
                f"pipeline_microbatches must be >= 0 (0: one per stage), got "
                f"{self.pipeline_microbatches}"
            )
        if self.world_size > 1 and not self.dist_init_method:
            raise ValueError(
                "tensor_parallel_size x pipeline_parallel_size > 1 needs dist_init_method "
                "(tcp://host:port)"
            )
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def world_size(self) -> int:
        """Ranks of the instance."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def global_rank(self) -> int:
        return self.pipeline_parallel_rank * self.tensor_parallel_size + self.tensor_parallel_rank

    def torch_dtype(self, model: ModelConfig) -> torch.dtype:
        """fp32 on CPU unless asked (bf16 matmuls are slow there); the checkpoint's on CUDA."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if torch.device(self.device).type == "cpu":
            return torch.float32
        return _DTYPES.get(model.checkpoint_dtype, torch.bfloat16)

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={limit}"
            )
        return self.max_model_len
