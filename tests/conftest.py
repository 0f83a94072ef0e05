"""Shared fixtures: the tiny default model and random-weight checkpoints of each supported
family, written by `transformers` itself so our loader reads real Hugging Face folders."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from cluster.loop_thread import LoopThread  # noqa: F401 - the tests import it from here

# Keep the embedded default out of ~/.cache and never let transformers reach for a hub.
os.environ.setdefault("PD_CLUSTER_CACHE", tempfile.mkdtemp(prefix="pd-cluster-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-linear-rope-tied": (
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True},
    ),
    "mistral": ("MistralConfig", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {}),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cluster.engine.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def write_family_model(family: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """A small random-weight checkpoint of `family` saved with save_pretrained (safetensors),
    with the tiny model's tokenizer beside it."""
    import transformers

    from cluster.engine.tiny import save_random_checkpoint

    class_name, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.05,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **extra,
    )
    if family == "qwen2":
        config.attention_bias = True  # harmless for Qwen2 (q/k/v always biased)
    return save_random_checkpoint(
        config,
        out_dir,
        seed=sum(map(ord, family)),
        tokenizer_dir=tokenizer_dir,
        adjust=_randomize_biases_and_norms,
    )


def _randomize_biases_and_norms(model) -> None:
    """Zero-init biases and unit norms would hide a missing bias or a skipped norm."""
    for name, param in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            param.add_(torch.randn_like(param) * 0.1)


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, tiny_model_dir):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(family)
            cache[family] = write_family_model(family, out, tiny_model_dir)
        return cache[family]

    return make


@contextlib.contextmanager
def served_on_ray(config, num_cpus: int = 2):
    """A deployment config served for a test module: Ray started here, its pools as Ray
    actors, the router's gRPC and HTTP servers on free loopback ports. Yields (loop thread,
    router, gRPC host:port, HTTP base URL); stops everything after."""
    import ray

    from cluster.launch import start_ray
    from cluster.router.grpc_server import start_grpc_server
    from cluster.router.http_server import start_http_server, stop_http_server

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    loop = LoopThread()
    router = loop.run(start_ray(config), timeout_s=300)
    grpc_server, grpc_port = loop.run(start_grpc_server(router, port=0))
    http_server, http_task, http_port = loop.run(start_http_server(router, port=0))
    try:
        yield loop, router, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    finally:
        loop.run(grpc_server.stop(None))
        loop.run(stop_http_server(http_server, http_task))
        loop.run(router.shutdown())
        loop.close()
        ray.shutdown()


def assert_all_blocks_free(loop, instances, timeout_s: float = 10.0) -> None:
    """Every healthy instance's block manager checks itself and holds no block (leases end
    on notifications or expiry, so poll up to timeout_s). An instance restarting after a kill
    is asked again."""
    import time

    from cluster.workers.clients import InstanceLost

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            counts = [
                loop.run(i.client.call("check_integrity", timeout=30), 60)
                for i in instances
                if i.healthy
            ]
        except InstanceLost:
            counts = [(0, 1)]
        if all(free == total for free, total in counts) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(free == total for free, total in counts), counts
