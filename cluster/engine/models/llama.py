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
from cluster.engine.parallel import PPStage, TPGroup

_SINGLE = TPGroup()
_ONE_STAGE = PPStage()


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
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: TorchPagedAttention,
                 tp: TPGroup = _SINGLE):  # fmt: skip
        super().__init__()
        self.tp = tp
        self.q_heads = tp.split(config.num_heads)  # this rank's [start, end) of heads
        self.kv_heads = tp.kv_heads(config.num_kv_heads)
        self.num_heads = self.q_heads[1] - self.q_heads[0]
        self.num_kv_heads = self.kv_heads[1] - self.kv_heads[0]
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = config.hidden_size
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        # Row-parallel: the bias is added once, on rank 0, before the all-reduce.
        self.o_proj = nn.Linear(self.q_size, hidden, bias=config.o_bias and tp.rank == 0)
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
        return self.tp.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup = _SINGLE):
        super().__init__()
        self.tp = tp
        self.inter = tp.split(config.intermediate_size)
        hidden, inter = config.hidden_size, self.inter[1] - self.inter[0]
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=config.mlp_bias and tp.rank == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class VocabParallelEmbedding(nn.Module):
    """Rank r's rows [start, end) of the table, padded to ceil(V / tp) rows."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.start, self.end, share = tp.padded_split(vocab_size)
        self.weight = nn.Parameter(torch.zeros(share, hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.start) & (input_ids < self.end)
        local = torch.where(mine, input_ids - self.start, 0)
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary, backend, tp: TPGroup = _SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary, backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, positions, x, kv_layer, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """One pipeline stage of the model (the whole model when pp = 1): the embedding on the
    first stage (and on the last when the head is tied to it), its layers, and the final norm
    and head on the last stage."""

    def __init__(self, config: ModelConfig, backend: TorchPagedAttention, max_len: int,
                 tp: TPGroup = _SINGLE, pp: PPStage = _ONE_STAGE):  # fmt: skip
        super().__init__()
        self.config, self.tp, self.pp = config, tp, pp
        rotary = RotaryEmbedding(config, max_len)
        if pp.is_first or (pp.is_last and config.tie_word_embeddings):
            if tp.size == 1:
                self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            else:
                self.embed_tokens = VocabParallelEmbedding(
                    config.vocab_size, config.hidden_size, tp
                )
        self.layer_range = pp.layers(config.num_layers)
        # Keyed by the model-wide index so parameter names stay the checkpoint's.
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, rotary, backend, tp) for i in range(*self.layer_range)}
        )
        if pp.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if not config.tie_word_embeddings:
                rows = tp.padded_split(config.vocab_size)[2]
                self.lm_head = nn.Linear(config.hidden_size, rows, bias=False)
        self.rotary = rotary

    def forward(self, input_ids, positions, kv_layers, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Token ids in (first stage) or the previous stage's hidden states; the next
        stage's input out, or the final normed hidden states on the last stage."""
        x = self.embed_tokens(input_ids) if hidden is None else hidden
        for layer, kv_layer in zip(self.layers.values(), kv_layers, strict=True):
            x = layer(positions, x, kv_layer, meta)
        return self.norm(x) if self.pp.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = (
            self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        )
        logits = self.tp.all_gather_last(F.linear(hidden, weight))
        return logits[..., : self.config.vocab_size]

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
        """The checkpoint's tensor for parameter `name`, fused and cut to this rank's share
        (cluster/engine/parallel.py says which share)."""
        module_name, _, leaf = name.rpartition(".")
        prefix = module_name
        if name.startswith(("embed_tokens", "layers", "norm")):
            prefix = "model." + prefix if prefix else "model"
        hd = self.config.head_dim
        if prefix.endswith("qkv_proj"):
            base, attn = prefix[: -len("qkv_proj")], self.get_submodule(module_name[:-9])
            (q0, q1), (k0, k1) = attn.q_heads, attn.kv_heads
            q = get(f"{base}q_proj.{leaf}")[q0 * hd : q1 * hd]
            k, v = (get(f"{base}{p}_proj.{leaf}")[k0 * hd : k1 * hd] for p in "kv")
            return torch.cat([q, k, v])
        if prefix.endswith("gate_up_proj"):
            base, mlp = prefix[: -len("gate_up_proj")], self.get_submodule(module_name[:-13])
            i0, i1 = mlp.inter
            return torch.cat([get(f"{base}{p}_proj.{leaf}")[i0:i1] for p in ("gate", "up")])
        tensor = get(f"{prefix}.{leaf}" if prefix else leaf)
        if self.tp.size == 1 or leaf == "bias":
            return tensor
        if prefix.endswith("o_proj"):
            q0, q1 = self.get_submodule(module_name[:-7]).q_heads
            return tensor[:, q0 * hd : q1 * hd]
        if prefix.endswith("down_proj"):
            i0, i1 = self.get_submodule(module_name[:-10]).inter
            return tensor[:, i0:i1]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            start, end, share = self.tp.padded_split(self.config.vocab_size)
            rows = torch.zeros(share, tensor.shape[1], dtype=tensor.dtype)
            rows[: end - start] = tensor[start:end]
            return rows
        return tensor
