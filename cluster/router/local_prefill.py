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

Local wins while the first token comes no later than from a prefill instance, the decode
instance has headroom (`cap`: the prompt tokens it may prefill itself at once) and KV room:

    (local_queue + uncached) * local_token_s <= handoff_s + remote_tokens * token_s
    local_queue + uncached <= cap

The measured terms are moving averages of what requests report:

    token_s        prefill_s / prompt tokens computed on the prefill instances
    handoff_s      transfer_s + the prefill call's time outside the prefill engine
    local_token_s  the decode instance's own cost per prompt token (below), token_s until
                   it has prefilled a prompt itself: a decode instance on slower hardware,
                   or one whose steps carry many decodes, takes fewer prompts

so the rule is the latency model as measured on this deployment, emulated or not; until
the first handoff is measured every request is handed off. A follow-up turn whose history
the decode instance holds and no prefill instance does is the clearest local case: handing
it off would recompute the history.

The headroom. The decode engine (engine/scheduler.py) runs a local prompt in the steps of
its running requests, stall-free: decodes first, then the prompt's chunk in the budget left
(max_num_batched_tokens less the decodes, at most long_prefill_token_threshold), so P prompt
tokens run in ceil(P / chunk) steps (one, for a prompt shorter than the budget left) that
each take their chunk's prefill time longer. However the engine chunks it, every running
request waits P * token_s in all, and its TPOT, the average over its decode steps, rises by
P * token_s / num_steps. With `tpot_s` (the TPOT target) set, the steps may stretch until
the running requests' TPOT reaches it:

    cap = min(max_tokens, (tpot_s - decode_tpot_s) / token_s * num_steps)    (0 if <= 0)

measured per decode instance, from what its requests report:

    decode_tpot_s  TPOT of the requests that finished there ((e2e - TTFT) / (tokens - 1))
    num_steps      their decode steps (output tokens - 1): the steps a stall is averaged over
    local_token_s  its own local prefills' (prefill_s - decode_tpot_s) / prompt tokens, the
                   prompt's share of the step it ran in; else the prefill instances' token_s

The measured TPOT already carries the stalls of recent local prefills, so the cap shrinks as
they add up and closes once TPOT reaches the target: a feedback loop on the average TPOT
(not on each step's gap, nor on a percentile). Until a decode instance's TPOT and a token_s
are measured, or without `tpot_s`, cap = max_tokens; max_tokens 0 turns local prefill off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_ALPHA = 0.1  # weight of each new measurement in the moving averages


@dataclass(slots=True)
class _Average:
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - _ALPHA) * self.value + _ALPHA * x


@dataclass(slots=True)
class _Decode:
    """What one decode instance's requests report (moving averages)."""

    tpot_s: _Average = field(default_factory=_Average)
    num_steps: _Average = field(default_factory=_Average)
    token_s: _Average = field(default_factory=_Average)  # its own local prefills


class LocalPrefill:
    def __init__(self, max_tokens: int, tpot_s: float | None = None):
        """`max_tokens`: the hard bound on what a decode instance prefills itself at once
        (0: never); `tpot_s`: the TPOT target the cap is derived from (None: cap =
        max_tokens)."""
        self.max_tokens = max_tokens
        self.tpot_s = tpot_s
        self._token_s = _Average()
        self._handoff_s = _Average()
        self._decodes: dict[str, _Decode] = {}  # decode instance id -> its measures

    def observe(self, timing, num_computed_tokens: int) -> None:
        """One handed-off request's worker timing (protocol.EngineTiming) and the prompt
        tokens its prefill computed."""
        if timing.prefill_s and num_computed_tokens > 0:
            self._token_s.add(timing.prefill_s / num_computed_tokens)
        if timing.transfer_s is not None and timing.prefill_call_s is not None:
            engine = (timing.engine_queue_s or 0.0) + (timing.prefill_s or 0.0)
            outside = timing.prefill_call_s - engine
            self._handoff_s.add(timing.transfer_s + max(outside, 0.0))

    def observe_local(self, decode: str, prefill_s: float, num_computed_tokens: int) -> None:
        """One prompt prefilled on decode instance `decode`: its engine prefill_s (the
        step(s) it ran in, the running requests' decodes included) and the tokens computed."""
        side = self._decodes.get(decode)
        if side is None or side.tpot_s.value is None:
            return  # (no decode step to take out of prefill_s yet)
        prompt_s = prefill_s - side.tpot_s.value
        if prompt_s > 0 and num_computed_tokens > 0:
            side.token_s.add(prompt_s / num_computed_tokens)

    def observe_decode(self, decode: str, tpot_s: float, num_steps: int) -> None:
        """One request finished on decode instance `decode`: its TPOT over `num_steps`
        decode steps (output tokens - 1)."""
        if not self.max_tokens or num_steps < 1:
            return
        side = self._decodes.setdefault(decode, _Decode())
        side.tpot_s.add(tpot_s)
        side.num_steps.add(num_steps)

    def cap(self, decode: str = "") -> int:
        """The prompt tokens `decode` may prefill itself at once (module docstring)."""
        side = self._decodes.get(decode)
        if self.tpot_s is None or side is None or side.tpot_s.value is None:
            return self.max_tokens
        token_s = side.token_s.value or self._token_s.value
        if not token_s:
            return self.max_tokens
        slack_s = self.tpot_s - side.tpot_s.value
        if slack_s <= 0:
            return 0
        return min(self.max_tokens, int(slack_s / token_s * side.num_steps.value))

    def forget(self, decode: str) -> None:
        """Decode instance `decode` left the deployment (elastic pools mint new ids)."""
        self._decodes.pop(decode, None)

    def threshold(self, remote_tokens: int, decode: str = "") -> int:
        """What handing off costs, in prompt tokens of `decode`'s own prefill time: the
        handoff's measured time plus `remote_tokens` at the prefill instances' time per
        token (0: off, or nothing measured yet)."""
        token_s, handoff_s = self._token_s.value, self._handoff_s.value
        if not self.max_tokens or token_s is None or handoff_s is None or token_s <= 0:
            return 0
        side = self._decodes.get(decode)
        local_token_s = (side.token_s.value if side is not None else None) or token_s
        return int((handoff_s + remote_tokens * token_s) / local_token_s)

    def local(self, uncached: int, local_queue: int, remote_tokens: int,
              decode: str = "") -> bool:  # fmt: skip
        """Whether a prompt runs on its decode instance `decode`: `uncached` tokens it lacks
        there, `local_queue` prompt tokens that instance already prefills itself,
        `remote_tokens` what the best prefill instance would get through first (its queue
        and the tokens it lacks)."""
        if local_queue + uncached > self.cap(decode):
            return False
        return local_queue + uncached <= self.threshold(remote_tokens, decode)

    def describe(self) -> dict:
        decodes = self._decodes.items()
        return {"token_s": self._token_s.value, "handoff_s": self._handoff_s.value,
                "max_tokens": self.max_tokens, "tpot_s": self.tpot_s,
                "caps": {d: self.cap(d) for d, _ in decodes},
                "local_token_s": {d: m.token_s.value for d, m in decodes}}  # fmt: skip
