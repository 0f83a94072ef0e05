"""What changes a request's logits before the sampler draws from them: `logit_bias`, the
repetition, frequency and presence penalties, and `min_tokens` (vLLM v1's order; the grammar
mask of structured outputs goes between the penalties and min_tokens, see sampler.py).

Each is one batched tensor op over the rows that ask for it; a batch where no row asks pays a
Python scan of its params and nothing else. Token counts are built per step from the rows'
token ids, only for the rows with penalties.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from cluster.engine.sampling_params import SamplingParams


class TokenHistory(Protocol):
    """What a row's processing reads of its request (engine.request.Request has it)."""

    all_token_ids: list[int]  # prompt, then output
    eos_token_ids: tuple[int, ...]  # empty when the request ignores EOS

    @property
    def num_prompt_tokens(self) -> int: ...


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """logits[row, token] += bias, in place (OpenAI: added to the logits before sampling)."""
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        if p.logit_bias:
            rows.extend(itertools.repeat(row, len(p.logit_bias)))
            cols.extend(p.logit_bias.keys())
            values.extend(p.logit_bias.values())
    if not rows:
        return
    index = (_long(rows, logits.device), _long(cols, logits.device))
    logits.index_put_(index, torch.tensor(values, device=logits.device), accumulate=True)


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]
) -> None:
    """Repetition, then frequency and presence penalties, in place (vLLM's apply_penalties).

    repetition (HF/vLLM): a token seen in the prompt or the output has its logit divided by
    the penalty when positive, multiplied when not. frequency and presence (OpenAI): the
    logit drops by `frequency * count + presence * (count > 0)`, count over the output."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    rows_t = _long(rows, device)
    sub = logits[rows_t]
    repetition = [params[i].repetition_penalty for i in rows]
    if any(r != 1.0 for r in repetition):
        seen = _bin_counts([histories[i].all_token_ids for i in rows], vocab, device) > 0
        penalty = torch.tensor(repetition, device=device).unsqueeze(1)
        scaled = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, scaled, sub)
    if any(params[i].frequency_penalty or params[i].presence_penalty for i in rows):
        outputs = [histories[i].all_token_ids[histories[i].num_prompt_tokens :] for i in rows]
        counts = _bin_counts(outputs, vocab, device)
        frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device)
        presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)
        sub -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0)
    logits.index_copy_(0, rows_t, sub)


def apply_min_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]
) -> None:
    """Rows with fewer than min_tokens output tokens cannot sample EOS or a stop token id
    (vLLM's MinTokensLogitsProcessor), in place. A row this would leave with no token at all
    (its grammar allows only the end) keeps its logits: the grammar wins."""
    rows, local_rows, cols = [], [], []
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        if p.min_tokens and len(h.all_token_ids) - h.num_prompt_tokens < p.min_tokens:
            stop_ids = [t for t in set(h.eos_token_ids).union(p.stop_token_ids)
                        if t < logits.shape[1]]  # fmt: skip
            local_rows.extend(itertools.repeat(len(rows), len(stop_ids)))
            cols.extend(stop_ids)
            rows.append(row)
    if not cols:
        return
    device = logits.device
    rows_t = _long(rows, device)
    sub = logits[rows_t]
    sub[_long(local_rows, device), _long(cols, device)] = -math.inf
    some_left = torch.isfinite(sub).any(dim=1)
    logits[rows_t[some_left]] = sub[some_left]


def _bin_counts(token_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] float counts of each token id in each row's list."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    flat = _long(list(itertools.chain.from_iterable(token_lists)), device)
    row_ids = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    counts = torch.zeros(len(token_lists), vocab, device=device)
    counts.index_put_((row_ids, flat), torch.ones_like(flat, dtype=counts.dtype), accumulate=True)
    return counts


def _long(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
