"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

One class serves all four: the differences are config flags (q/k/v bias, q/k RMSNorm, sliding
window, tied embeddings, RoPE scaling). Inputs are flattened tokens with their positions, as
in vLLM; the numerics follow `transformers` (fp32 RMSNorm, non-interleaved RoPE in fp32) so
that greedy output matches it token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cluster.engine.attention import AttentionMetadata, TorchPagedAttention
from cluster.engine.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with `linear` or `llama3` scaling applied (Llama 3.1 report)."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, max_len: int):
        super().__init__()
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rope_inv_freq(config)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions, q, k):
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: TorchPagedAttention):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = config.hidden_size
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary = rotary
        self.backend = backend

    def forward(self, positions, x, kv_layer, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv_layer, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, positions, x, kv_layer, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: TorchPagedAttention, max_len: int):
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config, max_len)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rotary, backend) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = rotary

    def forward(self, input_ids, positions, kv_layers, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer, kv_layer in zip(self.layers, kv_layers, strict=True):
            x = layer(positions, x, kv_layer, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = (
            self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        )
        return F.linear(hidden, weight)

    def load_weights(self, get: Callable[[str], torch.Tensor]) -> None:
        """Copy a checkpoint in via `get(hf_name)` (raises KeyError when absent), fusing
        q/k/v and gate/up. Raises ValueError listing every weight the checkpoint lacks."""
        missing: list[str] = []
        for name, param in self.named_parameters():
            try:
                tensor = self._checkpoint_tensor(name, get)
            except KeyError as e:
                missing.append(str(e.args[0]))
                continue
            if tensor.shape != param.shape:
                raise ValueError(
                    f"weight {name}: checkpoint shape {tuple(tensor.shape)}, "
                    f"config implies {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")

    def _checkpoint_tensor(self, name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        prefix, _, leaf = name.rpartition(".")
        if name.startswith(("embed_tokens", "layers", "norm")):
            prefix = "model." + prefix if prefix else "model"
        if prefix.endswith("qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            return torch.cat([get(f"{base}{p}_proj.{leaf}") for p in "qkv"])
        if prefix.endswith("gate_up_proj"):
            base = prefix[: -len("gate_up_proj")]
            return torch.cat([get(f"{base}{p}_proj.{leaf}") for p in ("gate", "up")])
        return get(f"{prefix}.{leaf}" if prefix else leaf)
