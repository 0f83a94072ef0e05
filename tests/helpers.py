"""Plain helpers shared by the test modules (fixtures live in tests/conftest.py): the repo
root, polling (`wait_until`, never a bare sleep), the `transformers` reference, prompt
generators, checkpoints of every supported family, and a deployment served on Ray.

Imports of the cluster, torch and transformers stay inside the functions: conftest imports
this module before it has set the environment they read."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from cluster.loop_thread import LoopThread

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "FAMILY_CONFIGS",
    "REPO_ROOT",
    "LoopThread",
    "Served",
    "assert_all_blocks_free",
    "hf_greedy",
    "random_prompts",
    "ray_router",
    "served_on_ray",
    "token_prompts",
    "wait_healthy",
    "wait_until",
    "wait_until_async",
    "write_family_model",
]


# -- waiting ---------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    message: str | Callable[[], str] = "",
) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail the test
    (AssertionError with `message`, or a callable giving it) after `timeout_s`. The predicate
    is always tried once more at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(text or f"not true within {timeout_s:g} s: {predicate}")
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout_s: float = 10.0,
    interval_s: float = 0.01,
    message: str = "",
) -> T:
    """`wait_until` inside an event loop: the predicate may be a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"not true within {timeout_s:g} s: {predicate}")
        await asyncio.sleep(interval_s)


def wait_healthy(instances, timeout_s: float = 180.0) -> None:
    """Every instance is healthy again (the router's view: a restarted actor answered)."""
    wait_until(
        lambda: all(i.healthy for i in instances),
        timeout_s,
        interval_s=0.2,
        message=lambda: f"not healthy: {[i.instance_id for i in instances if not i.healthy]}",
    )


def assert_all_blocks_free(
    loop: LoopThread, instances, timeout_s: float = 10.0, retry_on: tuple = ()
) -> None:
    """Every healthy instance's block manager checks itself and holds no block (leases end
    on notifications or expiry, so poll up to timeout_s). An instance restarting after a kill
    (InstanceLost, or any of `retry_on`) is asked again."""
    from cluster.workers.clients import InstanceLost

    retry_on = (InstanceLost, *retry_on)
    counts: list = []

    def all_free() -> bool:
        nonlocal counts
        try:
            counts = [
                loop.run(i.client.call("check_integrity", timeout=30), 60)
                for i in instances
                if i.healthy
            ]
        except retry_on as e:
            counts = [f"{type(e).__name__}: {e}"]
            return False
        return all(free == total for free, total in counts)

    wait_until(all_free, timeout_s, interval_s=0.1, message=lambda: f"(free, total): {counts}")


# -- the reference and prompts ---------------------------------------------------------------


def random_prompts(lengths: list[int], seed: int = 0, prefix: list[int] | None = None):
    """One prompt of each length (token ids 3..511), after `prefix` if given."""
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def token_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of 4..89 token ids (3..499), lengths drawn too."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 90))] for _ in range(n)]


def hf_greedy(model_dir, prompts: list[list[int]], max_tokens: int = 20) -> list[list[int]]:
    """The reference: transformers' own generate, one prompt at a time (no padding)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # run every prompt to max_tokens, like ignore_eos
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=2,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


# -- checkpoints of every supported family ---------------------------------------------------

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
    import torch

    for name, param in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            param.add_(torch.randn_like(param) * 0.1)


# -- a deployment served on Ray (the module's `ray_cluster` fixture started Ray) -------------


async def router_token_ids(router, prompt, params, streaming: asyncio.Event | None = None):
    """A request's token ids through the router (in process); `streaming` is set at its first
    chunk."""
    from cluster.router.types import GenerateInput

    ids = []
    async for chunk in router.generate(GenerateInput(prompt=prompt, params=params)):
        ids += chunk.token_ids
        if streaming is not None:
            streaming.set()
    return ids


@contextlib.contextmanager
def ray_router(config, loop: LoopThread | None = None):
    """A deployment config's pools as Ray actors behind a router on a loop thread (its own,
    or `loop`); yields (loop, router) and shuts the router (and its own loop) down after.
    Ray must be running: take the `ray_cluster` fixture."""
    from cluster.launch import start_ray

    own = loop is None
    loop = loop or LoopThread()
    try:
        router = loop.run(start_ray(config), timeout_s=300)
        try:
            yield loop, router
        finally:
            loop.run(router.shutdown())
    finally:
        if own:
            loop.close()


class Served:
    """A deployment served for a test module (`served_on_ray`): the loop thread the router
    runs on, the router, and where its gRPC and HTTP servers listen."""

    def __init__(self, loop: LoopThread, router, grpc_target: str, http_base: str,
                 free_timeout_s: float = 10.0):  # fmt: skip
        self.loop, self.router = loop, router
        self.free_timeout_s = free_timeout_s  # how long blocks may take to be freed
        self.grpc_target = grpc_target  # host:port
        self.http_base = http_base  # http://host:port
        self.http_url = f"{http_base}/v1"  # what an OpenAI client takes

    def instances(self, role: str) -> list:
        return [i for i in self.router.instances if i.role == role]

    def actors(self, role: str) -> list:
        return [i.client.actor for i in self.instances(role)]

    def call(self, instance, method: str, *args, timeout: float = 30.0):
        """A control call (over Ray) of one instance's worker."""
        return self.loop.run(instance.client.call(method, *args, timeout=timeout), 60)

    def arm(self, role: str, point: str, action: str, match="", count=1, skip=0) -> None:
        """Arm a fault point on every instance of a role (cluster/faults.py)."""
        for instance in self.instances(role):
            self.call(instance, "inject_fault", point, action, match, count, skip)

    def hits(self, role: str, point: str) -> int:
        return sum(self.call(i, "fault_hits", point) for i in self.instances(role))

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        wait_healthy(self.router.instances, timeout_s)

    def assert_all_blocks_free(self, timeout_s: float | None = None) -> None:
        timeout_s = self.free_timeout_s if timeout_s is None else timeout_s
        assert_all_blocks_free(self.loop, self.router.instances, timeout_s)


@contextlib.contextmanager
def served_on_ray(config, free_timeout_s: float = 10.0):
    """A deployment config served for a test module: its pools as Ray actors, the router's
    gRPC and HTTP servers on free loopback ports. Yields a `Served` (`free_timeout_s`: its
    assert_all_blocks_free's default wait); stops everything after. Ray must be running:
    take the `ray_cluster` fixture."""
    from cluster.router.grpc_server import start_grpc_server
    from cluster.router.http_server import start_http_server, stop_http_server

    with ray_router(config) as (loop, router):
        grpc_server, grpc_port = loop.run(start_grpc_server(router, port=0))
        try:
            http_server, http_task, http_port = loop.run(start_http_server(router, port=0))
            try:
                yield Served(loop, router, f"127.0.0.1:{grpc_port}",
                             f"http://127.0.0.1:{http_port}", free_timeout_s)  # fmt: skip
            finally:
                loop.run(stop_http_server(http_server, http_task))
        finally:
            loop.run(grpc_server.stop(None))
