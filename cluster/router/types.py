"""What the router's front ends (gRPC, OpenAI HTTP) exchange with it: one request in, a
stream of chunks out, and typed errors that each front end maps to its status codes.

    front end ──GenerateInput──▶ Router.generate() ──▶ StreamChunk, StreamChunk, ... (last:
                                                        finished, usage, timing)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cluster.router.tenants import Tenant

FAILURE_POLICIES = ("fail", "recompute", "retry")


class RouterError(Exception):
    """Base of the errors a front end turns into a status: gRPC code name, HTTP status."""

    grpc_code = "INTERNAL"
    http_status = 500
    error_type = "InternalServerError"


class InvalidRequest(RouterError, ValueError):
    """Bad input; the message says what to change."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    error_type = "BadRequestError"


class Overloaded(RouterError):
    """No room now (admission queue full, decode KV full, prefill backlog too long): retry
    after `retry_after_s` (HTTP Retry-After; gRPC trailing metadata `retry-after`)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "RateLimitError"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(RouterError):
    """No healthy instance can take the request."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    error_type = "ServiceUnavailableError"


class RequestFailed(RouterError):
    """An instance failed and the request's failure policy could not save it. `reason` is
    its class in metrics and logs: policy (policy 'fail'), poison (it took two instances
    down), attempts (max_attempts used up), engine (its own processing raised), aborted
    (aborted on an instance by someone else), refused (an instance refused it mid-stream)."""

    grpc_code = "INTERNAL"
    http_status = 500
    error_type = "InternalServerError"

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


class RequestAbortedError(RouterError):
    """Someone called Abort on this request."""

    grpc_code = "CANCELLED"
    http_status = 499
    error_type = "RequestAborted"


@dataclass(slots=True)
class GenerateInput:
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # None: the router makes one
    model: str | None = None  # None or "": the served model; else must match its name
    priority: int = 0
    cache_salt: str | None = None
    failure_policy: str | None = None  # None: the router's default
    trace_context: dict[str, str] | None = None  # W3C traceparent/tracestate from the client
    tenant: Tenant | None = None  # who sends it (the front end authenticated it); None: no auth
    n: int = 1  # choices to return (one prefill; the others reuse its KV on one instance)
    best_of: int | None = None  # run this many, return the n of highest cumulative logprob


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(slots=True)
class Timing:
    """Where a request's time went, seconds (see proto/pdcluster/v1 Timing)."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    first_decode_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    num_recomputes: int = 0
    kv_bytes: int = 0  # the KV pull that served the stream (see proto Timing)
    kv_reads: int = 0
    kv_descriptors: int = 0
    kv_read_s: float = 0.0
    kv_hit_tokens: int = 0  # prompt tokens the decode instance had cached: not pulled
    local_prefill: bool = False  # the prompt ran on the decode instance (policy kv)


@dataclass(slots=True)
class StreamChunk:
    request_id: str
    token_ids: list[int]  # new in this chunk
    text: str  # new in this chunk
    logprobs: list[float] | None = None  # one per new token when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None
    usage: Usage | None = None  # last chunk only
    timing: Timing | None = None  # last chunk only
    # First chunk only, when asked for: per prompt token, None for the first, else (logprob
    # of the token, top-N (token id, logprob)) under the raw model distribution.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    index: int = 0  # which of the request's n choices (n > 1)


@dataclass(slots=True, frozen=True)
class ModelInfo:
    name: str
    architecture: str
    max_model_len: int
    vocab_size: int
    dtype: str
    num_layers: int
    block_size: int
    eos_token_ids: tuple[int, ...]
