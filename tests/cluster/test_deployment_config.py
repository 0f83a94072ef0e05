"""`cluster serve` configuration: YAML and flags into pools, engines and router settings, with
errors that say what to change."""

from __future__ import annotations

import argparse

import pytest

from cluster.launch import DeploymentConfig
from cluster.serve import add_arguments, apply_plan, config_from_args


def parse(*argv: str) -> DeploymentConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults_are_one_prefill_one_decode_on_loopback():
    config = parse()
    assert config.mode == "disaggregated" and config.roles() == ("prefill", "decode")
    assert (config.prefill.num_instances, config.decode.num_instances) == (1, 1)
    assert config.grpc == {"host": "127.0.0.1", "port": 50051}
    assert config.http == {"host": "127.0.0.1", "port": 8000}
    assert config.api_key is None


def test_yaml_pools_engine_overrides_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "mode: disaggregated\n"
        "engine: {block_size: 32, max_num_seqs: 64}\n"
        "prefill: {num_instances: 2, engine: {max_num_batched_tokens: 4096}}\n"
        "transfer: {lease_s: 5}\n"
        "router: {max_queued: 3, failure_policy: fail}\n"
    )
    config = parse("--config", str(path), "--num-decode", "3", "--api-key", "k")
    prefill = config.engine_config("prefill")
    assert prefill.role == "prefill" and prefill.cache.block_size == 32
    assert prefill.scheduler.max_num_batched_tokens == 4096
    assert prefill.scheduler.max_num_seqs == 64
    assert config.engine_config("decode").scheduler.max_num_batched_tokens == 2048
    assert config.decode.num_instances == 3 and config.transfer.lease_s == 5
    settings = config.router_settings()
    assert (settings.max_queued, settings.failure_policy, settings.mode) == (3, "fail", config.mode)
    assert config.api_key == "k"


@pytest.mark.parametrize(
    "data, words",
    [
        ({"modle": "x"}, "unknown config keys ['modle']"),
        ({"engine": {"blok_size": 8}}, "unknown engine settings ['blok_size']"),
        ({"prefill": {"num_instances": 0}}, "at least one prefill instance"),
        ({"mode": "both"}, "mode must be disaggregated or colocated"),
        ({"transfer": {"lease": 3}}, "unknown keys ['lease'] in transfer"),
    ],
)
def test_bad_config_says_what_to_change(data, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        DeploymentConfig.from_dict(data)


def test_unknown_router_setting_is_refused():
    with pytest.raises(ValueError, match="unknown router settings"):
        DeploymentConfig(router={"max_inflight": 3}).router_settings()


def test_plan_sets_mode_and_counts():
    config = DeploymentConfig()
    apply_plan(config, {"deployment": {"prefill": {"num_instances": 3}, "decode": {"tp": 1}}})
    assert (config.prefill.num_instances, config.decode.num_instances) == (3, 1)
    assert "tensor_parallel_size" not in config.decode.engine  # TP=1 adds nothing
    apply_plan(config, {"mode": "colocated", "colocated": {"num_instances": 2}})
    assert config.mode == "colocated" and config.colocated.num_instances == 2


def test_plan_takes_each_pools_parallelism():
    """DistServe's shape: prefill TP4, decode TP2 x PP2; each pool's engine gets its own."""
    config = DeploymentConfig()
    apply_plan(config, {"prefill": {"num_instances": 1, "tensor_parallel_size": 4},
                        "decode": {"num_instances": 2, "tp": 2, "pp": 2}})  # fmt: skip
    prefill, decode = config.engine_config("prefill"), config.engine_config("decode")
    assert (prefill.tensor_parallel_size, prefill.pipeline_parallel_size) == (4, 1)
    assert (decode.tensor_parallel_size, decode.pipeline_parallel_size) == (2, 2)
    assert prefill.dist_init_method == decode.dist_init_method == "auto"
    with pytest.raises(ValueError, match="pipeline_parallel_size=0"):
        apply_plan(config, {"colocated": {"pipeline_parallel_size": 0}})
