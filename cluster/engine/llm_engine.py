"""The engine: one model instance behind `add_request / step / abort / has_unfinished`.

It glues the scheduler (what runs), the block manager (where KV lives) and the model runner
(the tensors), and turns sampled tokens into outputs: stop conditions, incremental text,
timestamps. The same class plays every role:

    colocated  prompt and output here
    prefill    a request finishes after its first token; its blocks stay pinned until
               `release(request_id)` (the KV transfer layer reads them first)
    decode     `add_remote_request` reserves blocks for a prompt computed elsewhere, the
               caller writes the KV into them, `commit_remote` continues from the first token
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.engine.block_manager import BlockManager
from cluster.engine.config import EngineConfig, ModelConfig
from cluster.engine.emulation import EmulatedModelRunner
from cluster.engine.model_runner import ModelRunner, NoopModelRunner
from cluster.engine.outputs import RequestMetrics, RequestOutput
from cluster.engine.parallel import check_parallel
from cluster.engine.request import Request, RequestStatus
from cluster.engine.sampler import skip_one_draw
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerOutput
from cluster.engine.structured import BitmaskFiller, Grammar, GrammarBitmask, GrammarCache
from cluster.engine.tiny import default_model_dir
from cluster.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from cluster.faults import Faults

Prompt = str | Sequence[int]
logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Resume:
    """A request continued after its instance failed (the router's retry/recompute): the
    output tokens the client already has, and how many characters of their text it got
    (text held back for a possible stop string or a partial UTF-8 character is not)."""

    output_ids: tuple[int, ...]
    num_sent_chars: int


@dataclass(slots=True)
class _RequestState:
    """Per-request bookkeeping that is not scheduling data: text, grammar and randomness."""

    request: Request
    detokenizer: IncrementalDetokenizer
    text: str = ""  # all text so far, before the stop-string hold-back
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    grammar: Grammar | None = None  # structured outputs: where the output is in its grammar
    min_tokens_text_len: int = 0  # len(text) at min_tokens output tokens: stops match after


_RUNNERS = {"model": ModelRunner, "noop": NoopModelRunner, "emulated": EmulatedModelRunner}


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None):
        config = config or EngineConfig()
        model_dir = config.model or _default_model_dir()
        self.config = config
        self.model_config = ModelConfig.from_pretrained(model_dir)
        if config.emulation is not None:  # the emulated model's context, this tokenizer
            spec, _, _ = config.emulation.resolve()
            self.model_config = dataclasses.replace(
                self.model_config, max_position_embeddings=spec.max_position_embeddings
            )
        self.max_model_len = config.resolve_max_model_len(self.model_config)
        check_parallel(self.model_config, config.tensor_parallel_size,
                       config.pipeline_parallel_size)  # fmt: skip
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.runner = _RUNNERS[config.model_runner](config, self.model_config, self.max_model_len)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.max_model_len = self._fit_max_model_len(self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.eos_token_ids = tuple(
            sorted(set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids))
        )
        self._states: dict[str, _RequestState] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._grammars: dict[str, Grammar] = {}  # the states' grammars, by request id
        self.grammars = GrammarCache(
            self.tokenizer.hf, self.model_config.vocab_size, self.eos_token_ids
        )
        self._bitmask_filler = BitmaskFiller()
        self._pinned: dict[str, Request] = {}
        self._failed: list[tuple[str, str]] = []  # stopped by their own failure in step()
        self._ids = itertools.count()
        self.last_step_num_tokens = 0  # 0: nothing could run (e.g. all waiting for KV)
        self.running_plan = None  # the SchedulerOutput being executed, during step()
        self.faults = Faults(config.fault_injection)
        torch.manual_seed(config.seed)

    def _fit_max_model_len(self, max_model_len: int) -> int:
        """A request alone in the pool must be able to reach max_model_len, or it could be
        preempted forever. Cap a defaulted max_model_len to the pool; refuse an explicit one."""
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if max_model_len <= capacity:
            return max_model_len
        if self.config.max_model_len is not None:
            raise ValueError(
                f"max_model_len={max_model_len} tokens does not fit in the KV pool "
                f"({capacity} tokens): lower max_model_len or give the cache more memory"
            )
        logger.warning(
            "max_model_len capped from %d to %d tokens: the KV pool holds no more",
            max_model_len,
            capacity,
        )
        return capacity

    @classmethod
    def from_model(cls, model: str | None = None, **kwargs) -> LLMEngine:
        return cls(EngineConfig(model=model, **kwargs))

    @property
    def role(self) -> str:
        return self.config.role

    # -- requests in --------------------------------------------------------------------

    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        resume: Resume | None = None,
    ) -> str:
        """Queue a request; raises ValueError (and changes nothing) if it is invalid.
        `resume`: the request continues a run that failed elsewhere (see Resume)."""
        request = self._new_request(
            request_id, prompt, params, arrival_time, priority, cache_salt, resume
        )
        if request.params.prompt_logprobs is not None:  # computed here (not on a decode)
            request.prompt_logprobs = [None] * request.num_prompt_tokens
        self._track(request, resume)
        self.scheduler.add_request(request)
        return request.request_id

    def compile_grammar(self, params: SamplingParams | None) -> None:
        """Compile (and cache) the grammar of `params`, if it has one; ValueError if invalid.
        Thread-safe and needs no engine lock: callers run it first, off the step loop, so
        that add_request finds the grammar compiled."""
        if params is not None and params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def _new_request(self, request_id, prompt, params, arrival_time, priority, cache_salt,
                     resume=None):  # fmt: skip
        request_id = f"auto-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self._states or request_id in self._pinned:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError("cache_salt must be a string")
        # Every string this request carries is encoded later (hashes, text, the wire): a
        # lone surrogate must fail here, not inside a step.
        for name, text in (("cache_salt", cache_salt or ""), *(("stop", x) for x in params.stop)):
            if not _is_utf8(text):
                raise ValueError(f"{name} is not valid Unicode (a lone surrogate): send UTF-8")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        self._check_model_fields(params)
        prompt_ids = self._prompt_token_ids(prompt)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            priority=priority,
            cache_salt=cache_salt,
            eos_token_ids=() if params.ignore_eos else self.eos_token_ids,
        )
        if arrival_time is not None:
            request.times.arrival = arrival_time
        if resume is not None:
            self._resume(request, resume)
        return request

    def _check_model_fields(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against this vocabulary, the
        grammar against this tokenizer (compiled now, or found in the cache)."""
        vocab = self.model_config.vocab_size
        outside = sorted(t for t in params.logit_bias or {} if t >= vocab)
        if outside:
            raise ValueError(
                f"logit_bias has token ids outside the vocabulary [0, {vocab}): {outside[:10]}"
            )
        self.compile_grammar(params)

    def _resume(self, request: Request, resume: Resume) -> None:
        """The tokens already streamed become output again (they count to max_tokens, stop
        strings see their text), to be computed as context before the next one is sampled."""
        ids = list(resume.output_ids)
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"resumed output ids must be integers in [0, {vocab})")
        if len(ids) >= request.params.max_tokens:
            raise ValueError("nothing left to resume: the output already has max_tokens")
        if request.num_prompt_tokens + len(ids) >= self.max_model_len:
            raise ValueError("prompt + resumed output leave no room below max_model_len")
        request.all_token_ids.extend(ids)

    def _prompt_token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str) and not _is_utf8(prompt):
            raise ValueError("prompt is not valid Unicode (a lone surrogate): send UTF-8")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        needed = self.block_manager.num_blocks_needed(len(ids) + 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt needs {needed} KV blocks but the pool has "
                f"{self.block_manager.num_blocks}: shorten it or give the cache more memory"
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "shorten it so that at least one output token fits"
            )
        return ids

    def _track(self, request: Request, resume: Resume | None = None) -> None:
        """Per-request state; built fully before anything is recorded, so a failure here
        leaves the engine as it was. A resumed request's text and random stream pick up where
        the failed run's left off: the client has seen `num_sent_chars` of that text."""
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        state = _RequestState(request, detok)
        params = request.params
        if params.structured_outputs is not None:
            state.grammar = Grammar(self.grammars.compile(params.structured_outputs))
        if resume is not None:
            # one by one, as the failed run did; the grammar goes where that output took it
            for num_output, token_id in enumerate(request.output_token_ids, 1):
                self._append_text(state, token_id, num_output)
                if state.grammar is not None:
                    state.grammar.accept(token_id)
            state.num_emitted_chars = min(resume.num_sent_chars, len(state.text))
            state.num_emitted_tokens = request.num_output_tokens
            if params.logprobs is not None:  # placeholders: those were reported already
                request.output_logprobs.extend([0.0] * request.num_output_tokens)
                request.output_top_logprobs.extend([[]] * request.num_output_tokens)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed)
            for _ in range(request.num_output_tokens):  # the draws the failed run made
                skip_one_draw(gen, self.model_config.vocab_size, params)
        self._states[request.request_id] = state
        if gen is not None:
            self._generators[request.request_id] = gen
        if state.grammar is not None:
            self._grammars[request.request_id] = state.grammar

    def _drop_state(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self._generators.pop(request_id, None)
        self._grammars.pop(request_id, None)

    def _append_text(self, state: _RequestState, token_id: int, num_output: int) -> None:
        """Detokenize one more output token (the `num_output`-th)."""
        state.text += state.detokenizer.append([token_id])
        if num_output == state.request.params.min_tokens:
            state.min_tokens_text_len = len(state.text)

    # -- the loop ---------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that got a token."""
        plan = self.scheduler.schedule()
        self.last_step_num_tokens = plan.total_num_tokens
        if plan.is_empty:
            # Idle (e.g. every request waits for its KV): the next step is not back to back.
            self.runner.step_done(False)
            return []
        tables = {r.request_id: self.block_manager.block_ids(r.request_id) for r in plan.requests}
        grammar = self._grammar_bitmask(plan)
        self.running_plan = plan  # for hooks inside the forward pass (layer-wise KV pulls)
        try:
            if self.faults.enabled:
                self.faults.hit("engine.forward", " ".join(r.request_id for r in plan.requests))
            sampled, result = self.runner.execute(plan, tables, self._generators, grammar)
        finally:
            self.running_plan = None
        self.scheduler.update_after_step(plan)
        if result is not None and result.prompt_logprobs:
            self._record_prompt_logprobs(plan, result.prompt_logprobs)
        outputs = []
        now = time.time()
        for i, request in enumerate(sampled):
            if request.times.first_token is None:
                request.times.first_token = now
            try:  # one request's failure must not end the others' step
                self.faults.hit("engine.request", request.request_id)
                self._record_logprobs(request, result, i)
                self._advance_grammar(request.request_id, result.token_ids[i])
                outputs.append(self._process_token(request, result.token_ids[i]))
            except Exception as e:  # noqa: BLE001 - isolated: the request fails alone
                logger.exception("request %s failed in step(); stopped", request.request_id)
                self._fail(request, e)
        self.runner.step_done(self.has_unfinished())
        return outputs

    def _grammar_bitmask(self, plan: SchedulerOutput) -> GrammarBitmask | None:
        """The allowed next tokens of the requests that sample this step under a grammar."""
        if not self._grammars:
            return None
        rows = [
            (r.request_id, grammar)
            for r in plan.requests
            if (grammar := self._grammars.get(r.request_id)) is not None
            and r.num_computed_tokens + plan.num_scheduled_tokens[r.request_id] == r.num_tokens
        ]
        return self._bitmask_filler.fill(rows, self.model_config.vocab_size) if rows else None

    def _advance_grammar(self, request_id: str, token_id: int) -> None:
        """The mask makes a refused token impossible; one anyway fails its request alone."""
        grammar = self._grammars.get(request_id)
        if grammar is not None:
            grammar.accept(token_id)

    def _record_prompt_logprobs(self, plan: SchedulerOutput, found: dict) -> None:
        """Prompt logprobs computed this step go to their places (a recomputed position,
        after a preemption, is overwritten with the same value)."""
        for request in plan.requests:
            entry = found.get(request.request_id)
            if entry is not None and request.prompt_logprobs is not None:
                first, values = entry
                request.prompt_logprobs[first : first + len(values)] = values

    def _fail(self, request: Request, error: Exception) -> None:
        """Stop a request whose processing raised: free its blocks, report it once."""
        if request.is_finished:  # it raised after finishing (e.g. pinned): free all of it
            self.release(request.request_id)
        else:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._drop_state(request.request_id)
        self._failed.append((request.request_id, f"{type(error).__name__}: {error}"))

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, error) of the requests stopped by a failure since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def _record_logprobs(self, request: Request, result, i: int) -> None:
        if request.params.logprobs is None:
            return
        request.output_logprobs.append(result.logprobs[i])
        request.output_top_logprobs.append(result.top_logprobs[i])

    def _process_token(self, request: Request, token_id: int) -> RequestOutput:
        """Take a sampled token (its grammar, if any, has accepted it)."""
        request.append_output_token(token_id)
        state = self._states[request.request_id]
        self._append_text(state, token_id, request.num_output_tokens)
        status = self._check_stop(request, state)
        if status is None and self._ends_grammar(state, token_id):
            status = RequestStatus.FINISHED_STOPPED
        if status is None and self.role == "prefill":
            status = RequestStatus.FINISHED_PREFILLED
        if status is not None:
            state.text += state.detokenizer.flush()
            self._check_stop_strings(request, state, final=True)
            self._finish(request, status)
        return self._output(state)

    def _ends_grammar(self, state: _RequestState, token_id: int) -> bool:
        """The grammar ended: it took its stop token (an EOS id; with ignore_eos too)."""
        grammar = state.grammar
        return grammar is not None and token_id in self.eos_token_ids and grammar.is_terminated

    def _check_stop(self, request: Request, state: _RequestState) -> RequestStatus | None:
        token_id = request.all_token_ids[-1]
        params = request.params
        if token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if self._check_stop_strings(request, state, final=False):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _check_stop_strings(self, request: Request, state: _RequestState, final: bool) -> bool:
        """Cut the text at the first stop string; True if one matched. As vLLM does, a stop
        string matches only past min_tokens output tokens, and must end in the text that
        came after them."""
        stops = request.params.stop
        if not stops or request.stop_reason is not None:
            return False
        if request.num_output_tokens <= request.params.min_tokens:
            return False
        search_from = max(0, state.num_emitted_chars - max(len(s) for s in stops) + 1)
        boundary = state.min_tokens_text_len
        hits = [
            (i, s)
            for s in stops
            if (i := state.text.find(s, max(search_from, boundary - len(s) + 1))) >= 0
        ]
        if not hits:
            return False
        index, stop = min(hits)
        keep = index + len(stop) if request.params.include_stop_str_in_output else index
        state.text = state.text[:keep]
        request.stop_reason = stop
        return True

    def _finish(self, request: Request, status: RequestStatus) -> None:
        pin = status is RequestStatus.FINISHED_PREFILLED
        self.scheduler.finish(request, status, free_blocks=not pin)
        if pin:
            self._pinned[request.request_id] = request

    def _output(self, state: _RequestState) -> RequestOutput:
        request = state.request
        finished = request.is_finished
        # While running, hold back a tail that could still grow into a stop string.
        hold = 0 if finished or not request.params.stop else max(map(len, request.params.stop)) - 1
        visible = max(state.num_emitted_chars, len(state.text) - hold)
        delta = state.text[state.num_emitted_chars : visible]
        state.num_emitted_chars = visible
        new_ids = request.output_token_ids[state.num_emitted_tokens :]
        state.num_emitted_tokens = request.num_output_tokens
        wants_logprobs = request.params.logprobs is not None
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None  # first only
        out = RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            new_token_ids=new_ids,
            text=state.text[:visible],
            delta_text=delta,
            finished=finished,
            finish_reason=request.status.value if finished else None,
            stop_reason=request.stop_reason,
            logprobs=list(request.output_logprobs) if wants_logprobs else None,
            top_logprobs=list(request.output_top_logprobs) if wants_logprobs else None,
            num_cached_tokens=request.num_cached_tokens,
            kv_block_ids=list(self.block_manager.block_ids(request.request_id))
            if request.status is RequestStatus.FINISHED_PREFILLED
            else [],
            metrics=_metrics(request),
            prompt_logprobs=prompt_logprobs,
        )
        if finished:
            self._drop_state(request.request_id)
        return out

    # -- control ----------------------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if it is not here."""
        if request_id in self._pinned:
            self.release(request_id)
            return True
        state = self._states.get(request_id)
        if state is None:
            return False
        self._drop_state(request_id)
        self.scheduler.finish(state.request, RequestStatus.FINISHED_ABORTED)
        return True

    def release(self, request_id: str) -> None:
        """Prefill role: free a finished request's pinned blocks (idempotent)."""
        if self._pinned.pop(request_id, None) is not None:
            self.block_manager.free(request_id)

    def pinned_block_ids(self, request_id: str) -> list[int]:
        if request_id not in self._pinned:
            raise KeyError(f"request {request_id!r} holds no pinned blocks")
        return list(self.block_manager.block_ids(request_id))

    def add_remote_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        resume: Resume | None = None,
    ) -> list[int] | None:
        """Decode role: reserve blocks for a prompt computed elsewhere and return their ids
        (write the prompt's KV into them, then call commit_remote). None if the pool has no
        room now; nothing is kept in that case."""
        request = self._new_request(
            request_id, prompt, params, arrival_time, priority, cache_salt, resume
        )
        block_ids = self.scheduler.reserve_remote(request)
        if block_ids is None:
            return None
        try:
            self._track(request, resume)
        except BaseException:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            raise
        return block_ids

    def num_remote_cached_blocks(self, request_id: str) -> int:
        """Decode role: blocks of a reserved request's prompt found in this engine's prefix
        cache (its first ones: the KV written from elsewhere goes after them)."""
        request = self.scheduler.remote[request_id]
        return request.num_computed_tokens // self.block_manager.block_size

    def commit_remote(
        self, request_id: str, first_token_id: int, first_logprob: float | None = None
    ) -> RequestOutput:
        """Decode role: the KV is in place; continue from the token the prefill sampled."""
        request = self.scheduler.remote.get(request_id)
        if request is None:
            raise ValueError(f"request {request_id!r} is not waiting for its KV here")
        vocab = self.model_config.vocab_size
        if isinstance(first_token_id, bool) or not isinstance(first_token_id, int):
            raise ValueError(f"first_token_id must be an integer, got {first_token_id!r}")
        if not 0 <= first_token_id < vocab:
            raise ValueError(f"first_token_id {first_token_id} is outside [0, {vocab})")
        try:  # the grammar state the prefill's token implies
            self._advance_grammar(request_id, first_token_id)
        except ValueError:
            self.abort(request_id)
            raise
        request = self.scheduler.admit_remote(request_id)
        if request_id in self._generators:  # the prefill spent one draw on this token
            skip_one_draw(self._generators[request_id], vocab, request.params)
        request.times.first_token = time.time()
        if request.params.logprobs is not None:
            request.output_logprobs.append(first_logprob if first_logprob is not None else 0.0)
            request.output_top_logprobs.append([])
        return self._process_token(request, first_token_id)

    # -- convenience ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add_request(None, p, sp) for p, sp in zip(prompts, params, strict=True)]
        final: dict[str, RequestOutput] = {}
        prompt_logprobs = {}  # come with the first output only
        while len(final) < len(ids):
            for out in self.step():
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if out.finished:
                    out.prompt_logprobs = prompt_logprobs.get(out.request_id)
                    final[out.request_id] = out
            for request_id, error in self.take_failed():
                raise RuntimeError(f"request {request_id!r} failed: {error}")
        return [final[i] for i in ids]

    def reconfigure(self, config: EngineConfig) -> None:
        """Take another role (an elastic pool's flip, workers/elastic.py): a new scheduler
        for the role's settings over the same weights, KV pool and prefix cache. Only an
        idle engine: nothing waiting, running, receiving KV or pinned for a puller."""
        if self.has_unfinished() or self._pinned:
            raise ValueError(
                f"the engine has {self.scheduler.num_unfinished} requests and "
                f"{len(self._pinned)} pinned: drain it before it changes role"
            )
        if config.cache != self.config.cache or config.model != self.config.model:
            raise ValueError("a new role keeps the model and the KV cache's settings")
        old = self.scheduler
        self.config = config
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.scheduler.num_prefix_query_tokens = old.num_prefix_query_tokens
        self.scheduler.num_prefix_hit_tokens = old.num_prefix_hit_tokens
        if isinstance(self.runner, EmulatedModelRunner) and config.emulation is not None:
            self.runner.emulation = config.emulation  # (its link: decode pulls)

    def check_integrity(self) -> None:
        live = set(self._states) | set(self._pinned)
        self.block_manager.check_integrity(live)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_pinned(self) -> int:
        """Prefill role: finished requests whose blocks wait for `release` (a pull)."""
        return len(self._pinned)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metrics(request: Request) -> RequestMetrics:
    t = request.times
    return RequestMetrics(
        t.arrival, t.first_scheduled, t.first_token, t.finished, request.num_preemptions
    )


def _default_model_dir() -> str:
    return str(default_model_dir())
