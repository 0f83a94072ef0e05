"""Conditional disaggregation (policy kv): prefill a request on its decode instance itself
when the part of its prompt that instance lacks is short, instead of handing it off.

The trade, per request (DistServe's, made at run time as Dynamo and llm-d's P/D sidecar do):

    hand off   the request waits for the remote queue, the prefill call's round trip and
               the KV pull: queue_s + handoff_s
    local      the decode instance's running requests wait for the suffix's compute in
               their steps: s x token_s

Local wins while s x token_s <= handoff_s + queue_s, that is while s is at most

    threshold = handoff_s / token_s + the shortest remote prefill queue (tokens)

capped by `local_prefill_max_tokens`. The prompts the decode instance already prefills
itself must be within the threshold too (queued ahead of this one, they must not make its
first token later than a prefill instance would), and it must have KV room. Both terms are
measured from the timings every handed-off request returns (moving averages):

    token_s    prefill_s / prompt tokens computed on the prefill instance
    handoff_s  transfer_s + the prefill call's time outside the prefill engine

so the rule holds on any hardware, emulated or not; until the first handoff is measured
every request is handed off.
"""

from __future__ import annotations

from dataclasses import dataclass

_ALPHA = 0.1  # weight of each new measurement in the moving averages


@dataclass(slots=True)
class _Average:
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - _ALPHA) * self.value + _ALPHA * x


class LocalPrefill:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._token_s = _Average()
        self._handoff_s = _Average()

    def observe(self, timing, num_computed_tokens: int) -> None:
        """One handed-off request's worker timing (protocol.EngineTiming) and the prompt
        tokens its prefill computed."""
        if timing.prefill_s and num_computed_tokens > 0:
            self._token_s.add(timing.prefill_s / num_computed_tokens)
        if timing.transfer_s is not None and timing.prefill_call_s is not None:
            engine = (timing.engine_queue_s or 0.0) + (timing.prefill_s or 0.0)
            outside = timing.prefill_call_s - engine
            self._handoff_s.add(timing.transfer_s + max(outside, 0.0))

    def threshold(self, remote_queue_tokens: int) -> int:
        """Uncached tokens a decode instance may prefill itself now (0: hand off)."""
        token_s, handoff_s = self._token_s.value, self._handoff_s.value
        if not self.max_tokens or token_s is None or handoff_s is None or token_s <= 0:
            return 0
        return int(min(self.max_tokens, handoff_s / token_s + remote_queue_tokens))

    def describe(self) -> dict:
        return {"token_s": self._token_s.value, "handoff_s": self._handoff_s.value,
                "max_tokens": self.max_tokens}  # fmt: skip
