"""Conditional disaggregation (policy kv): prefill a request on its decode instance itself
when the part of its prompt that instance lacks is short, instead of handing it off.

The trade, per request (DistServe's, made at run time as Dynamo and llm-d's P/D sidecar do),
in prompt tokens' worth of prefill time (token_s each):

    hand off   the best prefill instance first gets through its queue and the part of
               this prompt it lacks (the kv policy's prefill cost: `remote_tokens`), then
               the prefill call's round trip and the KV pull cost handoff_s
    local      the decode instance gets through the prompts it already prefills itself
               (`local_queue`) and the part of this prompt it lacks (`uncached`), in the
               steps of its running requests, which wait that much longer

Local wins while the first token comes no later than from a prefill instance, and the
decode instance has headroom: the prompt tokens it prefills itself at once stay within
`local_prefill_max_tokens`, which bounds what its running requests' steps take on (their
TPOT), and it has KV room:

    local_queue + uncached <= min(handoff_s / token_s + remote_tokens, max_tokens)

Both measured terms are moving averages of
what handed-off requests report:

    token_s    prefill_s / prompt tokens computed on the prefill instance
    handoff_s  transfer_s + the prefill call's time outside the prefill engine

so the rule is the latency model as measured on this deployment, emulated or not; until
the first handoff is measured every request is handed off. A follow-up turn whose history
the decode instance holds and no prefill instance does is the clearest local case: handing
it off would recompute the history.
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

    def threshold(self, remote_tokens: int) -> int:
        """What handing off costs, in prompt tokens: the handoff's measured time over the
        prefill time per token, plus `remote_tokens` (0: off, or nothing measured yet)."""
        token_s, handoff_s = self._token_s.value, self._handoff_s.value
        if not self.max_tokens or token_s is None or handoff_s is None or token_s <= 0:
            return 0
        return int(handoff_s / token_s + remote_tokens)

    def local(self, uncached: int, local_queue: int, remote_tokens: int) -> bool:
        """Whether a prompt runs on its decode instance: `uncached` tokens it lacks there,
        `local_queue` prompt tokens that instance already prefills itself, `remote_tokens`
        what the best prefill instance would get through first (its queue and the tokens
        it lacks)."""
        if local_queue + uncached > self.max_tokens:
            return False
        return local_queue + uncached <= self.threshold(remote_tokens)

    def describe(self) -> dict:
        return {"token_s": self._token_s.value, "handoff_s": self._handoff_s.value,
                "max_tokens": self.max_tokens}  # fmt: skip
