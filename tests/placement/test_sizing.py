"""Online pool sizing against the planner's simulator: the sizes it returns meet the target on
an independent sample and one instance fewer does not, sizes grow with the rate, cheap mixed
hardware is found, bad input is refused. Pure Python, no Ray; no timing asserts (the decision
time is measured in docs/benchmarks.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cluster.placement.hardware import load_catalog
from cluster.placement.simulator import Requests, simulate_disaggregated
from cluster.placement.sizing import (
    LoadWindow,
    choose_types,
    instance_type,
    size_pools,
)
from cluster.placement.workload import WORKLOADS, unit_arrivals

TOLERANCE = 0.04  # attainment: a 2000-request sample against an independent 1500-request one


def _window(workload: str, rate: float, n: int = 400, seed: int = 11) -> LoadWindow:
    inputs, outputs = WORKLOADS[workload].sample(n, seed=seed)
    return LoadWindow(rate, inputs.tolist(), outputs.tolist())


def _simulated(window, sizes, prefill, decode, ttft_s, tpot_s, n_p=None, n_d=None) -> float:
    """Joint attainment in the planner's simulator on fresh requests (another seed)."""
    rng = np.random.default_rng(99)
    lens = np.asarray(window.input_lens)[rng.integers(0, len(window.input_lens), 1500)]
    outs = np.asarray(window.output_lens)[rng.integers(0, len(window.output_lens), 1500)]
    reqs = Requests(unit_arrivals(1500, seed=99), lens, outs).at_rate(window.rate)
    n_p = sizes.num_prefill if n_p is None else n_p
    n_d = sizes.num_decode if n_d is None else n_d
    res = simulate_disaggregated(reqs, [prefill.spec] * n_p, [decode.spec] * n_d, lens * 0.0)
    return res.attainment(ttft_s, tpot_s)


CASES = [  # model, hardware, TP, workload, rate, TTFT, TPOT
    ("OPT-13B", "A100-80GB", 1, "chatbot", 12.0, 0.5, 0.05),
    ("OPT-13B", "A100-80GB", 2, "code", 300.0, 0.15, 0.02),
    ("Llama-3-8B", "A100-80GB", 1, "summarization", 16.0, 1.5, 0.03),
]


@pytest.mark.parametrize("model,hardware,tp,workload,rate,ttft_s,tpot_s", CASES)
def test_sizes_meet_the_target_in_the_simulator_and_one_fewer_does_not(
    model, hardware, tp, workload, rate, ttft_s, tpot_s
):
    kind = instance_type(model, hardware, tp, 1)
    window = _window(workload, rate)
    sizes = size_pools(window, kind, kind, ttft_s, tpot_s)
    assert sizes.meets_target and sizes.attainment >= 0.9, sizes.reason
    assert sizes.num_prefill + sizes.num_decode > 2  # the case is not trivially idle
    assert _simulated(window, sizes, kind, kind, ttft_s, tpot_s) >= 0.9 - TOLERANCE
    for n_p, n_d in ((sizes.num_prefill - 1, None), (None, sizes.num_decode - 1)):
        if (n_p if n_p is not None else n_d) >= 1:
            fewer = _simulated(window, sizes, kind, kind, ttft_s, tpot_s, n_p, n_d)
            assert fewer < 0.9 + TOLERANCE, (n_p, n_d, fewer, sizes.reason)


def test_sizes_grow_with_the_rate():
    kind = instance_type("OPT-13B", "A100-80GB", 1, 1)
    sizes = [size_pools(_window("chatbot", rate), kind, kind, 0.5, 0.05)
             for rate in (0.5, 4.0, 8.0, 16.0, 24.0)]  # fmt: skip
    for smaller, larger in zip(sizes, sizes[1:], strict=False):
        assert larger.num_prefill >= smaller.num_prefill
        assert larger.num_decode >= smaller.num_decode
    assert sizes[-1].num_prefill + sizes[-1].num_decode > sizes[0].num_prefill + 2


def test_idle_window_needs_one_of_each_and_is_deterministic():
    kind = instance_type("Llama-3-8B", "A100-80GB", 1, 1)
    idle = size_pools(_window("code", 0.0), kind, kind, 0.5, 0.05)
    assert (idle.num_prefill, idle.num_decode, idle.attainment) == (1, 1, 1.0)
    a = size_pools(_window("chatbot", 10.0), kind, kind, 0.3, 0.04, seed=3)
    b = size_pools(_window("chatbot", 10.0), kind, kind, 0.3, 0.04, seed=3)
    assert a == b


def test_unreachable_slo_says_so_and_stops_where_attainment_stops_improving():
    kind = instance_type("OPT-13B", "A100-80GB", 1, 1)
    sizes = size_pools(_window("summarization", 2.0), kind, kind, 0.01, 0.05, max_instances=16)
    assert not sizes.meets_target
    assert sizes.reason.startswith("unreachable (prefill)")
    assert sizes.num_prefill < 16  # more instances do not shorten one prompt's prefill


def test_reason_names_what_bound_each_pool():
    kind = instance_type("OPT-13B", "A100-80GB", 1, 1)
    sizes = size_pools(_window("chatbot", 12.0), kind, kind, 0.5, 0.05)
    assert "prefill: P90 TTFT" in sizes.reason and "decode: P90 TPOT" in sizes.reason
    assert f"at {sizes.num_prefill};" in sizes.reason


def test_choose_types_picks_the_cheapest_pair_like_brute_force():
    catalog = load_catalog()
    shapes = (("A100-80GB", 1), ("H100-80GB", 1), ("L40S", 1), ("A100-80GB", 2))
    kinds = [instance_type("Llama-3-8B", hw, tp, 1, catalog) for hw, tp in shapes]
    window = _window("chatbot", 20.0)
    best = choose_types(window, kinds, kinds, 0.5, 0.05)
    brute = [size_pools(window, p, d, 0.5, 0.05) for p in kinds for d in kinds]
    cheapest = min(s.cost_per_hour() for s in brute if s.meets_target)
    assert best.meets_target and best.cost_per_hour() == pytest.approx(cheapest)


def test_instance_type_takes_the_planner_figures():
    kind = instance_type("OPT-66B", "A100-80GB", 4, 1)
    assert kind.num_gpus == 4 and kind.kv_capacity_tokens > 0
    assert kind.max_batch_tokens >= 512 and kind.cost_per_gpu_hour > 0
    with pytest.raises(ValueError, match="does not divide"):
        instance_type("OPT-66B", "A100-80GB", 5, 1)
    with pytest.raises(ValueError, match="weights need"):
        instance_type("OPT-66B", "A100-40GB", 1, 1)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rate": -1.0}, "rate must be"),
        ({"rate": float("nan")}, "rate must be"),
        ({"input_lens": []}, "input_lens is empty"),
        ({"output_lens": [3, 0]}, "output_lens must all be >= 1"),
    ],
)
def test_bad_windows_are_refused(change, message):
    fields = {"rate": 1.0, "input_lens": [10, 20], "output_lens": [5, 6], **change}
    with pytest.raises(ValueError, match=message):
        LoadWindow(**fields)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ttft_s": 0.0}, "ttft_s and tpot_s must be > 0"),
        ({"tpot_s": -1.0}, "ttft_s and tpot_s must be > 0"),
        ({"attainment": 1.5}, "attainment must be in"),
        ({"max_instances": 0}, "max_instances must be >= 1"),
        ({"transfer_s_per_token": -1e-6}, "transfer_s_per_token"),
    ],
)
def test_bad_targets_are_refused(kwargs, message):
    kind = instance_type("Llama-3-8B", "A100-80GB", 1, 1)
    args = {"ttft_s": 0.5, "tpot_s": 0.05, **kwargs}
    with pytest.raises(ValueError, match=message):
        size_pools(_window("code", 1.0), kind, kind, **args)
    with pytest.raises(ValueError, match="num_gpus must be >= 1"):
        dataclasses.replace(kind, num_gpus=0)
