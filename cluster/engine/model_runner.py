"""Model runner: owns the weights and the paged KV tensor, turns a scheduler plan into input
tensors, runs the forward pass and samples. The only engine part that touches tensors.

The KV pool is one tensor, block-major, then head-major:

    kv_cache[num_blocks, num_kv_heads, num_layers, 2 (K, V), block_size, head_dim]

so one block of one request is one contiguous region across all layers (the KV transfer layer
moves a block with a single descriptor), and so is any range of heads of a block, all layers
included, or any range of layers of one head: a pull between instances of different TP or PP
layouts moves a rank's share with one descriptor per block (TP) or per block and head (PP)
(kv_transfer/reshard.py). Layer l sees the strided view kv_cache[:, :, l] as
[num_blocks, 2, num_kv_heads, block_size, head_dim]. With tensor or pipeline parallelism a
rank's pool holds only its heads and its stage's layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.engine.attention import AttentionMetadata, DecodeGroup, PrefillChunk, get_backend
from cluster.engine.config import CacheConfig, EngineConfig, ModelConfig
from cluster.engine.kv_pool import allocate_kv_pool
from cluster.engine.models.loader import load_model
from cluster.engine.parallel import init_parallel, world_min
from cluster.engine.request import Request
from cluster.engine.sampler import PromptLogprob, Sampler, SamplerOutput
from cluster.engine.scheduler import SchedulerOutput
from cluster.engine.structured import GrammarBitmask

_CPU_DEFAULT_KV_BYTES = 512 * 1024**2
_PROMPT_LOGPROB_ROWS = 256  # prompt positions turned into logits at once (caps the memory)


@dataclass(slots=True)
class PromptLogprobRows:
    """Rows of a step's batch whose logits give prompt logprobs: the logits at position q
    score prompt token q + 1. `spans`: per request, (its id, the index of the first prompt
    token covered, how many), in row order."""

    indices: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the actual next prompt token
    top_n: list[int] = field(default_factory=list)
    spans: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, request: Request, q_start: int, start: int, end: int) -> None:
        """The part of one request's chunk (positions [start, end) at batch rows from
        q_start) that scores prompt tokens."""
        last = min(end, request.num_prompt_tokens - 1)
        if last <= start:
            return
        self.indices.extend(range(q_start, q_start + last - start))
        self.targets.extend(request.all_token_ids[start + 1 : last + 1])
        self.top_n.extend([request.params.prompt_logprobs] * (last - start))
        self.spans.append((request.request_id, start + 1, last - start))


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the batch whose logits are sampled
    sample_requests: list[Request]
    prompt_rows: PromptLogprobRows | None = None  # requests that asked for prompt_logprobs


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype(model_config)
        self.model_config = model_config
        self.block_size = config.cache.block_size
        self.sliding_window = model_config.sliding_window
        self.tp, self.pp = init_parallel(
            config.tensor_parallel_rank, config.tensor_parallel_size,
            config.pipeline_parallel_rank, config.pipeline_parallel_size,
            config.dist_init_method, self.device, config.dist_timeout_s,
        )  # fmt: skip
        self.num_microbatches = config.pipeline_microbatches or self.pp.size
        self.microbatch_min_tokens = max(config.pipeline_microbatch_min_tokens, 1)
        self.layer_range = self.pp.layers(model_config.num_layers)
        self.num_layers = self.layer_range[1] - self.layer_range[0]  # this stage's
        q0, q1 = self.tp.split(model_config.num_heads)
        k0, k1 = self.tp.kv_heads(model_config.num_kv_heads)
        self.num_kv_heads = k1 - k0  # this rank's KV heads: its cache holds only those
        backend_cls = get_backend(config.attention_backend, self.device)
        backend = backend_cls(q1 - q0, self.num_kv_heads, model_config.head_dim)
        self.model = load_model(
            model_config, backend, self.dtype, self.device, max_model_len, self.tp, self.pp
        )
        # Every rank's scheduler must hand out the same block ids: the smallest pool wins.
        self.num_blocks = world_min(self._num_blocks(config.cache), self.device)
        self.kv_cache = allocate_kv_pool(self.kv_cache_shape, self.dtype, self.device)
        self.kv_layers = [self.kv_cache[:, :, i].transpose(1, 2) for i in range(self.num_layers)]
        self.sampler = Sampler()

    @property
    def kv_cache_shape(self) -> tuple[int, ...]:
        m = self.model_config
        return (self.num_blocks, self.num_kv_heads, self.num_layers, 2, self.block_size, m.head_dim)

    @property
    def block_bytes(self) -> int:
        m = self.model_config
        per_token = 2 * self.num_layers * self.num_kv_heads * m.head_dim
        return per_token * self.dtype.itemsize * self.block_size

    def _num_blocks(self, cache: CacheConfig) -> int:
        if cache.num_blocks is not None:
            return cache.num_blocks
        budget = cache.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = int(total * cache.gpu_memory_utilization) - torch.cuda.memory_allocated()
        elif budget is None:
            budget = _CPU_DEFAULT_KV_BYTES
        num_blocks = budget // self.block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"KV memory budget {budget} bytes holds no block of "
                f"{self.block_bytes} bytes; raise kv_cache_memory_bytes"
            )
        return num_blocks

    @torch.inference_mode()
    def execute(
        self,
        plan: SchedulerOutput,
        block_tables: dict[str, list[int]],
        generators: dict[str, torch.Generator],
        grammar: GrammarBitmask | None = None,
    ) -> tuple[list[Request], SamplerOutput | None]:
        """Run one step; return the requests that got a token and what was sampled (None
        when nothing was, nor any prompt logprob). `grammar`: the allowed tokens of the
        requests that sample under one."""
        if self.pp.size > 1:
            return self._execute_pipelined(plan, block_tables, generators, grammar)
        inp = self.prepare(plan, block_tables)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_layers, inp.meta)
        prompt = self._prompt_logprobs(hidden, inp.prompt_rows)
        if not inp.sample_requests:
            return [], SamplerOutput([], None, None, prompt) if prompt else None
        result = self._sample(hidden[inp.sample_indices], inp.sample_requests, generators, grammar)
        result.prompt_logprobs = prompt
        return inp.sample_requests, result

    def step_done(self, more_work: bool) -> None:
        """The engine finished a step; `more_work`: it will step again at once."""

    def _sample(self, hidden: torch.Tensor, requests: list[Request], generators,
                grammar: GrammarBitmask | None = None) -> SamplerOutput:  # fmt: skip
        logits = self.model.compute_logits(hidden)
        gens = [generators.get(r.request_id) for r in requests]
        masks = grammar.select([r.request_id for r in requests]) if grammar else None
        return self.sampler(logits, [r.params for r in requests], gens, requests, masks)

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: PromptLogprobRows | None
                         ) -> dict[str, tuple[int, list[PromptLogprob]]] | None:  # fmt: skip
        """Each asking request's prompt logprobs in this step's chunk, under the raw model
        distribution; logits for a bounded number of positions at a time."""
        if rows is None:
            return None
        entries: list[PromptLogprob] = []
        targets = torch.tensor(rows.targets, dtype=torch.long, device=self.device)
        indices = torch.tensor(rows.indices, dtype=torch.long, device=self.device)
        k = max(rows.top_n)
        for i in range(0, len(rows.indices), _PROMPT_LOGPROB_ROWS):
            part = slice(i, i + _PROMPT_LOGPROB_ROWS)
            logprobs = self.model.compute_logits(hidden[indices[part]]).float().log_softmax(-1)
            actual = logprobs.gather(1, targets[part].unsqueeze(1)).squeeze(1).tolist()
            top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
            top_values = top_values.tolist() if k else [[]] * len(actual)
            top_ids = top_ids.tolist() if k else [[]] * len(actual)
            for j, n in enumerate(rows.top_n[part]):
                entries.append((actual[j], list(zip(top_ids[j][:n], top_values[j][:n],
                                                    strict=True))))  # fmt: skip
        out, pos = {}, 0
        for request_id, first, count in rows.spans:
            out[request_id] = (first, entries[pos : pos + count])
            pos += count
        return out

    def _execute_pipelined(self, plan, block_tables, generators, grammar=None):
        """This stage's part of one step, micro-batch by micro-batch (parallel.py): receive,
        run the stage's layers, send on without waiting; the last stage samples and every
        rank gets the tokens."""
        num = min(self.num_microbatches, plan.total_num_tokens // self.microbatch_min_tokens)
        parts = split_microbatches(plan, max(num, 1))
        inputs = [self.prepare(mb, block_tables) for mb in parts]
        hidden_size = self.model_config.hidden_size
        sends, last_hidden, prompt = [], [], {}
        for inp in inputs:
            x = None
            if not self.pp.is_first:
                x = self.pp.recv((len(inp.input_ids), hidden_size), self.dtype, self.device)
            h = self.model(inp.input_ids, inp.positions, self.kv_layers, inp.meta, hidden=x)
            if not self.pp.is_last:
                sends.append(self.pp.send(h))
                continue
            if len(inp.sample_indices):
                last_hidden.append(h[inp.sample_indices])
            prompt.update(self._prompt_logprobs(h, inp.prompt_rows) or {})
        for work in sends:
            work.wait()
        requests = [r for inp in inputs for r in inp.sample_requests]
        if not requests and not any(inp.prompt_rows for inp in inputs):
            return [], None
        result = None
        if self.pp.is_last:
            result = SamplerOutput([], None, None)
            if requests:
                result = self._sample(torch.cat(last_hidden), requests, generators, grammar)
            result.prompt_logprobs = prompt or None
        return requests, self.pp.broadcast_from_last(result)

    def prepare(self, plan: SchedulerOutput, block_tables: dict[str, list[int]]) -> ModelInput:
        """Flatten the plan (decodes first, as the scheduler ordered it) into tensors."""
        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        decode_tables: list[list[int]] = []
        decode_ctx_lens: list[int] = []
        prefills: list[tuple[int, int, int, list[int]]] = []
        sample_indices: list[int] = []
        sample_requests: list[Request] = []
        prompt_rows = PromptLogprobRows()
        bs = self.block_size
        for request in plan.requests:
            num_new = plan.num_scheduled_tokens[request.request_id]
            start = request.num_computed_tokens
            end = start + num_new
            table = block_tables[request.request_id]
            q_start = len(token_ids)
            token_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slot_blocks.extend(table[p // bs] for p in range(start, end))
            if num_new == 1 and not prefills:
                decode_tables.append(table[: -(-end // bs)])
                decode_ctx_lens.append(end)
            else:
                prefills.append((q_start, num_new, end, table[: -(-end // bs)]))
            if end == request.num_tokens:
                sample_indices.append(len(token_ids) - 1)
                sample_requests.append(request)
            if request.prompt_logprobs is not None:
                prompt_rows.add(request, q_start, start, end)
        pos = torch.tensor(positions, dtype=torch.long)
        meta = AttentionMetadata(
            slot_block_ids=torch.tensor(slot_blocks, dtype=torch.long, device=self.device),
            slot_offsets=(pos % bs).to(self.device),
            num_decodes=len(decode_tables),
            prefills=[self._prefill_chunk(*p) for p in prefills],
        )
        if decode_tables:
            self._decode_meta(meta, decode_tables, decode_ctx_lens)
        return ModelInput(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=self.device),
            positions=pos.to(self.device),
            meta=meta,
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=self.device),
            sample_requests=sample_requests,
            prompt_rows=prompt_rows if prompt_rows.spans else None,
        )

    def _decode_meta(self, meta: AttentionMetadata, tables: list[list[int]], ctx_lens: list[int]):
        for rows in bucket_by_length(ctx_lens):
            meta.decode_groups.append(
                self._decode_group(rows, [tables[i] for i in rows], [ctx_lens[i] for i in rows])
            )

    def _decode_group(self, rows: list[int], tables: list[list[int]], ctx_lens: list[int]):
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        tables_t = torch.tensor(padded, dtype=torch.long, device=self.device)
        window = self.sliding_window
        if len(rows) == 1 and (window is None or ctx_lens[0] <= window):
            return DecodeGroup(rows_t, tables_t, mask=None, ctx_len=ctx_lens[0])
        key_pos = torch.arange(max_blocks * self.block_size, device=self.device)[None, :]
        ctx = torch.tensor(ctx_lens, device=self.device)[:, None]
        valid = key_pos < ctx
        if self.sliding_window is not None:
            valid &= key_pos > ctx - 1 - self.sliding_window
        mask = torch.zeros(valid.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~valid, float("-inf"))
        return DecodeGroup(rows_t, tables_t, mask[:, None, None, :], ctx_len=key_pos.shape[1])

    def _prefill_chunk(self, q_start: int, q_len: int, ctx_len: int, table: list[int]):
        start = ctx_len - q_len
        window = self.sliding_window
        mask = None
        if start > 0 or (window is not None and ctx_len > window):
            q_pos = torch.arange(start, ctx_len, device=self.device)[:, None]
            k_pos = torch.arange(ctx_len, device=self.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
        block_ids = torch.tensor(table, dtype=torch.long, device=self.device)
        return PrefillChunk(q_start, q_len, ctx_len, block_ids, mask)


def split_microbatches(plan: SchedulerOutput, num: int) -> list[SchedulerOutput]:
    """Cut a step's plan into up to `num` micro-batches of consecutive requests with about
    equal token counts (decodes stay first in each, as the attention layout wants)."""
    total = plan.total_num_tokens
    out: list[SchedulerOutput] = []
    current = SchedulerOutput()
    done = 0
    for request in plan.requests:
        n = plan.num_scheduled_tokens[request.request_id]
        current.requests.append(request)
        current.num_scheduled_tokens[request.request_id] = n
        done += n
        if done * num >= total * (len(out) + 1) and len(out) < num - 1:
            out.append(current)
            current = SchedulerOutput()
    if current.requests:
        out.append(current)
    return out


def bucket_by_length(
    lengths: list[int], max_ratio: float = 2.0, min_span: int = 64
) -> list[list[int]]:
    """Indices grouped so that within a group the longest length is at most max_ratio times
    the shortest (or within min_span of it: short keys are cheaper than another call). Each
    group pads to at most about twice its real key count, and lengths spanning
    L_min..L_max cost about log2(L_max / L_min) attention calls."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        shortest = lengths[groups[-1][0]] if groups else 0
        if groups and lengths[i] <= max(max_ratio * shortest, shortest + min_span):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class NoopModelRunner(ModelRunner):
    """No model work: every request whose prompt is done gets a token derived from its last
    one (deterministic, never a special id below 3). Scheduling, blocks and the KV pool are
    real, so what this measures is everything around the forward pass."""

    def execute(self, plan, block_tables, generators, grammar=None):
        sampled = []
        for request in plan.requests:
            end = request.num_computed_tokens + plan.num_scheduled_tokens[request.request_id]
            if end == request.num_tokens:
                sampled.append(request)
        vocab = self.model_config.vocab_size
        token_ids = [3 + (r.all_token_ids[-1] * 31 + 7) % (vocab - 3) for r in sampled]
        token_ids = follow_grammar(token_ids, sampled, grammar)
        return made_up_output(plan, sampled, token_ids)


def made_up_output(plan: SchedulerOutput, sampled: list[Request], token_ids: list[int]):
    """execute()'s result for runners without logits: every logprob 0, prompt ones too."""
    prompt = {}
    for request in plan.requests:
        if request.prompt_logprobs is not None:
            rows = PromptLogprobRows()
            end = request.num_computed_tokens + plan.num_scheduled_tokens[request.request_id]
            rows.add(request, 0, request.num_computed_tokens, end)
            prompt.update({rid: (first, [(0.0, [])] * n) for rid, first, n in rows.spans})
    if not sampled and not prompt:
        return [], None
    n = len(sampled)
    return sampled, SamplerOutput(token_ids, [0.0] * n, [[] for _ in range(n)], prompt or None)


def follow_grammar(token_ids: list[int], requests: list[Request],
                   grammar: GrammarBitmask | None) -> list[int]:  # fmt: skip
    """For runners that make tokens up: a request under a grammar gets its made-up token if
    the grammar allows it, else the next token id the grammar allows (deterministic)."""
    masks = grammar.select([r.request_id for r in requests]) if grammar else None
    if masks is None:
        return token_ids
    token_ids = list(token_ids)
    for k, row in enumerate(masks.rows):
        token_ids[row] = masks.pick(k, token_ids[row])
    return token_ids
