"""The router's settings (`router:` in a deployment config)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.router.tool_parsers import PARSERS
from cluster.router.types import FAILURE_POLICIES


@dataclass(slots=True)
class RouterSettings:
    mode: str = "disaggregated"  # or colocated
    served_model_name: str | None = None  # default: the model folder's name
    max_in_flight: int = 256  # requests being served at once (across all instances)
    max_queued: int = 1024  # requests waiting for a slot; beyond: Overloaded (429)
    failure_policy: str = "retry"
    max_attempts: int = 3  # runs of one request, the first included
    instance_wait_s: float = 30.0  # how long to wait for a healthy instance of a role
    call_timeout_s: float = 600.0  # one prefill call; one gap between streamed chunks
    load_poll_interval_s: float = 0.5
    # Shed load (429) when every prefill instance has more prompt tokens queued than this
    # (0: never); a request would only wait past any TTFT target.
    max_pending_prefill_tokens: int = 131072
    # Routing (policy.py): load balances on queues alone; kv also on what each instance has
    # cached (instances' KV events, prefix_index.py), and prefills short uncached suffixes
    # on the decode instance itself (conditional disaggregation, local_prefill.py).
    policy: str = "load"
    overlap_weight: float = 1.0  # kv: a prompt block to compute, against a block queued
    decode_overlap_weight: float = 1.0  # kv: a block to pull, against a block in use
    # kv, disaggregated: a decode instance prefills at most this many prompt tokens itself
    # at once (its headroom: what its running requests' steps take on; 0: always hand off);
    # within it, local_prefill.py's break-even decides.
    local_prefill_max_tokens: int = 512
    # kv, disaggregated: the TPOT target local prefills keep for a decode instance's running
    # requests; the headroom is then derived from it and measured step and prefill times
    # (local_prefill.py), within local_prefill_max_tokens. None: the headroom is the bound.
    local_prefill_tpot_s: float | None = None
    # How tool calls are read from the output (tool_parsers.py): hermes, llama3_json, mistral;
    # auto: from the chat template; none: `tools` with tool_choice auto is refused (400).
    tool_call_parser: str = "auto"

    def __post_init__(self) -> None:
        known = ("auto", "none", *PARSERS)
        if self.tool_call_parser not in known:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(known)}, got {self.tool_call_parser!r}"
            )
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        if self.policy not in ("load", "kv"):
            raise ValueError(f"policy must be load or kv, got {self.policy!r}")
        for name in ("overlap_weight", "decode_overlap_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.local_prefill_max_tokens < 0:
            raise ValueError(
                f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}"
            )
        if self.local_prefill_tpot_s is not None and not self.local_prefill_tpot_s > 0:
            raise ValueError(
                "local_prefill_tpot_s (a TPOT target, seconds) must be > 0 when set, "
                f"got {self.local_prefill_tpot_s}"
            )
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(
                f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}, "
                f"got {self.failure_policy!r}"
            )
        for name in ("max_in_flight", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.max_pending_prefill_tokens < 0:
            raise ValueError(
                f"max_pending_prefill_tokens must be >= 0, got {self.max_pending_prefill_tokens}"
            )
