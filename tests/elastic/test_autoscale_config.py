"""`cluster serve --autoscale` and the config's autoscale section."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from cluster.elastic.autoscaler import _sizer
from cluster.elastic.hardware import pool_hardware
from cluster.elastic.settings import AutoscaleSettings
from cluster.emulate import EmulationSettings, emulate
from cluster.launch import DeploymentConfig, start_local
from cluster.placement import sizing
from cluster.placement.hardware import load_catalog
from cluster.placement.model_spec import load_model_spec
from cluster.serve import add_arguments, config_from_args


def _config(*argv: str) -> DeploymentConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_the_flag_and_its_bounds():
    assert _config().autoscale is None
    config = _config("--autoscale", "--min-gpus", "2", "--max-gpus", "6")
    assert (config.autoscale.min_gpus, config.autoscale.max_gpus) == (2, 6)
    assert config.flips_roles()
    with pytest.raises(ValueError, match="--max-gpus goes with --autoscale"):
        _config("--max-gpus", "6")
    with pytest.raises(ValueError, match="min_gpus <= max_gpus"):
        _config("--autoscale", "--min-gpus", "9", "--max-gpus", "4")


def test_the_config_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("autoscale: {max_gpus: 8, ttft_s: 0.5, flip: false}\n")
    config = _config("--config", str(path))
    assert config.autoscale == AutoscaleSettings(max_gpus=8, ttft_s=0.5, flip=False)
    assert not config.flips_roles()
    path.write_text("autoscale: {max_gpu: 8}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['max_gpu'\] in autoscale"):
        _config("--config", str(path))
    with pytest.raises(ValueError, match="use mode disaggregated"):
        _config("--autoscale", "--mode", "colocated")


def test_flips_need_one_process_instances_with_one_kv_cache():
    config = DeploymentConfig(autoscale=AutoscaleSettings())
    assert config.flips_roles()
    config.decode.engine = {"num_blocks": 64}
    assert not config.flips_roles()  # a flip keeps the KV pool: both roles must agree
    config.decode.engine = {"tensor_parallel_size": 2}
    assert not config.flips_roles()


# -- mixed hardware pools ---------------------------------------------------------------------


def _emulated(hardware: dict | None, **autoscale) -> DeploymentConfig:
    """An emulated deployment (Llama-3-8B on A100-80GB, one device per instance) under
    autoscale with `hardware`."""
    config = DeploymentConfig(autoscale=AutoscaleSettings(hardware=hardware, **autoscale))
    return emulate(config, EmulationSettings("A100-80GB", "llama-3-8b"))


def test_the_hardware_setting_refuses_what_cannot_work():
    for bad, message in (
        ({"prefill": []}, "autoscale.hardware.prefill must be a non-empty list"),
        ({"colocated": ["A100-80GB"]}, r"unknown roles \['colocated'\]"),
        ({"decode": ["L40S", "L40S"]}, "lists a type twice"),
        ({"decode": [3]}, "non-empty list of device type names"),
        (["A100-80GB"], "is a mapping"),
    ):
        with pytest.raises(ValueError, match=message):
            AutoscaleSettings(hardware=bad)
    with pytest.raises(ValueError, match="list those names under autoscale.hardware"):
        AutoscaleSettings(profile={"A100": "a.json"})
    with pytest.raises(ValueError, match=r"no profile for \['H100'\]"):
        AutoscaleSettings(profile={"A100": "a.json"}, hardware={"prefill": ["A100", "H100"]})
    one = AutoscaleSettings(hardware={"decode": "L40S"})  # one name: a list of one
    assert one.hardware_names("decode") == ("L40S",) and one.hardware_names("prefill") == ()


def test_the_section_reads_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "autoscale:\n  hardware: {prefill: [A100-80GB, H100-80GB], decode: [L40S]}\n"
        "  profile: {A100-80GB: a.json, H100-80GB: h.json, L40S: l.json}\n"
    )
    config = _config("--config", str(path))
    assert config.autoscale.hardware == {"prefill": ["A100-80GB", "H100-80GB"],
                                         "decode": ["L40S"]}  # fmt: skip
    assert config.autoscale.profile["L40S"] == "l.json"


def test_emulated_types_are_catalog_names_with_their_prices():
    kinds = pool_hardware(_emulated({"prefill": ["L40S", "A100-80GB"]}))
    assert kinds.is_mixed and kinds.allowed == {"prefill": ("L40S", "A100-80GB"),
                                                "decode": ("A100-80GB",)}  # fmt: skip
    assert kinds.start_type("prefill") == "L40S" and kinds.start_type("decode") == "A100-80GB"
    catalog = load_catalog()
    assert kinds.prices == {"L40S": catalog["L40S"].price_per_hour,
                            "A100-80GB": catalog["A100-80GB"].price_per_hour}  # fmt: skip
    # The sizer's model of a type is the one its emulated instances step at.
    l40s = kinds.kinds["prefill"]["L40S"]
    expected = sizing.instance_type("llama-3-8b", "L40S", 1, 1)
    assert (l40s.name, l40s.kv_capacity_tokens, l40s.cost_per_gpu_hour) == (
        expected.name, expected.kv_capacity_tokens, expected.cost_per_gpu_hour)  # fmt: skip
    assert l40s.latency.decode_time(8, 4096) == expected.latency.decode_time(8, 4096)
    assert l40s.kv_capacity_tokens < kinds.kinds["prefill"]["A100-80GB"].kv_capacity_tokens
    plain = pool_hardware(_emulated(None))
    assert not plain.is_mixed and plain.start_type("prefill") is None
    assert plain.default("decode") == "A100-80GB"  # the config's own, named
    with pytest.raises(ValueError, match=r"unknown hardware \['B300'\].*catalog has"):
        pool_hardware(_emulated({"decode": ["A100-80GB", "B300"]}))


def test_emulated_types_the_model_cannot_take_are_refused():
    config = DeploymentConfig(autoscale=AutoscaleSettings(hardware={"prefill": ["L40S"]}))
    config.engine = {"tensor_parallel_size": 2}
    emulate(config, EmulationSettings("A100-80GB", "llama-3-70b"))
    with pytest.raises(ValueError, match="autoscale.hardware.prefill: .*drop L40S"):
        pool_hardware(config)


def test_real_engines_need_a_profile_per_type_to_mix():
    hardware = {"prefill": ["A100", "H100"], "decode": ["A100"]}
    config = DeploymentConfig(autoscale=AutoscaleSettings(hardware=hardware, profile="one.json"))
    with pytest.raises(ValueError, match="give autoscale.profile as a mapping"):
        pool_hardware(config)
    config.autoscale.profile = None
    with pytest.raises(ValueError, match="needs a fitted profile of each"):
        pool_hardware(config)
    # One type listed: its instances are placed on it; without a profile, no model.
    config.autoscale = AutoscaleSettings(hardware={"prefill": ["H100"], "decode": ["H100"]})
    kinds = pool_hardware(config)
    assert kinds.kinds is None and kinds.start_type("decode") == "H100"
    with pytest.raises(ValueError, match="list it under autoscale.hardware.decode"):
        pool_hardware(DeploymentConfig(autoscale=AutoscaleSettings(
            hardware={"prefill": ["A100"]}, profile={"A100": "a.json"})))  # fmt: skip


def test_nothing_starts_when_the_hardware_is_wrong():
    config = _emulated({"prefill": ["A100-80GB", "no-such-gpu"]})
    with pytest.raises(ValueError, match="no-such-gpu"):
        asyncio.run(start_local(config))


def test_the_mixed_sizer_keeps_the_cheapest_pair_that_meets_the_slos():
    """The sizer the autoscaler builds: without a pair, choose_types' answer over the lists,
    named; with one, that pair's pools."""
    config = _emulated({"prefill": ["A100-80GB", "H100-80GB"], "decode": ["A100-80GB", "L40S"]},
                       max_gpus=16)  # fmt: skip
    kinds = pool_hardware(config)
    size = _sizer(config, config.autoscale, kinds)
    inputs, outputs = [512] * 50, [128] * 50
    best = size(8.0, inputs, outputs)
    window = sizing.LoadWindow(8.0, inputs, outputs)
    s = config.autoscale
    expected = sizing.choose_types(
        window, list(kinds.kinds["prefill"].values()), list(kinds.kinds["decode"].values()),
        s.ttft_s, s.tpot_s, attainment=s.attainment, max_instances=16,
        transfer_s_per_token=_transfer(config),
    )  # fmt: skip
    assert (best.num_prefill, best.num_decode) == (expected.num_prefill, expected.num_decode)
    assert kinds.kinds["prefill"][best.hardware["prefill"]] is expected.prefill_type
    assert kinds.kinds["decode"][best.hardware["decode"]] is expected.decode_type
    assert best.meets_target
    pair = {"prefill": "H100-80GB", "decode": "A100-80GB"}
    at = size(8.0, inputs, outputs, hardware=pair)
    assert at.hardware == pair
    alone = sizing.size_pools(window, kinds.kinds["prefill"]["H100-80GB"],
                              kinds.kinds["decode"]["A100-80GB"], s.ttft_s, s.tpot_s,
                              attainment=s.attainment, max_instances=16,
                              transfer_s_per_token=_transfer(config))  # fmt: skip
    assert (at.num_prefill, at.num_decode) == (alone.num_prefill, alone.num_decode)


def _transfer(config) -> float:
    emulation = config.engine_config("decode").emulation
    return load_model_spec(emulation.model).kv_bytes_per_token / emulation.kv_bandwidth
