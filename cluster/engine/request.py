"""A request as data: token ids, counts, status and timestamps. The scheduler and block
manager read and advance these fields; they never hold tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from cluster.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation of its tokens
    WAITING_FOR_KV = "waiting_for_kv"  # decode role: blocks allocated, KV being written
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"
    FINISHED_PREFILLED = "prefilled"  # prefill role: first token out, blocks pinned

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "prefilled")


@dataclass(slots=True)
class RequestTimes:
    """Wall-clock timestamps (time.time()) of the request's milestones."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first under the priority policy
    cache_salt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.time()))
    status: RequestStatus = RequestStatus.WAITING
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # tokens whose KV is in this engine's cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # One entry per prompt token (None for the first) while they are being computed here;
    # None when not asked for, computed elsewhere, or already handed out.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
