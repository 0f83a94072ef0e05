"""The whole worker API as typed messages (msgspec Structs, msgpack on the wire).

Data plane (dataplane.py: ZeroMQ, one persistent connection per pair of processes):

    router ── Generate(spec, prefill=address) ─▶ decode/colocated ═▶ Chunk, Chunk, ...
    router ── LoadQuery ───────────────────────▶ any worker       ─▶ Load
    router ── Abort(request_id) ───────────────▶ any worker       ─▶ bool
    router ── SubscribeKVEvents ───────────────▶ any worker       ═▶ KVEventBatch, ...
    decode ── Prefill(spec) ───────────────────▶ prefill          ─▶ PrefillResult
    decode ── Renew / Drop / Abandon / AgentInfoQuery ─▶ prefill

Control plane (Ray, or direct calls in one process): ready() -> InstanceInfo, metrics,
check_integrity, inject_fault, shutdown. Nothing else crosses a process boundary; no message
is a dict.
"""

from __future__ import annotations

import msgspec

from cluster.engine.llm_engine import Resume
from cluster.engine.sampling_params import SamplingParams
from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.connector import KVHandle
from cluster.kv_transfer.layout import KVLayout

# -- what a request is -------------------------------------------------------------------------


class RequestSpec(msgspec.Struct, frozen=True):
    """One run of one request on an instance: everything an engine needs to run it."""

    request_id: str  # the instance-side id (the router's id, #attempt)
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    resume: Resume | None = None  # continue a run that failed elsewhere (llm_engine.Resume)
    trace: dict[str, str] | None = None  # the caller's span (W3C traceparent, tracing.py)

    def engine_kwargs(self) -> dict:
        """What the engine takes besides prompt, params and request id."""
        return {"priority": self.priority, "cache_salt": self.cache_salt, "resume": self.resume}

    @property
    def num_tokens(self) -> int:
        """KV slots a handoff reserves: prompt, resumed output, the first new token."""
        return len(self.prompt_token_ids) + (len(self.resume.output_ids) if self.resume else 0) + 1


# Per prompt token: None for the first, else (logprob of the token, top-N (token id, logprob)).
PromptLogprobs = list[tuple[float, list[tuple[int, float]]] | None]


class EngineTiming(msgspec.Struct, omit_defaults=True):
    """Where a request's time went on the workers, seconds (first chunk only)."""

    engine_queue_s: float | None = None
    prefill_s: float | None = None
    num_cached_tokens: int = 0
    prefill_call_s: float | None = None  # decode: the prefill call, as the decode saw it
    transfer_s: float | None = None  # decode: handle in hand to KV in place
    kv_bytes: int = 0
    kv_reads: int = 0
    kv_descriptors: int = 0
    kv_read_s: float = 0.0
    kv_hit_tokens: int = 0  # decode: prompt tokens whose KV was cached here, not pulled


class Chunk(msgspec.Struct, omit_defaults=True):
    """One streamed step of one request: the new tokens only."""

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    timing: EngineTiming | None = None  # first chunk of a run
    prompt_logprobs: PromptLogprobs | None = None  # first chunk of a run, when asked for


class PrefillResult(msgspec.Struct, omit_defaults=True):
    """A prefill's answer: the KV handle (blocks leased, granted `granted_after_s` after the
    call arrived), or the only chunk when the first token already ends the request.
    `prompt_logprobs`: computed with the prompt, for the decode's first chunk."""

    timing: EngineTiming
    handle: KVHandle | None = None
    chunk: Chunk | None = None
    granted_after_s: float = 0.0
    prompt_logprobs: PromptLogprobs | None = None


class Load(msgspec.Struct, omit_defaults=True):
    """What the router balances and sheds on."""

    num_running: int
    num_waiting: int
    pending_prompt_tokens: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    time: float
    num_kv_waiting: int = 0  # decode: handoffs waiting for KV room
    max_kv_waiters: int = 0  # decode: 0 = no such queue
    num_pinned: int = 0  # prefill: requests whose KV waits, leased, for its puller


class InstanceInfo(msgspec.Struct, frozen=True):
    """Static facts about an instance, once its engine is up (ready())."""

    instance_id: str
    role: str  # prefill | decode | colocated
    node: str
    address: str  # its data-plane endpoint, tcp://host:port
    pid: int
    model_path: str
    architecture: str
    max_model_len: int
    vocab_size: int
    dtype: str
    num_layers: int
    block_size: int
    num_blocks: int
    eos_token_ids: tuple[int, ...]
    kv_layout: KVLayout | None = None  # prefill/decode: what its KV pool holds


# -- requests on the data plane ---------------------------------------------------------------


class Generate(msgspec.Struct, tag=True, frozen=True):
    """Stream a request's output (Chunks). `prefill`: the prefill instance's data-plane
    address; set, the decode worker drives the handoff; None, the prompt runs here."""

    spec: RequestSpec
    prefill: str | None = None


class GenerateFrom(msgspec.Struct, tag=True, frozen=True):
    """Stream a request whose prompt someone else prefilled: pull the KV `handle` names
    from the prefill instance at `prefill`, then stream (Chunks)."""

    spec: RequestSpec
    handle: KVHandle
    prefill: str


class Prefill(msgspec.Struct, tag=True, frozen=True):
    """Run the prompt (-> PrefillResult). `layerwise_to`: the decode agent to announce each
    finished layer to (layer-wise pulls)."""

    spec: RequestSpec
    layerwise_to: KVAgentInfo | None = None


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str  # -> bool: whether the instance knew it


class Renew(msgspec.Struct, tag=True, frozen=True):
    request_id: str  # -> float | None: seconds left on the lease


class Drop(msgspec.Struct, tag=True, frozen=True):
    request_id: str  # -> None: free a leased request's blocks now


class Abandon(msgspec.Struct, tag=True, frozen=True):
    request_id: str  # -> None: its only puller gives up: stop it, or free its blocks


class LoadQuery(msgspec.Struct, tag=True, frozen=True):
    pass  # -> Load


class SubscribeKVEvents(msgspec.Struct, tag=True, frozen=True):
    pass  # -> a stream of engine.kv_events.KVEventBatch, a snapshot first


class AgentInfoQuery(msgspec.Struct, tag=True, frozen=True):
    pass  # -> KVAgentInfo


Request = (
    Generate
    | GenerateFrom
    | Prefill
    | Abort
    | Renew
    | Drop
    | Abandon
    | LoadQuery
    | AgentInfoQuery
    | SubscribeKVEvents
)


class Error(msgspec.Struct):
    """A handler's exception: its class name (the caller raises the same class when it knows
    it, see dataplane.py) and message."""

    kind: str
    message: str
