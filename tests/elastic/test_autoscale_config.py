"""`cluster serve --autoscale` and the config's autoscale section."""

from __future__ import annotations

import argparse

import pytest

from cluster.elastic.settings import AutoscaleSettings
from cluster.launch import DeploymentConfig
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
