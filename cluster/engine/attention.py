"""Paged attention backends, picked by name. A backend writes a step's new K/V into the paged
cache, then attends each query over its request's blocks.

The flattened batch is laid out decodes first (one token each), then prefill chunks:

    tokens  [ d0 d1 ... d(B-1) | p0 p0 p0 ... | p1 p1 ... ]
             decode_* fields      prefills[0]    prefills[1]

One layer's cache view is [num_blocks, 2, num_kv_heads, block_size, head_dim] (K at 0, V at
1; a strided view of the pool, model_runner.py); slot_block_ids/slot_offsets say where each
new token's K/V goes. Keys are written before any query reads, so a chunk sees its own tokens
and a prefix block filled earlier in the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """Queries [q_start, q_start + q_len) of the batch, over keys 0 .. ctx_len-1 of a request."""

    q_start: int
    q_len: int
    ctx_len: int
    block_ids: torch.Tensor  # blocks covering ctx_len tokens
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None when plain causal from position 0


@dataclass(slots=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one padded call (padding to the
    longest context of the whole batch would waste most of the gathered keys)."""

    rows: torch.Tensor  # indices into the batch's decode rows
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] additive: 0 or -inf
    ctx_len: int  # keys to attend when mask is None (a lone row: slice, don't mask)


@dataclass(slots=True)
class AttentionMetadata:
    slot_block_ids: torch.Tensor  # [T]
    slot_offsets: torch.Tensor  # [T]
    num_decodes: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)


class TorchPagedAttention:
    """Reference backend in plain torch: gathers each request's blocks and calls SDPA.
    Decodes run as one padded, masked SDPA call; prefill chunks one call each."""

    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
        k_cache[meta.slot_block_ids, :, meta.slot_offsets] = k
        v_cache[meta.slot_block_ids, :, meta.slot_offsets] = v
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], k_cache, v_cache, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            out[rows] = self._prefill(q[rows], k_cache, v_cache, chunk)
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in meta.decode_groups:
            out[group.rows] = self._decode_group(q[group.rows], k_cache, v_cache, group)
        return out

    def _decode_group(self, q, k_cache, v_cache, group: DecodeGroup) -> torch.Tensor:
        num_seqs, max_blocks = group.block_tables.shape
        keys = _gather(k_cache, group.block_tables.flatten(), num_seqs)[..., : group.ctx_len, :]
        values = _gather(v_cache, group.block_tables.flatten(), num_seqs)[..., : group.ctx_len, :]
        # Fold each kv head's query heads into the query length: one [G, L] matmul per kv
        # head instead of SDPA's GQA expansion.
        group_size = self.num_heads // self.num_kv_heads
        q = q.view(num_seqs, self.num_kv_heads, group_size, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask)
        return out.reshape(num_seqs, self.num_heads, self.head_dim)

    def _prefill(self, q, k_cache, v_cache, chunk: PrefillChunk) -> torch.Tensor:
        keys = _gather(k_cache, chunk.block_ids, 1)[0, :, : chunk.ctx_len]
        values = _gather(v_cache, chunk.block_ids, 1)[0, :, : chunk.ctx_len]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys,
            values,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=True,
        )
        return out.transpose(0, 1)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[num_seqs, heads, tokens, head_dim] keys (or values) of the blocks, num_seqs equal runs
    of block_ids. One copy, head by head: index_select of whole [block_size, head_dim] tiles
    from each head's strided view lands a head's tokens side by side (2x faster here than
    copying whole blocks out and then transposing them)."""
    heads, block_size, head_dim = cache.shape[1:]
    out = torch.empty((heads, len(block_ids), block_size, head_dim), dtype=cache.dtype,
                      device=cache.device)  # fmt: skip
    for h in range(heads):
        torch.index_select(cache[:, h], 0, block_ids, out=out[h])
    return out.view(heads, num_seqs, -1, head_dim).transpose(0, 1)


BACKENDS = {"torch": TorchPagedAttention}


def get_backend(name: str, device: torch.device) -> type[TorchPagedAttention]:
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]
