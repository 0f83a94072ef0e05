"""Turns a batch of next-token logits into token ids, one row per request.

Rows that ask for it first have their logits processed, in this order (vLLM v1's):

    logit_bias ─ repetition, frequency, presence penalties ─ grammar mask ─ min_tokens

(logits_processor.py, structured.py). Then greedy rows take the argmax of the processed
logits; random rows go through temperature, top-k, top-p and min-p as batched tensor ops,
then draw by the exponential race with the row's own generator when it has one, so a seeded
request samples the same tokens whatever it is batched with. Log-probabilities are reported
under the raw (unmodified) model distribution, before any processing or temperature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.engine.logits_processor import (
    TokenHistory,
    apply_logit_bias,
    apply_min_tokens,
    apply_penalties,
)
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.structured import RowMasks

# fp32 cumulative sums land a few ulps either side of the exact value; without this slack a
# distribution whose prefix sums to exactly top_p would sometimes keep one token too many.
_TOP_P_SLACK = 1e-6
# exponential_ may return 0 on some backends; log(0) would let a masked token win the race.
_MIN_EXPONENTIAL = 1e-20


# One prompt position's entry: (logprob of the actual token, top-N (token id, logprob)).
PromptLogprob = tuple[float, list[tuple[int, float]]]


@dataclass(slots=True)
class SamplerOutput:
    """Per-row results; ``logprobs``/``top_logprobs`` are None when no row asked for them.
    ``prompt_logprobs``: request id -> (index of the first prompt token covered, entries for
    it and the ones after), for the requests of the step that asked (model_runner.py)."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_logprobs: dict[str, tuple[int, list[PromptLogprob]]] | None = None


class Sampler:
    """Stateless: every call samples one token for each row of ``logits``.

    `histories` (one per row: its prompt and output token ids, its EOS ids) is read only
    for rows with penalties or min_tokens; `masks` are the grammar rows' allowed tokens."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: Sequence[TokenHistory] | None = None,
        masks: RowMasks | None = None,
    ) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
            raise ValueError(
                f"logits {tuple(logits.shape)} must be [rows, vocab] with one params and one "
                f"generator per row (got {len(params)} params, {len(generators)} generators)"
            )
        raw = logits.float()
        logits = _process(raw, params, histories, masks)
        token_ids = _pick_tokens(logits, params, generators)
        logprobs, top_logprobs = _raw_logprobs(raw, token_ids, params)
        return SamplerOutput(token_ids.tolist(), logprobs, top_logprobs)


def _process(
    raw: torch.Tensor,
    params: list[SamplingParams],
    histories: Sequence[TokenHistory] | None,
    masks: RowMasks | None,
) -> torch.Tensor:
    """The logits the rows sample from: `raw` itself when no row asks for processing, else a
    processed copy (the raw ones still give the reported log-probabilities)."""
    processing = any(p.needs_logits_processing for p in params)
    if not processing and masks is None:
        return raw
    if histories is None and any(p.has_penalties or p.min_tokens for p in params):
        raise ValueError("penalties and min_tokens need each row's token history")
    logits = raw.clone()
    if processing:
        apply_logit_bias(logits, params)
        apply_penalties(logits, params, histories)
    if masks is not None:
        masks.apply(logits)
    if processing:
        apply_min_tokens(logits, params, histories)
    return logits


def _pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Greedy argmax for greedy rows, a filtered random draw for the rest."""
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not random_rows:
        return logits.argmax(dim=-1)
    if len(random_rows) == len(params):
        return _sample(logits, params, generators)
    token_ids = logits.argmax(dim=-1)
    rows = torch.tensor(random_rows, device=logits.device)
    token_ids[rows] = _sample(
        logits[rows], [params[i] for i in random_rows], [generators[i] for i in random_rows]
    )
    return token_ids


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Sample one token per row of non-greedy ``logits`` (fp32, [rows, vocab])."""
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    scaled = logits / temperatures.unsqueeze(1)
    scaled = _apply_top_k_top_p(scaled, params)
    scaled = _apply_min_p(scaled, params)
    return _exponential_race(scaled, generators)


def _apply_top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus."""
    vocab = scaled.shape[1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    use_top_p = any(p.top_p < 1.0 for p in params)
    if not use_top_p and not any(top_ks):
        return scaled
    k = torch.tensor(top_ks, device=scaled.device)
    if not use_top_p:
        # Only the k largest matter, so a partial top-k beats a full vocabulary sort.
        largest = scaled.topk(max(top_ks), dim=-1).values
        return scaled.masked_fill(scaled < _kth_largest(largest, k), -math.inf)

    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    drop_sorted = sorted_logits < _kth_largest(sorted_logits, k)
    sorted_logits = sorted_logits.masked_fill(drop_sorted, -math.inf)
    drop_sorted |= _outside_nucleus(sorted_logits, params)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return scaled.masked_fill(drop, -math.inf)


def _kth_largest(descending: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-row threshold [rows, 1]: the k-th largest value, or -inf where k is 0 (off).

    Thresholding by value (not rank) keeps ties at the boundary, so the partial-topk and
    full-sort paths agree and a row's result never depends on its batch-mates.
    """
    kth = descending.gather(1, (k - 1).clamp_min(0).unsqueeze(1))
    return kth.masked_fill(k.unsqueeze(1) == 0, -math.inf)


def _outside_nucleus(sorted_logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sorted-order mask of tokens past the smallest prefix whose probability reaches top_p."""
    top_p = torch.tensor(
        [p.top_p - _TOP_P_SLACK if p.top_p < 1.0 else math.inf for p in params],
        device=sorted_logits.device,
    )
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    outside = mass_before >= top_p.unsqueeze(1)
    outside[:, 0] = False
    return outside


def _apply_min_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask tokens with prob < min_p * max_prob, compared in logit space (no softmax needed)."""
    if not any(p.min_p > 0.0 for p in params):
        return scaled
    log_min_p = torch.tensor(
        [math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in params],
        device=scaled.device,
    )
    floor = scaled.amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1)
    return scaled.masked_fill(scaled < floor, -math.inf)


def _exponential_race(
    scaled: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1), done as argmax(logits - log q) to skip the softmax.

    Noise is always laid out in vocabulary order, so a seeded row's draw depends only on its
    own logits and generator, never on which filtering path the batch took.
    """
    noise = torch.empty_like(scaled)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        rows = torch.tensor(unseeded, device=scaled.device)
        noise[rows] = torch.empty_like(noise[rows]).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return (scaled - noise.clamp_min_(_MIN_EXPONENTIAL).log_()).argmax(dim=-1)


def skip_one_draw(generator: torch.Generator, vocab_size: int, params: SamplingParams) -> None:
    """Advance a seeded request's generator past one token, exactly as sampling it here would
    (a decode instance continuing a token sampled elsewhere keeps the seeded stream)."""
    if not params.is_greedy:
        torch.empty(vocab_size, dtype=torch.float32, device=generator.device).exponential_(
            generator=generator
        )


def _raw_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """Sampled-token and top-N log-probs under log_softmax of the unmodified logits."""
    if all(p.logprobs is None for p in params):
        return None, None
    logprobs = logits.log_softmax(dim=-1)
    sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    top_counts = [min(p.num_top_logprobs, logits.shape[1]) for p in params]
    if max(top_counts) == 0:
        return sampled, [[] for _ in params]
    values, ids = logprobs.topk(max(top_counts), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    top = [list(zip(ids[r][:n], values[r][:n], strict=True)) for r, n in enumerate(top_counts)]
    return sampled, top
