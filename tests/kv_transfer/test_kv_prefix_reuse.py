"""A decode instance that served turn 1 of a conversation reuses its cached prefix for turn 2:
it reserves only the blocks past it, pulls only the matching tail of the prefill's blocks
(whole pulls and layer-wise ones), and continues with the colocated engine's greedy output;
every block is freed on both sides.

The NIXL tests run both agents in this process (real NIXL/UCX over DRAM, no Ray): what they
check is which blocks a pull names and what lands in them, not the transport between
processes, which tests/kv_transfer/test_kv_connector.py covers."""

from __future__ import annotations

import random
import time

import pytest
import torch

from cluster.engine.config import CacheConfig, EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.router.prefix_index import prompt_hashes
from tests.helpers import wait_until

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
NUM_BLOCKS = 64

_rng = random.Random(7)
TURN1 = [_rng.randrange(3, 500) for _ in range(37)]
NEW_TOKENS = [[_rng.randrange(3, 500) for _ in range(10)] for _ in range(2)]


def engine(model_dir, role: str) -> LLMEngine:
    cache = CacheConfig(num_blocks=NUM_BLOCKS)  # block_size 16
    return LLMEngine(EngineConfig(model=str(model_dir), role=role, cache=cache))


def run_all(engine: LLMEngine, firsts: list) -> list[list[int]]:
    """Step until every request (its first output given) has finished; their token ids."""
    final = {o.request_id: o for o in firsts if o.finished}
    while len(final) < len(firsts):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[o.request_id].token_ids for o in firsts]


def run_to_end(engine: LLMEngine, first) -> list[int]:
    return run_all(engine, [first])[0]


def prefill_by_hand(prefill: LLMEngine, request_id: str, prompt: list[int]):
    """The prompt through a prefill-role engine: its first token, its blocks pinned."""
    prefill.add_request(request_id, prompt, GREEDY)
    while True:
        for out in prefill.step():
            if out.finished:
                assert out.finish_reason == "prefilled"
                return out


def serve_by_hand(prefill: LLMEngine, decode: LLMEngine, request_id: str, prompt: list[int]):
    """One handoff with the KV copied by hand (what NIXL does between processes), only into
    the blocks past the decode side's cached prefix, from the same tail of the prefill's."""
    out = prefill_by_hand(prefill, request_id, prompt)
    table = decode.add_remote_request(request_id, prompt, GREEDY)
    assert table is not None and len(table) == len(out.kv_block_ids)
    num_cached = decode.num_remote_cached_blocks(request_id)
    tail = table[num_cached:]
    remote = out.kv_block_ids[len(out.kv_block_ids) - len(tail) :]
    decode.runner.kv_cache[tail] = prefill.runner.kv_cache[remote]
    prefill.release(out.request_id)
    first = decode.commit_remote(request_id, out.token_ids[0])
    return run_to_end(decode, first), num_cached, table


def assert_clean(*engines: LLMEngine) -> None:
    for e in engines:
        e.check_integrity()
        assert not e.has_unfinished()
        assert e.num_free_blocks == e.block_manager.num_blocks


@pytest.fixture(scope="module")
def colocated(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir)))


def turn2(turn1_output: list[int], new: list[int]) -> list[int]:
    return TURN1 + turn1_output + new


# -- engine level: the KV copied by hand ------------------------------------------------------


def test_decode_reserves_turn_two_past_its_cached_prefix(tiny_model_dir, colocated):
    prefill, decode = engine(tiny_model_dir, "prefill"), engine(tiny_model_dir, "decode")
    out1, num_cached1, _ = serve_by_hand(prefill, decode, "t1", TURN1)
    assert num_cached1 == 0 and out1 == colocated.generate(TURN1, GREEDY)[0].token_ids
    # turn 1 computed 37 + 23 tokens here: 3 full blocks stay cached after it ends
    bs = decode.block_manager.block_size
    cached_before = set(decode.block_manager.cached_hashes())
    assert len(cached_before) == (len(TURN1) + len(out1) - 1) // bs == 3

    prompt = turn2(out1, NEW_TOKENS[0])  # 71 tokens: 5 blocks
    queries, hits = decode.scheduler.num_prefix_query_tokens, decode.scheduler.num_prefix_hit_tokens
    table = decode.add_remote_request("t2", prompt, GREEDY)
    assert len(table) == 5 and decode.num_remote_cached_blocks("t2") == 3
    bm = decode.block_manager
    assert [bm.blocks[b].hash for b in table[:3]] == prompt_hashes(prompt, None, bs)[:3]
    assert all(bm.blocks[b].hash is None for b in table[3:])  # the 2 to be written
    assert decode.scheduler.num_prefix_query_tokens - queries == len(prompt)
    assert decode.scheduler.num_prefix_hit_tokens - hits == 3 * bs

    # aborted while its KV is in flight: the prefix stays cached, the tail goes back unused
    decode.abort("t2")
    assert_clean(decode)
    assert set(bm.cached_hashes()) == cached_before

    out2, num_cached2, _ = serve_by_hand(prefill, decode, "t2", prompt)
    assert num_cached2 == 3
    assert out2 == colocated.generate(prompt, GREEDY)[0].token_ids
    assert_clean(prefill, decode)


def test_two_continuations_share_the_cached_prefix(tiny_model_dir, colocated):
    """Two turn-2 requests with the same history, reserved side by side: the same cached
    blocks head both tables, each gets its own tail, both continue as colocated does."""
    prefill, decode = engine(tiny_model_dir, "prefill"), engine(tiny_model_dir, "decode")
    out1, _, _ = serve_by_hand(prefill, decode, "t1", TURN1)
    prompts = [turn2(out1, new) for new in NEW_TOKENS]
    outs = [prefill_by_hand(prefill, f"p{i}", p) for i, p in enumerate(prompts)]
    tables = [decode.add_remote_request(f"d{i}", p, GREEDY) for i, p in enumerate(prompts)]
    assert tables[0][:3] == tables[1][:3]
    assert not set(tables[0][3:]) & set(tables[1][3:])
    assert all(b.ref_count == 2 for b in (decode.block_manager.blocks[i] for i in tables[0][:3]))
    decode.check_integrity()
    firsts = []
    for i, (out, table) in enumerate(zip(outs, tables, strict=True)):
        num_cached = decode.num_remote_cached_blocks(f"d{i}")
        assert num_cached == 3
        decode.runner.kv_cache[table[3:]] = prefill.runner.kv_cache[out.kv_block_ids[3:]]
        prefill.release(out.request_id)
        firsts.append(decode.commit_remote(f"d{i}", out.token_ids[0]))
    got = run_all(decode, firsts)
    assert got == [o.token_ids for o in colocated.generate(prompts, GREEDY)]
    assert_clean(prefill, decode)


# -- real NIXL: KVSender / KVReceiver ---------------------------------------------------------


class Side:
    """An engine in one role with its NIXL agent (layer-wise descriptors too) and its end
    of the connector."""

    def __init__(self, model_dir, role: str):
        from cluster.kv_transfer.agent import NixlKVAgent
        from cluster.kv_transfer.connector import KVReceiver, KVSender

        self.engine = engine(model_dir, role)
        name = f"{role}-reuse-{time.monotonic_ns()}"
        self.agent = NixlKVAgent(name, self.engine.runner.kv_cache, layerwise=True)
        self.sender = KVSender(self.engine, self.agent, grace_s=0.2)
        self.receiver = KVReceiver(self.engine, self.agent)
        self.kv_cache = self.engine.runner.kv_cache

    def offer(self, request_id: str, prompt: list[int]):
        return self.sender.offer(prefill_by_hand(self.engine, request_id, prompt))

    def pull(self, handle, prefill: Side, request_id: str, prompt: list[int]):
        """reserve + read (as DecodeWorker drives them), checking what lands where, then
        the rest of the request; (output ids, cached blocks, bytes pulled)."""
        receiver = self.receiver
        if receiver.needs_info(handle):
            receiver.connect(prefill.sender.info())
        block_ids = receiver.reserve(handle, request_id, prompt, GREEDY)
        table = self.engine.block_manager.block_ids(request_id)
        num_cached = self.engine.num_remote_cached_blocks(request_id)
        assert block_ids == table[num_cached:]
        prefix = self.kv_cache[table[:num_cached]].clone()
        stats = receiver.read(handle, request_id, block_ids, prefill.sender.renew, 5.0)
        remote = list(handle.block_ids[len(handle.block_ids) - len(block_ids) :])
        assert torch.equal(self.kv_cache[block_ids], prefill.kv_cache[remote])
        assert torch.equal(self.kv_cache[table[:num_cached]], prefix)  # never written
        first = self.engine.commit_remote(request_id, handle.first_token_id, handle.first_logprob)
        return run_to_end(self.engine, first), num_cached, stats.num_bytes

    def close(self) -> None:
        self.agent.close()


@pytest.fixture(scope="module")
def sides(tiny_model_dir):
    pytest.importorskip("nixl")
    made = [Side(tiny_model_dir, "prefill"), Side(tiny_model_dir, "decode")]
    yield made
    for side in made:
        side.close()


def wait_freed(prefill: Side, request_ids: list[str]) -> None:
    freed: list[str] = []

    def all_freed() -> bool:
        freed.extend(prefill.sender.poll())  # the READs' notifications free pinned blocks
        return set(request_ids) <= set(freed)

    wait_until(all_freed, timeout_s=10, interval_s=0.01, message=lambda: f"freed {freed}")


def test_partial_pull_moves_only_the_tail(sides, tiny_model_dir, colocated):
    prefill, decode = sides
    handle = prefill.offer("p1", TURN1)
    out1, num_cached, bytes1 = decode.pull(handle, prefill, "d1", TURN1)
    assert num_cached == 0 and bytes1 == 3 * decode.agent.layout.block_bytes
    assert out1 == colocated.generate(TURN1, GREEDY)[0].token_ids

    prompt = turn2(out1, NEW_TOKENS[0])
    handle = prefill.offer("p2", prompt)
    assert len(handle.block_ids) == 5
    out2, num_cached, partial_bytes = decode.pull(handle, prefill, "d2", prompt)
    assert num_cached == 3
    assert partial_bytes == 2 * decode.agent.layout.block_bytes
    assert out2 == colocated.generate(prompt, GREEDY)[0].token_ids

    # the same prompt pulled whole by a decode engine that never saw turn 1
    cold = Side(tiny_model_dir, "decode")
    try:
        handle = prefill.offer("p3", prompt)
        out3, num_cached, full_bytes = cold.pull(handle, prefill, "d3", prompt)
        assert num_cached == 0 and full_bytes == 5 * cold.agent.layout.block_bytes
        assert partial_bytes < full_bytes
        assert out3 == out2
        wait_freed(prefill, ["p1", "p2", "p3"])
        assert_clean(prefill.engine, decode.engine, cold.engine)
    finally:
        cold.close()
    received = decode.receiver.metrics.value("vllm:nixl_bytes_transferred_sum")
    assert received == bytes1 + partial_bytes


def test_layerwise_pull_reads_the_tail(sides, colocated):
    """LayerPuller with local blocks past a cached prefix: announcements and finish() carry
    the prefill's whole block list; the READs take its tail."""
    from cluster.kv_transfer.layerwise import LayerPuller, announcement
    from cluster.kv_transfer.metrics import KVTransferMetrics

    prefill, decode = sides
    prompt = TURN1 + NEW_TOKENS[1]
    first = prefill.offer("lw1", prompt)  # turn 1 for this prompt's history on the decode
    out1, _, _ = decode.pull(first, prefill, "lw-d1", prompt)
    prompt2 = prompt + out1 + NEW_TOKENS[0]
    handle = prefill.offer("lw2", prompt2)
    block_ids = decode.receiver.reserve(handle, "lw-d2", prompt2, GREEDY)
    num_cached = decode.engine.num_remote_cached_blocks("lw-d2")
    assert num_cached > 0 and len(block_ids) == len(handle.block_ids) - num_cached
    puller = LayerPuller(decode.agent, KVTransferMetrics("decode"))
    puller.expect("lw-d2", block_ids)
    remote_ids = list(handle.block_ids)
    # (the announcement names the prefill's whole table, as LayerAnnouncer sends it)
    puller.on_notifications([(prefill.agent.name, announcement("lw-d2", 0, remote_ids))])
    assert puller.num_early_layers == 1
    state = puller.finish("lw-d2", prefill.agent.name, remote_ids, time.monotonic() + 5.0)
    assert state == "DONE" and puller.num_late_layers == puller.num_layers - 1
    tail = remote_ids[len(remote_ids) - len(block_ids) :]
    assert torch.equal(decode.kv_cache[block_ids], prefill.kv_cache[tail])
    prefill.sender.drop(handle.request_id)  # (no notification was sent by these READs)
    first = decode.engine.commit_remote("lw-d2", handle.first_token_id)
    expected = colocated.generate(prompt2, GREEDY)[0].token_ids
    assert run_to_end(decode.engine, first) == expected
    wait_freed(prefill, ["lw1"])
    assert_clean(prefill.engine, decode.engine)
