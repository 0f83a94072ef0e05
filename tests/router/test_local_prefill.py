"""LocalPrefill's headroom under a TPOT target (conditional disaggregation,
router/local_prefill.py): the cap a decode instance's measured TPOT, decode steps and prefill
time per token leave, on scripted observations; and the setting's validation. The break-even
against a handoff is tested in test_prefix_index.py."""

from __future__ import annotations

import pytest

from cluster.router.local_prefill import LocalPrefill
from cluster.router.settings import RouterSettings
from cluster.workers.protocol import EngineTiming

# Powers of two, so every step of the arithmetic below is exact in binary.
TOKEN_S = 2**-12  # a prefill instance's seconds per prompt token: 2**-6 s for 64 tokens
# handoff = transfer 0.25 + (call - prefill) 0.25 = 0.5 s = 2048 tokens' worth: the break-even
# is far above every cap below, so the cap alone decides local() in these tests
HANDOFF = EngineTiming(prefill_s=64 * TOKEN_S, prefill_call_s=64 * TOKEN_S + 0.25,
                       transfer_s=0.25)  # fmt: skip
TARGET_S = 2**-5  # the TPOT target: 31.25 ms


def measured(decode_tpot_s: float, num_steps: int, max_tokens: int = 1 << 20) -> LocalPrefill:
    """A LocalPrefill after one handoff and one request finished on decode instance "d"."""
    local = LocalPrefill(max_tokens, tpot_s=TARGET_S)
    local.observe(HANDOFF, 64)
    local.observe_decode("d", decode_tpot_s, num_steps)
    return local


def test_the_cap_is_the_slack_in_prompt_tokens_spread_over_the_decode_steps():
    # slack 2**-5 - 2**-6 = 2**-6 s a step = 64 tokens at 2**-12 s each; a request's TPOT
    # averages a stall over its 8 decode steps: 8 * 64 tokens keep it at the target
    assert measured(2**-6, num_steps=8).cap("d") == 8 * 64
    # twice the steps to average over: twice the tokens
    assert measured(2**-6, num_steps=16).cap("d") == 16 * 64


def test_the_cap_grows_as_the_tpot_slack_grows():
    caps = [measured(tpot, num_steps=100).cap("d") for tpot in (0.031, 0.03, 0.02, 0.01, 0.0)]
    assert caps == sorted(caps) and len(set(caps)) == len(caps)
    assert caps[-1] == int(TARGET_S / TOKEN_S * 100)  # no decode time at all: the whole target


def test_the_cap_is_zero_once_the_measured_step_reaches_the_target():
    for tpot in (TARGET_S, 0.04, 1.0):
        local = measured(tpot, num_steps=1000)
        assert local.cap("d") == 0
        assert not local.local(uncached=1, local_queue=0, remote_tokens=1 << 20, decode="d")


def test_the_cap_never_exceeds_local_prefill_max_tokens():
    local = measured(0.0, num_steps=10_000, max_tokens=512)  # slack for 1.28M tokens
    assert local.cap("d") == 512
    assert local.local(uncached=500, local_queue=12, remote_tokens=0, decode="d")
    assert not local.local(uncached=500, local_queue=13, remote_tokens=0, decode="d")
    off = measured(0.0, num_steps=10_000, max_tokens=0)  # 0 still means never local
    assert off.cap("d") == 0
    assert not off.local(uncached=1, local_queue=0, remote_tokens=1 << 20, decode="d")


def test_local_decides_on_the_derived_cap():
    local = measured(2**-6, num_steps=8)  # cap 512 (first test), break-even 2048
    assert local.local(uncached=400, local_queue=112, remote_tokens=0, decode="d")
    assert not local.local(uncached=400, local_queue=113, remote_tokens=0, decode="d")


def test_the_cap_falls_back_to_max_tokens_until_measured():
    local = LocalPrefill(1024, tpot_s=TARGET_S)
    assert local.cap("d") == 1024  # nothing measured
    local.observe_decode("d", 2**-6, 8)
    assert local.cap("d") == 1024  # TPOT measured, no prefill time per token yet
    local.observe(HANDOFF, 64)
    assert local.cap("d") == 8 * 64  # both measured: derived (first test)
    assert local.cap("other") == 1024  # another decode instance: nothing measured there
    untargeted = LocalPrefill(1024)  # no TPOT target: the bound is the cap, as before
    untargeted.observe(HANDOFF, 64)
    untargeted.observe_decode("d", 1.0, 8)  # (far past any target: ignored)
    assert untargeted.cap("d") == 1024


def test_the_decode_instances_own_prefill_cost_wins_over_the_prefill_instances():
    local = measured(2**-6, num_steps=8)
    assert local.cap("d") == 512
    # a 64-token prompt prefilled on "d" took its step's decodes (2**-6 s, the measured TPOT)
    # plus 64 * 2**-11 s: twice the prefill instance's cost per token, so half the cap
    local.observe_local("d", 2**-6 + 64 * 2**-11, 64)
    assert local.cap("d") == 256


def test_a_local_prefill_before_any_decode_step_is_measured_is_not_counted():
    local = LocalPrefill(1 << 20, tpot_s=TARGET_S)
    local.observe(HANDOFF, 64)
    local.observe_local("d", 1.0, 64)  # no TPOT on "d" to take out of it: ignored
    local.observe_decode("d", 2**-6, 8)
    assert local.cap("d") == 512  # the prefill instances' 2**-12 s a token, not 1/64 s


def test_the_measures_are_moving_averages():
    local = measured(2**-6, num_steps=8)
    for _ in range(100):  # the decode instance gets busier: TPOT past the target
        local.observe_decode("d", 0.05, 8)
    assert local.cap("d") == 0
    for _ in range(100):  # and quieter again
        local.observe_decode("d", 2**-6, 8)
    assert 0 < local.cap("d") <= 512


@pytest.mark.parametrize("tpot_s", [0, 0.0, -0.01, float("nan")])
def test_the_tpot_target_must_be_positive(tpot_s):
    with pytest.raises(ValueError, match="local_prefill_tpot_s"):
        RouterSettings(local_prefill_tpot_s=tpot_s)


def test_the_tpot_target_is_optional():
    assert RouterSettings().local_prefill_tpot_s is None
    assert RouterSettings(local_prefill_tpot_s=0.03).local_prefill_tpot_s == 0.03


def test_the_break_even_prices_local_tokens_at_the_decode_instances_own_cost():
    local = measured(2**-6, num_steps=8)  # handoff 0.5 s at 2**-12 s a token: 2048 tokens
    assert local.threshold(0, "d") == local.threshold(0) == 2048
    assert local.threshold(1024, "d") == 2048 + 1024
    # "d" prefills at twice the prefill instances' cost per token: half as many tokens of
    # its own break even with the same handoff and the same remote queue
    local.observe_local("d", 2**-6 + 64 * 2**-11, 64)
    assert local.threshold(0, "d") == 1024
    assert local.threshold(1024, "d") == (2048 + 1024) // 2
    assert local.threshold(0, "other") == 2048  # not measured there: the prefill cost
    untargeted = LocalPrefill(1 << 20)  # measured without a TPOT target too
    untargeted.observe(HANDOFF, 64)
    untargeted.observe_decode("d", 2**-6, 8)
    untargeted.observe_local("d", 2**-6 + 64 * 2**-11, 64)
    assert untargeted.threshold(0, "d") == 1024
    assert untargeted.cap("d") == 1 << 20  # (no target: the cap stays the bound)


def test_a_decode_instance_that_left_is_forgotten():
    local = measured(2**-6, num_steps=8)
    local.observe_local("d", 2**-6 + 64 * 2**-11, 64)
    assert "d" in local.describe()["caps"]
    local.forget("d")
    assert local.describe()["caps"] == {}
    assert local.cap("d") == 1 << 20 and local.threshold(0, "d") == 2048
    local.forget("never-seen")  # (no error)
