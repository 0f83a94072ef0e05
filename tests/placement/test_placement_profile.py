"""`placement profile` on the real engine (tiny model, CPU, quick grid). Timings on a shared
2-core machine are noisy, so only loose sanity is asserted about them."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch

from cluster.placement.latency import fitted_from_profile
from cluster.placement.model_spec import ModelSpec
from cluster.placement.profile import (
    QUICK_GRID,
    _concrete_batches,
    add_parser,
    profile_engine,
    resolve_hardware,
)

TOP_LEVEL_KEYS = {
    "version", "hardware", "device", "model", "dtype", "tp", "pp", "block_size", "created",
    "prefill", "decode", "fit",
}  # fmt: skip


@pytest.fixture(scope="module")
def profile() -> dict:
    return profile_engine(quick=True)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="placement")
    add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_schema(profile):
    assert set(profile) == TOP_LEVEL_KEYS
    assert profile["version"] == 1
    assert (profile["hardware"], profile["device"]) == ("CPU", "cpu")
    assert profile["dtype"] == "float32"
    assert (profile["tp"], profile["pp"], profile["block_size"]) == (1, 1, 16)
    spec = ModelSpec.from_dict(profile["model"])
    assert (spec.num_layers, spec.hidden_size, spec.dtype) == (4, 128, "float32")
    assert json.loads(json.dumps(profile)) == profile


def test_rows(profile):
    assert len(profile["prefill"]) == len(QUICK_GRID.prefill)
    assert len(profile["decode"]) == len(QUICK_GRID.decode)
    for row in profile["prefill"]:
        assert row["input_lens"] and all(n > 0 for n in row["input_lens"])
        assert row["time_s"] > 0
    for row in profile["decode"]:
        assert row["batch_size"] >= 1
        assert row["context_len_sum"] > row["batch_size"]
        assert row["time_s"] > 0


def test_times_grow_with_work(profile):
    def prefill_tokens(row):
        return sum(row["input_lens"])

    smallest = min(profile["prefill"], key=prefill_tokens)
    largest = max(profile["prefill"], key=prefill_tokens)
    assert largest["time_s"] > smallest["time_s"]
    lightest = min(profile["decode"], key=lambda r: r["context_len_sum"])
    heaviest = max(profile["decode"], key=lambda r: r["context_len_sum"])
    assert heaviest["time_s"] > lightest["time_s"]


def test_fit(profile):
    for stage in ("prefill", "decode"):
        fit = profile["fit"][stage]
        assert len(fit["coefficients"]) == (4 if stage == "prefill" else 3)
        assert all(c >= 0 for c in fit["coefficients"])
        # Seen on the tiny model: mean hold-out error 0.12-0.20 (prefill), 0.03-0.22 (decode).
        assert math.isfinite(fit["holdout_mean_rel_error"])
        assert fit["holdout_mean_rel_error"] < 0.5
    latency = fitted_from_profile(profile)
    assert latency.prefill_time(512, 512**2, 1) > 0
    assert latency.decode_time(8, 8 * 256) > 0


def test_run_writes_file(tmp_path, capsys):
    out = tmp_path / "profile.json"
    args = _parse(["profile", "--quick", "--repeats", "1", "--output", str(out), "--json"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert json.loads(out.read_text()) == json.loads(captured.out)
    assert "hold-out error" in captured.err


def test_run_bad_model(tmp_path, capsys):
    args = _parse(["profile", "--model", str(tmp_path), "--output", str(tmp_path / "p.json")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "config.json" in err
    assert "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        profile_engine(repeats=0)
    with pytest.raises(ValueError, match="unknown hardware"):
        resolve_hardware("no-such-gpu", "cpu")
    assert resolve_hardware("h100-80gb", "cpu") == "H100-80GB"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            profile_engine(device="cuda")


def test_grid_capped_to_model_context():
    prefill, decode = _concrete_batches(QUICK_GRID, limit=100, rng=random.Random(0))
    assert max(max(lens) for lens in prefill + decode) <= 100
    assert len(set(prefill)) == len(prefill)  # (256,) and (512,) both became (100,): kept once
    assert (100,) in prefill and len(prefill) < len(QUICK_GRID.prefill)


def test_a_profile_sizes_pools_for_the_autoscaler(profile, tmp_path):
    """`autoscale.profile`: the fitted engine, not the roofline, answers the sizing."""
    from cluster.placement.sizing import LoadWindow, profile_type, size_pools

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    kind = profile_type(str(path))
    assert kind.num_gpus == 1 and "profiled" in kind.name
    prompt = kind.latency.prefill_time(256, 256**2, 1)
    step = kind.latency.decode_time(4, 4 * 300)
    window = LoadWindow(0.5 / prompt, [256] * 50, [32] * 50)  # half of one instance's prompts
    sizes = size_pools(window, kind, kind, ttft_s=20 * prompt, tpot_s=10 * step)
    assert sizes.num_prefill >= 1 and sizes.num_decode >= 1 and sizes.meets_target
    busier = size_pools(LoadWindow(8 * window.rate, [256] * 50, [32] * 50), kind, kind,
                        ttft_s=20 * prompt, tpot_s=10 * step)  # fmt: skip
    assert busier.num_prefill > sizes.num_prefill
