"""What the engine hands back each step, per request (vLLM's RequestOutput, flattened to one
completion per request)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock timestamps (time.time()) and derived durations, in seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def queue_time_s(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all output tokens so far
    new_token_ids: list[int]  # the ones added by this step
    text: str  # all output text so far (stop string removed unless asked for)
    delta_text: str  # text added by this step
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | prefilled
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    kv_block_ids: list[int] = field(default_factory=list)  # prefill role: the pinned blocks
    # First output only, when asked for: per prompt token, None for the first, else (logprob
    # of the token, top-N (token id, logprob)) under the raw model distribution.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    metrics: RequestMetrics | None = None
