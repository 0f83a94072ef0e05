"""The sizes of a model that placement decisions start from: layers, widths, heads, and from
them parameters, weight bytes, KV bytes per token and FLOPs per token. Read from a Hugging Face
config.json (Llama, Mistral, Qwen2/3, OPT families) or taken from a named preset; the planner
never needs the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """A decoder-only transformer, by shape. `gated_mlp`: SwiGLU (three FFN matrices, Llama);
    otherwise a two-matrix MLP (OPT). `learned_positions`: OPT's position embedding table."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    gated_mlp: bool = True
    tie_word_embeddings: bool = False
    learned_positions: bool = False
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"model {self.name}: {key} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"model {self.name}: dtype must be one of {sorted(_DTYPE_BYTES)}")

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (attention + MLP; norms and biases are noise here)."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return attn + mlp

    @property
    def embedding_params(self) -> int:
        tables = 1 if self.tie_word_embeddings else 2
        positions = self.max_position_embeddings if self.learned_positions else 0
        return (tables * self.vocab_size + positions) * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the layers and the LM head, attention scores
        excluded (they depend on the context: see attention_flops)."""
        return 2 * (self.num_layers * self.layer_params + self.vocab_size * self.hidden_size)

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one (query token, context token) pair over all layers: QK^T and PV."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        info = asdict(self)
        info.update(
            num_params=self.num_params,
            weight_bytes=self.weight_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
        )
        return info

    @classmethod
    def from_dict(cls, info: dict[str, Any]) -> ModelSpec:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in info.items() if k in fields})

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> ModelSpec:
        """From a Hugging Face config.json dict. OPT names its fields differently."""
        name = name or cfg.get("_name_or_path") or cfg.get("model_type", "model")
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
        dtype = dtype if dtype in _DTYPE_BYTES else "bfloat16"
        opt = cfg.get("model_type") == "opt"  # MHA, two-matrix MLP, learned positions
        try:
            heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
            return cls(
                name=name,
                num_layers=cfg["num_hidden_layers"],
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=heads if opt else cfg.get("num_key_value_heads") or heads,
                head_dim=hidden // heads if opt else cfg.get("head_dim") or hidden // heads,
                intermediate_size=cfg["ffn_dim" if opt else "intermediate_size"],
                vocab_size=cfg["vocab_size"],
                max_position_embeddings=cfg.get("max_position_embeddings", 2048 if opt else 4096),
                gated_mlp=not opt,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", opt)),
                learned_positions=opt,
                dtype="float16" if opt and dtype == "float32" else dtype,
            )
        except KeyError as e:
            raise ValueError(f"config of {name} has no {e.args[0]!r}: not a decoder config") from e


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, ctx, tie=False) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, kv_heads, hidden // heads, ffn, vocab, ctx,
                     tie_word_embeddings=tie)  # fmt: skip


def _opt(name, layers, hidden, heads) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, heads, hidden // heads, 4 * hidden, 50272,
                     2048, gated_mlp=False, tie_word_embeddings=True, learned_positions=True,
                     dtype="float16")  # fmt: skip


# Shapes from each model's published config.json on the Hugging Face Hub.
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _opt("OPT-13B", 40, 5120, 40),
        _opt("OPT-66B", 64, 9216, 72),
        _opt("OPT-175B", 96, 12288, 96),
        _llama("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192),
        _llama("Llama-3-70B", 80, 8192, 64, 8, 28672, 128256, 8192),
        _llama("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000, 4096),
        _llama("Mistral-7B", 32, 4096, 32, 8, 14336, 32768, 32768),
        _llama("Qwen2.5-7B", 28, 3584, 28, 4, 18944, 152064, 32768),
        _llama("Qwen2.5-72B", 80, 8192, 64, 8, 29568, 152064, 32768),
    )
}


def load_model_spec(model: str) -> ModelSpec:
    """A preset name (case-insensitive), a config.json, or a checkpoint folder holding one."""
    by_lower = {name.lower(): spec for name, spec in PRESETS.items()}
    if model.lower() in by_lower:
        return by_lower[model.lower()]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"unknown model {model!r}: give a config.json, a checkpoint folder, or one of "
            f"{', '.join(PRESETS)}"
        )
    return ModelSpec.from_hf_config(json.loads(path.read_text()), name=Path(model).name)
