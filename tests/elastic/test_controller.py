"""The autoscaler's decisions on scripted observations (controller.py): deterministic, no
clock, no cluster. The sizer here is a script of what a model would answer, so that each
test isolates one rule; test_sizing_in_the_loop runs the real model (placement/sizing.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from cluster.elastic.controller import Action, Controller, TypedSizes
from cluster.elastic.settings import AutoscaleSettings
from cluster.elastic.window import Observation, Window

GPUS = {"prefill": 1, "decode": 1}


@dataclass
class Sizes:
    num_prefill: int
    num_decode: int


class ScriptedModel:
    """Answers `sizes` (settable) and records the rates it was asked about."""

    def __init__(self, prefill: int, decode: int):
        self.sizes = Sizes(prefill, decode)
        self.rates = []

    def __call__(self, rate, input_lens, output_lens):
        self.rates.append(rate)
        return self.sizes


def observed(n: int = 40, ttft: float = 0.1, tpot: float = 0.01, failed: int = 0, late: int = 0,
             prompt: int = 512, at: float = 10.0, arrived: float | None = None
             ) -> Observation:  # fmt: skip
    """`arrived`: when the requests with a first token and the late ones arrived (None:
    unknown, as if before anything the controller did)."""
    known = arrived is not None
    return Observation(at - 10.0, at, input_lens=(prompt,) * n, ttfts=(ttft,) * n,
                       output_lens=(128,) * n, tpots=(tpot,) * n, num_failed=failed,
                       late_arrivals=(arrived if known else 0.0,) * late,
                       ttft_arrivals=(arrived,) * n if known else ())  # fmt: skip


def controller(model=None, **settings) -> Controller:
    base = {
        "ttft_s": 1.0,
        "tpot_s": 0.1,
        "max_gpus": 8,
        "scale_down_after": 3,
        "cooldown_s": 0,
        "scale_down_window_s": 0,
    }
    return Controller(AutoscaleSettings(**{**base, **settings}), GPUS, model)


def test_grows_at_once_to_what_the_model_needs_at_the_forecast():
    model = ScriptedModel(3, 2)
    c = controller(model, headroom=1.5)
    d = c.decide(observed(), rate=4.0, history=observed(), current={"prefill": 1, "decode": 1})
    assert d.target == {"prefill": 3, "decode": 2}
    assert sorted(d.actions, key=str) == sorted(
        [Action("add", "prefill", "forecast")] * 2 + [Action("add", "decode", "forecast")],
        key=str,
    )
    assert model.rates[0] == pytest.approx(6.0)  # 4 req/s x headroom 1.5
    assert d.forecast_rate == pytest.approx(6.0)


def test_a_breach_grows_the_pool_that_misses_even_when_the_model_disagrees():
    c = controller(ScriptedModel(1, 1))
    slow_first_token = observed(ttft=2.0)
    d = c.decide(slow_first_token, 1.0, observed(), {"prefill": 2, "decode": 2})
    assert d.actions == (Action("add", "prefill", "ttft_breach"),)
    slow_tokens = observed(tpot=0.5)
    d = c.decide(slow_tokens, 1.0, observed(), {"prefill": 2, "decode": 2})
    assert d.actions == (Action("add", "decode", "tpot_breach"),)


def test_failed_requests_count_as_misses_and_few_samples_judge_nothing():
    c = controller(ScriptedModel(1, 1))
    d = c.decide(observed(n=20, failed=20), 1.0, observed(), {"prefill": 1, "decode": 1})
    assert d.attainment == (0.5, 0.5)
    assert {a.role for a in d.actions} == {"prefill", "decode"}
    c = controller(ScriptedModel(1, 1), min_samples=10)
    d = c.decide(observed(n=3, ttft=9.0), 1.0, observed(), {"prefill": 1, "decode": 1})
    assert d.actions == ()


def test_requests_still_waiting_past_the_ttft_target_are_misses_already():
    """A backlog shows before its requests finish: a pool that stopped keeping up is
    breached now, not when the late ones finally get their first token."""
    c = controller(ScriptedModel(1, 1))
    d = c.decide(observed(n=10, late=10), 1.0, observed(), {"prefill": 1, "decode": 1})
    assert d.attainment[0] == 0.5
    assert d.actions == (Action("add", "prefill", "ttft_breach"),)


def test_sizes_for_the_prompts_arriving_now_and_past_outputs():
    """A shift from chat to summarization: the recent prompts, not an hour's average."""
    seen = []

    def model(rate, input_lens, output_lens):
        seen.append((set(input_lens), set(output_lens)))
        return Sizes(1, 1)

    c = controller(model)
    history = observed(prompt=300)
    c.decide(observed(prompt=2500), 1.0, history, {"prefill": 1, "decode": 1})
    c.decide(observed(n=3, prompt=2500), 1.0, history, {"prefill": 1, "decode": 1})
    assert seen == [({2500}, {128}), ({300}, {128})]  # too few recent ones: the history's


def test_a_pool_does_not_shrink_within_its_cooldown_after_growing():
    model = ScriptedModel(3, 1)
    c = controller(model, scale_down_after=1, cooldown_s=30.0)
    d = c.decide(observed(at=100.0), 1.0, observed(), {"prefill": 2, "decode": 1})
    assert d.actions == (Action("add", "prefill", "forecast"),)
    model.sizes = Sizes(1, 1)
    for at in (110.0, 120.0):  # within 30 s of growing: held
        d = c.decide(observed(at=at), 1.0, observed(), {"prefill": 3, "decode": 1})
        assert d.actions == ()
    d = c.decide(observed(at=131.0), 1.0, observed(), {"prefill": 3, "decode": 1})
    assert d.actions == (Action("remove", "prefill", "slack"),)


def test_shrinks_one_at_a_time_after_enough_slack_and_never_on_a_breach():
    model = ScriptedModel(1, 1)
    c = controller(model, scale_down_after=3)
    current = {"prefill": 3, "decode": 3}
    assert c.decide(observed(), 1.0, observed(), current).actions == ()
    assert c.decide(observed(), 1.0, observed(), current).actions == ()
    # A breach resets the count: no shrink now, and three more quiet decisions needed.
    d = c.decide(observed(ttft=5.0), 1.0, observed(), current)
    assert d.actions == (Action("add", "prefill", "ttft_breach"),)
    assert c.decide(observed(), 1.0, observed(), current).actions == ()
    assert c.decide(observed(), 1.0, observed(), current).actions == ()
    d = c.decide(observed(), 1.0, observed(), current)
    assert sorted(d.actions, key=str) == [Action("remove", "decode", "slack"),
                                         Action("remove", "prefill", "slack")]  # fmt: skip
    assert d.target == {"prefill": 2, "decode": 2}


def test_a_pool_that_grows_while_the_other_shrinks_takes_its_instance_by_a_flip():
    model = ScriptedModel(1, 3)
    c = controller(model, scale_down_after=1)
    d = c.decide(observed(), 1.0, observed(), {"prefill": 3, "decode": 1})
    # decode grows by two at once: one taken from prefill (which shrinks one at a time)
    assert d.actions == (Action("flip", "decode", "forecast"), Action("add", "decode", "forecast"))
    assert d.target == {"prefill": 2, "decode": 3}
    no_flips = controller(model, scale_down_after=1)
    no_flips.can_flip = False
    d = no_flips.decide(observed(), 1.0, observed(), {"prefill": 3, "decode": 1})
    assert d.actions == (Action("add", "decode", "forecast"), Action("add", "decode", "forecast"),
                         Action("remove", "prefill", "slack"))  # fmt: skip


def test_at_max_gpus_a_breached_pool_takes_the_others_slack_at_once():
    model = ScriptedModel(2, 2)  # decode needs 2 of its 4
    c = controller(model, max_gpus=6, scale_down_after=5)
    d = c.decide(observed(ttft=3.0), 1.0, observed(), {"prefill": 2, "decode": 4})
    assert d.actions == (Action("flip", "prefill", "ttft_breach"),)
    assert d.target == {"prefill": 3, "decode": 3}
    assert "capped" not in d.reason


def test_bounds_one_per_role_and_the_device_range():
    c = controller(ScriptedModel(0, 0), min_gpus=0, scale_down_after=1)
    d = c.decide(observed(), 0.1, observed(), {"prefill": 1, "decode": 1})
    assert d.target == {"prefill": 1, "decode": 1} and d.actions == ()
    c = controller(ScriptedModel(9, 9), max_gpus=4)
    d = c.decide(observed(), 50.0, observed(), {"prefill": 1, "decode": 1})
    assert sum(d.target.values()) == 4 and min(d.target.values()) >= 1
    assert "capped at 4 devices" in d.reason
    c = controller(ScriptedModel(1, 1), min_gpus=4)
    d = c.decide(observed(), 0.1, observed(), {"prefill": 1, "decode": 1})
    assert d.target == {"prefill": 2, "decode": 2}
    assert {a.cause for a in d.actions} == {"bounds"}


def test_without_a_model_it_holds_until_a_breach():
    c = controller(None)
    current = {"prefill": 2, "decode": 2}
    assert c.decide(observed(), 9.0, observed(), current).actions == ()
    d = c.decide(observed(tpot=1.0), 9.0, observed(), current)
    assert d.actions == (Action("add", "decode", "tpot_breach"),)


def test_emulated_time_is_judged_in_the_models_seconds():
    """Under emulation the router's clock runs time_scale x slower than the model's."""
    c = controller(ScriptedModel(1, 1))
    c.time_scale = 4.0
    d = c.decide(observed(ttft=3.0, tpot=0.3), 1.0, observed(), {"prefill": 1, "decode": 1})
    assert d.attainment == (1.0, 1.0) and d.actions == ()  # 3 s real = 0.75 s emulated
    assert d.forecast_rate == pytest.approx(4.0 * 1.2)


def test_settings_refuse_what_cannot_work():
    for bad in ({"attainment": 0}, {"max_gpus": 1, "min_gpus": 2}, {"headroom": 0.5},
                {"interval_s": 0}, {"ttft_s": -1}, {"scale_down_margin": 0.9},
                {"scale_down_window_s": -1}):  # fmt: skip
        with pytest.raises(ValueError, match="autoscale"):
            AutoscaleSettings(**bad)


def test_the_window_sees_arrivals_first_tokens_finishes_and_failures_in_its_span():
    now = [0.0]
    w = Window(clock=lambda: now[0])
    tokens = []
    for t, n in ((1.0, 100), (2.0, 200), (3.0, 50), (12.0, 300)):
        now[0] = t
        tokens.append(w.arrived(n))
    now[0] = 1.5
    w.first_token(tokens[0])
    w.first_token(tokens[0])  # a later chunk: nothing more
    now[0] = 5.0
    w.finished(output_tokens=11, tpot_s=0.1)
    w.finished(output_tokens=1, tpot_s=None)  # one token: no TPOT
    w.finished(output_tokens=0, tpot_s=None)  # ended before any token: no length to learn
    w.failed()
    w.ended(tokens[1])  # (it failed: no longer waiting)
    w.split(ttft_s=0.5, decode_side_s=0.1)
    o = w.observe(0.0, 10.0, late_after_s=4.0)
    assert o.input_lens == (100, 200, 50) and o.rate == pytest.approx(0.3)
    assert o.ttfts == (0.5,) and o.output_lens == (11, 1) and o.tpots == (0.1,)
    assert o.num_failed == 1
    assert o.num_late == 1  # the request of t=3 has waited 7 s; the one of t=12 not yet
    assert o.ttft_splits == ((0.5, 0.1),)
    assert o.attainment(ttft_s=1.0, tpot_s=1.0) == (pytest.approx(1 / 3), 0.5)
    assert o.ttft_arrivals == (pytest.approx(1.0),) and o.late_arrivals == (3.0,)
    assert o.arrived_since(1.0).num_judged == 3
    assert o.arrived_since(2.0).num_judged == 2  # the late one (t=3) and the failure
    assert o.arrived_since(4.0).num_judged == 1  # only the failure: it has no arrival time


def test_one_correction_at_a_time():
    """A breach grows its pool once. While that instance starts, the same breach adds
    nothing more; once it serves, only the requests that arrived after that judge it: the
    queue from before drains on the capacity there is now."""
    c = controller(ScriptedModel(1, 1))
    current = {"prefill": 2, "decode": 1}
    late = observed(ttft=5.0, at=100.0, arrived=94.0)
    assert c.decide(late, 1.0, observed(), current).actions == (
        Action("add", "prefill", "ttft_breach"),)  # fmt: skip
    grown = {"prefill": 3, "decode": 1}
    still = observed(ttft=5.0, at=102.0, arrived=96.0)
    assert c.decide(still, 1.0, observed(), grown, pending={"prefill": 1}).actions == ()
    backlog = observed(ttft=5.0, at=104.0, late=5, arrived=100.0)  # serving since 104
    d = c.decide(backlog, 1.0, observed(), grown)
    assert d.actions == () and "no correction" in d.reason
    fresh_but_few = dataclasses.replace(
        backlog, end=110.0, ttft_arrivals=(100.0,) * 35 + (105.0,) * 5
    )
    assert c.decide(fresh_but_few, 1.0, observed(), grown).actions == ()  # < min_samples
    still_late = observed(ttft=5.0, at=112.0, arrived=105.0)
    assert c.decide(still_late, 1.0, observed(), grown).actions == (
        Action("add", "prefill", "ttft_breach"),)  # fmt: skip
    # Unknown arrivals (a window that does not record them) are judged all.
    c = controller(ScriptedModel(1, 1))
    assert c.decide(late, 1.0, observed(), current).actions != ()


def test_a_pool_shrinks_only_to_the_largest_size_recommended_within_its_window():
    """HPA's scale-down stabilization: one low forecast amid higher ones shrinks nothing;
    a window of low ones does."""
    model = ScriptedModel(3, 1)
    c = controller(model, headroom=1.0, scale_down_after=1, scale_down_window_s=30.0,
                   scale_down_margin=1.0)  # fmt: skip
    current = {"prefill": 3, "decode": 1}
    assert c.decide(observed(at=100.0), 9.0, observed(), current).actions == ()
    model.sizes = Sizes(2, 1)
    for at in (110.0, 120.0, 130.0):  # 3 prefill were recommended within the last 30 s
        assert c.decide(observed(at=at), 6.0, observed(), current).actions == ()
    assert c.decide(observed(at=131.0), 6.0, observed(), current).actions == (
        Action("remove", "prefill", "slack"),)  # fmt: skip


def test_a_pool_shrinks_only_to_what_would_still_do_at_a_higher_rate():
    """The band against flapping: a forecast that dips just below what the current pools
    are sized for does not shrink them; one well below does."""

    class Threshold:  # 2 prefill instances from 10 req/s on
        def __call__(self, rate, input_lens, output_lens):
            return Sizes(2 if rate >= 10.0 else 1, 1)

    c = controller(Threshold(), headroom=1.0, scale_down_after=1, scale_down_margin=1.15)
    current = {"prefill": 2, "decode": 1}
    assert c.decide(observed(at=10), 9.5, observed(), current).actions == ()  # 9.5 x 1.15 >= 10
    assert c.decide(observed(at=20), 8.0, observed(), current).actions == (
        Action("remove", "prefill", "slack"),)  # fmt: skip
    c = controller(Threshold(), headroom=1.0, scale_down_after=1, scale_down_margin=1.0)
    assert c.decide(observed(at=10), 9.5, observed(), current).actions == (
        Action("remove", "prefill", "slack"),)  # fmt: skip


def test_the_rate_is_taken_over_enough_arrivals_to_be_steady():
    now = [0.0]
    w = Window(clock=lambda: now[0])
    for i in range(100):  # one a second for 100 s
        now[0] = float(i)
        w.arrived(10)
    assert w.rate(100.0, min_span=6.0, min_arrivals=1) == pytest.approx(6 / 6)
    assert w.rate(100.0, min_span=6.0, min_arrivals=50) == pytest.approx(50 / 50)
    assert w.rate(100.0, min_span=200.0, min_arrivals=50) == pytest.approx(100 / 200)


def test_a_ttft_breach_grows_the_pool_where_the_late_requests_waited():
    """Requests late for their first token because no decode instance had room (their time
    went after the prompt was computed) need decode instances, not more prefill."""
    current = {"prefill": 2, "decode": 2}

    def late(decode_side: float) -> Observation:
        o = observed(n=20, ttft=3.0)
        return dataclasses.replace(o, ttft_splits=((3.0, decode_side),) * 20)

    c = controller(ScriptedModel(1, 1))
    assert c.decide(late(2.5), 1.0, observed(), current).actions == (
        Action("add", "decode", "ttft_breach"),)  # fmt: skip
    c = controller(ScriptedModel(1, 1))
    assert c.decide(late(0.5), 1.0, observed(), current).actions == (
        Action("add", "prefill", "ttft_breach"),)  # fmt: skip
    on_time = dataclasses.replace(late(2.5), ttft_splits=((0.2, 0.19),) * 20)
    c = controller(ScriptedModel(1, 1))  # only the late ones say where the time went
    assert c.decide(on_time, 1.0, observed(), current).actions == (
        Action("add", "prefill", "ttft_breach"),)  # fmt: skip


# -- mixed hardware pools ---------------------------------------------------------------------


class PairModel:
    """A mixed-pools model: the pools (and whether they meet the SLOs) of each (prefill type,
    decode type) pair, settable; without a pair asked for, `cheapest`'s."""

    def __init__(self, pairs: dict, cheapest: tuple[str, str]):
        self.pairs, self.cheapest = pairs, cheapest

    def __call__(self, rate, input_lens, output_lens, hardware=None):
        pair = self.cheapest if hardware is None else (hardware["prefill"], hardware["decode"])
        n_p, n_d, meets = self.pairs[pair]
        return TypedSizes(n_p, n_d, {"prefill": pair[0], "decode": pair[1]}, meets)


def mixed(model, prefill=("A", "B"), decode=("A", "B"), **settings) -> Controller:
    c = controller(model, **settings)
    c.hardware = {"prefill": tuple(prefill), "decode": tuple(decode)}
    return c


def decide(c: Controller, by_type: dict, starting: dict | None = None, at: float = 10.0):
    """One decision on pools given by type: {role: {type: instances}} (starting included)."""
    starting = starting or {}
    current = {r: sum(by_type[r].values()) for r in by_type}
    pending = {r: sum(starting.get(r, {}).values()) for r in by_type}
    return c.decide(observed(at=at), 1.0, observed(), current, pending, by_type,
                    {r: starting.get(r, {}) for r in by_type})  # fmt: skip


def test_mixed_pools_add_and_remove_the_chosen_type():
    c = mixed(PairModel({("A", "A"): (3, 1, True)}, ("A", "A")), scale_down_after=1)
    d = decide(c, {"prefill": {"A": 1}, "decode": {"A": 2}})
    assert d.hardware == {"prefill": "A", "decode": "A"}
    # decode's slack flips to prefill (one type for both roles), prefill adds the rest
    assert d.actions == (Action("flip", "prefill", "forecast", "A"),
                         Action("add", "prefill", "forecast", "A"))  # fmt: skip
    with pytest.raises(ValueError, match="by_type"):
        c.decide(observed(), 1.0, observed(), {"prefill": 1, "decode": 1})


def test_a_cheaper_pair_is_taken_after_it_was_cheapest_in_a_row_and_migrates_make_before_break():
    model = PairModel({("A", "A"): (2, 1, True), ("B", "A"): (1, 1, True)}, ("B", "A"))
    c = mixed(model, scale_down_after=2)
    pools = {"prefill": {"A": 2}, "decode": {"A": 1}}
    d = decide(c, pools, at=10.0)
    assert d.actions == () and d.hardware["prefill"] == "A"  # once: the forecast's noise?
    assert "cheaper on B + A (1/2)" in d.reason
    d = decide(c, pools, at=20.0)
    assert d.hardware == {"prefill": "B", "decode": "A"}
    assert d.actions == (Action("add", "prefill", "migrate", "B"),)  # the old ones stay
    assert d.target == {"prefill": 3, "decode": 1}
    starting = {"prefill": {"A": 2, "B": 1}, "decode": {"A": 1}}
    d = decide(c, starting, {"prefill": {"B": 1}}, at=30.0)
    assert d.actions == ()  # while the new one starts, the old ones serve
    d = decide(c, starting, at=40.0)
    assert d.actions == (Action("remove", "prefill", "migrate", "A"),) * 2
    assert d.target == {"prefill": 1, "decode": 1}
    d = decide(c, {"prefill": {"B": 1}, "decode": {"A": 1}}, at=50.0)
    assert d.actions == () and d.hardware == {"prefill": "B", "decode": "A"}


def test_a_cheaper_pair_must_stay_the_cheapest_over_the_stabilization_window():
    """Near the boundary between two pairs the samples' noise makes either the cheapest:
    the row restarts whenever another pair (or the chosen one) is the cheapest, and a switch
    also needs the row to last scale_down_window_s (seen: a decode pool migrating L40S <->
    A100 every 40 s)."""
    model = PairModel({("A", "A"): (1, 1, True), ("A", "B"): (1, 1, True),
                       ("B", "A"): (1, 1, True)}, ("A", "B"))  # fmt: skip
    c = mixed(model, scale_down_after=2, scale_down_window_s=30.0)
    pools = {"prefill": {"A": 1}, "decode": {"A": 1}}
    for at in (10.0, 20.0, 30.0):  # 3 in a row, but only 20 s of the 30
        d = decide(c, pools, at=at)
        assert d.hardware == {"prefill": "A", "decode": "A"} and d.actions == ()
    assert "cheaper on A + B (3/2, 20 of 30 s)" in d.reason
    model.cheapest = ("B", "A")  # another pair is the cheapest now: a new row
    d = decide(c, pools, at=40.0)
    assert "cheaper on B + A (1/2, 0 of 30 s)" in d.reason
    model.cheapest = ("A", "A")  # the chosen pair again: the row ends
    decide(c, pools, at=50.0)
    model.cheapest = ("A", "B")
    for at in (60.0, 70.0, 80.0):
        d = decide(c, pools, at=at)
        assert d.hardware == {"prefill": "A", "decode": "A"}
    d = decide(c, pools, at=90.0)  # cheapest since 60 s: 30 s, 4 decisions
    assert d.hardware == {"prefill": "A", "decode": "B"}
    assert d.actions == (Action("add", "decode", "migrate", "B"),)


def test_a_chosen_pair_that_cannot_meet_the_slos_is_left_at_once():
    model = PairModel({("A", "A"): (4, 1, False), ("A", "B"): (2, 2, True)}, ("A", "B"))
    c = mixed(model, scale_down_after=5)
    d = decide(c, {"prefill": {"A": 2}, "decode": {"A": 1}})
    assert d.hardware == {"prefill": "A", "decode": "B"}
    assert d.actions == (Action("add", "decode", "migrate", "B"),) * 2
    assert "cannot meet" in d.reason


def test_at_max_gpus_a_migration_drains_one_old_instance_before_each_new_one():
    """Every type's devices count against max_gpus: with no room for the new type, one old
    instance drains first; the new type then grows into the room it left."""
    model = PairModel({("A", "A"): (2, 2, False), ("B", "A"): (2, 2, True)}, ("B", "A"))
    c = mixed(model, max_gpus=4)
    held = {"prefill": {"A": 2}, "decode": {"A": 2}}
    d = decide(c, held, at=10.0)
    assert d.actions == (Action("remove", "prefill", "migrate", "A"),)
    assert d.target == {"prefill": 1, "decode": 2} and "no room" in d.reason
    d = decide(c, {"prefill": {"A": 1}, "decode": {"A": 2}}, at=20.0)
    assert d.actions == (Action("add", "prefill", "migrate", "B"),)  # fits: 1 A + 1 B + 2
    d = decide(c, {"prefill": {"A": 1, "B": 1}, "decode": {"A": 2}}, at=30.0)
    assert d.actions == (Action("remove", "prefill", "migrate", "A"),)  # no room for more B
    d = decide(c, {"prefill": {"B": 1}, "decode": {"A": 2}}, at=40.0)
    assert d.actions == (Action("add", "prefill", "forecast", "B"),)  # (migrated: growing)
    # Devices per instance differ by role (a TP2 decode instance counts 2). The last serving
    # instance of a role never drains: its replacement comes first, past max_gpus if it must
    # (one instance per role is the least there is, as without mixed pools).
    c = mixed(PairModel({("A", "A"): (1, 1, False), ("A", "B"): (1, 1, True)}, ("A", "B")),
              max_gpus=4)  # fmt: skip
    c.gpus = {"prefill": 1, "decode": 2}
    d = decide(c, {"prefill": {"A": 1}, "decode": {"A": 1}})
    assert d.actions == (Action("add", "decode", "migrate", "B"),)
    d = decide(c, {"prefill": {"A": 1}, "decode": {"A": 1, "B": 1}}, at=20.0)
    assert d.actions == (Action("remove", "decode", "migrate", "A"),)
    assert d.target == {"prefill": 1, "decode": 1}


def test_flips_only_between_instances_of_the_type_both_roles_chose():
    same = PairModel({("A", "A"): (1, 3, True)}, ("A", "A"))
    c = mixed(same, scale_down_after=1)
    d = decide(c, {"prefill": {"A": 3}, "decode": {"A": 1}})
    assert d.actions == (Action("flip", "decode", "forecast", "A"),
                         Action("add", "decode", "forecast", "A"))  # fmt: skip
    apart = PairModel({("A", "B"): (1, 3, True)}, ("A", "B"))
    c = mixed(apart, scale_down_after=1)
    d = decide(c, {"prefill": {"A": 3}, "decode": {"B": 1}})
    expected = [Action("add", "decode", "forecast", "B")] * 2
    expected.append(Action("remove", "prefill", "slack", "A"))
    assert sorted(d.actions, key=str) == sorted(expected, key=str)
    assert not any(a.kind == "flip" for a in d.actions)
