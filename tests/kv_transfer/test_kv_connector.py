"""Prefill engine → KV pulled over real NIXL (DRAM, UCX) → decode engine, each in its own
Ray actor process: same tokens as colocated, every block freed on both sides, and a prefill
side that dies or a lease that expires ends the request with a TransferError in bounded
time, never a hang and never a leak."""

from __future__ import annotations

import os
import time

import psutil
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

from cluster.engine.config import CacheConfig, EngineConfig  # noqa: E402
from cluster.engine.llm_engine import LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 40)), list(range(50, 53)), list(range(100, 180))]


class EngineHost:
    """A test stand-in for the worker issue's prefill/decode deployments: an engine in one
    role plus its end of the connector, behind Ray methods."""

    def __init__(self, model_dir: str, role: str, lease_s: float = 30.0):
        from cluster.kv_transfer.agent import NixlKVAgent
        from cluster.kv_transfer.connector import KVReceiver, KVSender

        cache = CacheConfig(num_blocks=64)
        self.engine = LLMEngine(EngineConfig(model=model_dir, role=role, cache=cache))
        self.agent = NixlKVAgent(f"{role}-{time.monotonic_ns()}", self.engine.runner.kv_cache)
        self.sender = KVSender(self.engine, self.agent, lease_s=lease_s, grace_s=0.2)
        self.receiver = KVReceiver(self.engine, self.agent)

    def info(self):
        return self.agent.info()

    def prefill(self, request_id: str, prompt: list[int]):
        self.engine.add_request(request_id, prompt, GREEDY)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    return self.sender.offer(out)

    def renew(self, request_id: str):
        return self.sender.renew(request_id)

    def poll(self) -> list[str]:
        return self.sender.poll()

    def decode(self, handle, info, request_id, prompt, renew, deadline_s=3.0):
        from cluster.kv_transfer.connector import TransferError

        if self.receiver.needs_info(handle):
            self.receiver.connect(info)
        try:
            stream = [self.receiver.pull(handle, request_id, prompt, GREEDY, renew, deadline_s)]
        except TransferError as e:
            return type(e).__name__
        while not stream[-1].finished:
            stream += [o for o in self.engine.step() if o.request_id == request_id]
        return stream[-1].token_ids

    def pid(self) -> int:
        return os.getpid()

    def check_clean(self) -> tuple[int, int]:
        self.engine.check_integrity()
        return self.engine.num_free_blocks, self.engine.block_manager.num_blocks

    def metric(self, name: str, **labels) -> float:
        side = self.receiver if self.engine.role == "decode" else self.sender
        return side.metrics.value(name, **labels)


@pytest.fixture(scope="module")
def hosts(ray_cluster, tiny_model_dir):
    actor = ray.remote(num_cpus=0)(EngineHost)
    prefill = actor.remote(str(tiny_model_dir), "prefill")
    decode = actor.remote(str(tiny_model_dir), "decode")
    return prefill, decode


def renew_via(actor):
    def renew(request_id: str):
        try:
            return ray.get(actor.renew.remote(request_id), timeout=2.0)
        except Exception:  # the holder is gone: no lease
            return None

    return renew


def _exited(pid: int) -> bool:
    """The process is gone (a zombie too: its memory is unmapped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_all_free(*actors):
    for actor in actors:
        num_free, num_blocks = ray.get(actor.check_clean.remote())
        assert num_free == num_blocks


def test_disaggregated_equals_colocated(hosts, tiny_model_dir):
    prefill, decode = hosts
    expected = [
        o.token_ids
        for o in LLMEngine(EngineConfig(model=str(tiny_model_dir))).generate(PROMPTS, GREEDY)
    ]
    info = ray.get(prefill.info.remote())
    got = []
    for i, prompt in enumerate(PROMPTS):
        handle = ray.get(prefill.prefill.remote(f"p{i}", prompt))
        got.append(ray.get(decode.decode.remote(handle, info, f"d{i}", prompt, renew_via(prefill))))
    assert got == expected
    freed: list[str] = []

    def all_freed() -> bool:
        freed.extend(ray.get(prefill.poll.remote()))  # notifications free the pinned blocks
        return len(freed) >= len(PROMPTS)

    wait_until(all_freed, timeout_s=5, interval_s=0.01, message=lambda: f"freed {freed}")
    assert sorted(freed) == ["p0", "p1", "p2"]
    assert ray.get(decode.metric.remote("vllm:nixl_xfer_time_seconds_count")) == 3
    assert ray.get(decode.metric.remote("vllm:nixl_bytes_transferred_sum")) > 0
    assert_all_free(prefill, decode)


def test_expired_lease_is_never_read(ray_cluster, tiny_model_dir):
    actor = ray.remote(num_cpus=0)(EngineHost)
    prefill = actor.remote(str(tiny_model_dir), "prefill", lease_s=0.3)
    decode = actor.remote(str(tiny_model_dir), "decode")
    handle = ray.get(prefill.prefill.remote("p", PROMPTS[0]))
    # The lease (0.3 s) and its grace (0.2 s) run out: freed, may be reused.
    assert wait_until(lambda: ray.get(prefill.poll.remote()), timeout_s=10) == ["p"]
    info = ray.get(prefill.info.remote())
    got = ray.get(decode.decode.remote(handle, info, "d", PROMPTS[0], renew_via(prefill)))
    assert got == "LeaseExpired"
    assert ray.get(prefill.metric.remote("vllm:nixl_num_kv_expired_reqs_total")) == 1
    assert ray.get(prefill.poll.remote()) == []  # nothing freed twice, no late notif effect
    assert_all_free(prefill, decode)


def test_prefill_killed_mid_handoff_ends_in_error_without_leaks(ray_cluster, tiny_model_dir):
    actor = ray.remote(num_cpus=0, max_restarts=0)(EngineHost)
    prefill = actor.remote(str(tiny_model_dir), "prefill")
    decode = actor.remote(str(tiny_model_dir), "decode")
    info = ray.get(prefill.info.remote())
    handle = ray.get(prefill.prefill.remote("p", PROMPTS[2]))
    pid = ray.get(prefill.pid.remote())

    def renew_then_kill(request_id: str):
        remaining = ray.get(prefill.renew.remote(request_id))
        ray.kill(prefill, no_restart=True)  # dies after granting the lease, before the READ
        wait_until(lambda: _exited(pid), timeout_s=10)
        return remaining

    # (the transfer deadline is 2 s; the 30 s get only keeps a hang from stalling the suite)
    got = ray.get(
        decode.decode.remote(handle, info, "d", PROMPTS[2], renew_then_kill, 2.0), timeout=30
    )
    assert got in ("RemoteTransferError", "TransferTimeout")
    failures = [
        ray.get(decode.metric.remote("vllm:nixl_num_failed_transfers_total", reason=r))
        for r in ("remote_error", "timeout")
    ]
    assert sum(failures) == 1
    assert_all_free(decode)


def test_registry_in_ray_and_restart_detection(hosts):
    from cluster.kv_transfer.connector import agent_epoch
    from cluster.workers.registry import RayKVRegistry

    prefill, _ = hosts
    info = ray.get(prefill.info.remote())
    registry = RayKVRegistry()
    registry.publish(info)
    assert RayKVRegistry().lookup(info.agent_name) == info  # a second client, same actor
    assert info.agent_name in registry.names()
    with pytest.raises(KeyError, match="no KV agent named 'nobody'"):
        registry.lookup("nobody")
    # A restarted agent publishes new metadata under its name: the epoch in handles changes.
    restarted = type(info)(
        info.agent_name, info.metadata + b"x", info.base_addr, info.num_blocks, info.layout
    )
    registry.publish(restarted)
    assert agent_epoch(registry.lookup(info.agent_name)) != agent_epoch(info)
    registry.remove(info.agent_name)
    assert info.agent_name not in registry.names()


def test_plain_address_fallback(hosts):
    from cluster.kv_transfer.registry import AgentInfoServer, fetch_agent_info

    prefill, _ = hosts
    info = ray.get(prefill.info.remote())
    server = AgentInfoServer(info)
    try:
        assert fetch_agent_info(*server.address) == info
    finally:
        server.close()
    with pytest.raises(ConnectionError, match="no KV agent info at 127.0.0.1"):
        fetch_agent_info(*server.address, timeout_s=1.0)
