"""EngineWorker.kv_events(): a worker's prefix-cache event stream, on a ColocatedWorker
built in this process (its engine thread and the pump on this event loop; no data plane, no
Ray). Each subscription starts with a snapshot of the cache; later events reach every
subscription; a subscription opened after evictions starts from the cache as it is then."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cluster.engine.config import CacheConfig, EngineConfig
from cluster.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from cluster.engine.sampling_params import SamplingParams
from cluster.router.prefix_index import PrefixIndex, prompt_hashes
from cluster.workers.decode import ColocatedWorker
from cluster.workers.protocol import RequestSpec
from tests.helpers import wait_until_async

pytestmark = pytest.mark.timeout(120)

BS = 4
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
NEXT_S = 10.0  # the longest a batch we wait for may take


class Subscription:
    """One kv_events() stream applied to its own PrefixIndex (as the router does)."""

    def __init__(self, worker: ColocatedWorker, name: str):
        self.stream = worker.kv_events()
        self.name = name
        self.index = PrefixIndex()
        self.batches: list[KVEventBatch] = []

    async def next(self) -> KVEventBatch:
        batch = await asyncio.wait_for(anext(self.stream), NEXT_S)
        self.batches.append(batch)
        self.index.apply(self.name, batch)
        return batch

    async def until_equal(self, hashes: list[bytes]) -> None:
        """Read batches until the index holds exactly `hashes`."""
        while not self.holds(hashes):
            await self.next()

    def holds(self, hashes: list[bytes]) -> bool:
        index, name = self.index, self.name
        return index.num_blocks(name) == len(hashes) and all(
            index.overlap([h], [name])[name] == 1 for h in hashes
        )

    def events(self, kind) -> list:
        return [e for b in self.batches[1:] for e in b.events if isinstance(e, kind)]


async def run(worker: ColocatedWorker, request_id: str, prompt: list[int]) -> None:
    chunks = [c async for c in worker.generate(RequestSpec(request_id, prompt, GREEDY))]
    assert chunks[-1].finished


def cached(worker: ColocatedWorker) -> list[bytes]:
    return worker.engine.call(worker.llm.block_manager.cached_hashes)


def test_subscriptions_snapshot_then_follow(tiny_model_dir):
    cache = CacheConfig(block_size=BS, num_blocks=16)
    prompts = [list(range(10 + 20 * i, 10 + 20 * i + 17)) for i in range(8)]  # 5 blocks each

    async def main() -> None:
        worker = ColocatedWorker("c0", EngineConfig(model=str(tiny_model_dir), cache=cache))
        subs: list[Subscription] = []
        try:
            await run(worker, "r0", prompts[0])  # before any subscription: no log yet
            before = cached(worker)
            assert set(prompt_hashes(prompts[0], None, BS)) <= set(before)
            subs = [Subscription(worker, "a"), Subscription(worker, "b")]
            for sub in subs:
                first = await sub.next()
                assert first.snapshot and first.seq == 0
                assert first.events[0] == AllBlocksCleared()
                assert [type(e) for e in first.events] == [AllBlocksCleared, BlockStored]
                assert sorted(first.events[1].block_hashes) == sorted(before)
                assert sub.holds(before)

            await run(worker, "r1", prompts[1])  # new blocks: announced on both
            now = cached(worker)
            assert set(prompt_hashes(prompts[1], None, BS)) <= set(now)
            for sub in subs:
                await sub.until_equal(now)
                assert all(not b.snapshot for b in sub.batches[1:])
                assert [b.seq for b in sub.batches] == list(range(len(sub.batches)))

            gone = set(prompt_hashes(prompts[0], None, BS))
            for i in range(2, len(prompts)):  # 16 blocks: newer prompts evict r0's
                await run(worker, f"r{i}", prompts[i])
                if not gone & set(cached(worker)):
                    break
            now = cached(worker)
            assert not gone & set(now), "r0's blocks were never evicted: a smaller pool"
            for sub in subs:
                await sub.until_equal(now)
                removed = {h for e in sub.events(BlockRemoved) for h in e.block_hashes}
                assert gone <= removed

            late = Subscription(worker, "late")  # opened after the evictions
            first = await late.next()
            assert first.snapshot and sorted(first.events[1].block_hashes) == sorted(now)
            assert not any(late.holds([h]) for h in gone)
            subs.append(late)

            await run(worker, "r0-again", prompts[0])  # back in the cache: all three hear of it
            now = cached(worker)
            for sub in subs:
                await sub.until_equal(now)
        finally:
            for sub in subs:
                await sub.stream.aclose()
            await worker.shutdown()

    asyncio.run(main())


def test_a_closed_subscription_does_not_stop_the_others(tiny_model_dir):
    cache = CacheConfig(block_size=BS, num_blocks=32)

    async def main() -> None:
        worker = ColocatedWorker("c1", EngineConfig(model=str(tiny_model_dir), cache=cache))
        try:
            gone, kept = Subscription(worker, "gone"), Subscription(worker, "kept")
            for sub in (gone, kept):
                await sub.next()
                assert sub.holds([])  # an empty cache: an empty snapshot
            await gone.stream.aclose()
            await run(worker, "r0", list(range(50, 71)))
            await kept.until_equal(cached(worker))
            assert kept.events(BlockStored)
            again = Subscription(worker, "again")  # a new subscription after one closed
            first = await again.next()
            assert first.snapshot and again.holds(cached(worker))
            await again.stream.aclose()
            await kept.stream.aclose()
        finally:
            await worker.shutdown()

    asyncio.run(main())


def test_prefix_cache_counters_in_metrics(tiny_model_dir):
    """vllm:prefix_cache_queries / _hits and the hit ratio, from the scheduler's counts."""
    cache = CacheConfig(block_size=BS, num_blocks=32)
    prompt = list(range(90, 107))  # 17 tokens: 4 blocks a second run can take from the cache

    async def main() -> None:
        worker = ColocatedWorker("c2", EngineConfig(model=str(tiny_model_dir), cache=cache))
        try:
            await run(worker, "r0", prompt)
            await run(worker, "r1", prompt)
        finally:
            await worker.shutdown()
        labels = {"role": "colocated", "instance": "c2"}
        value = worker.registry.get_sample_value
        assert value("vllm:prefix_cache_queries_total", labels) == 2 * len(prompt)
        assert value("vllm:prefix_cache_hits_total", labels) == 4 * BS
        assert value("pdcluster:prefix_cache_hit_ratio", labels) == 4 * BS / (2 * len(prompt))

    asyncio.run(main())


def test_batch_seq_counts_batches_sent(tiny_model_dir):
    """KVEventBatch.seq is documented as 'batches sent on this subscription, from 0'. An
    event recorded between a subscription's registration and its snapshot is in the
    snapshot, so it is filtered out of the stream; the batch it would have been must not
    use up a seq number."""
    cache = CacheConfig(block_size=BS, num_blocks=32)

    async def main() -> None:
        worker = ColocatedWorker("c3", EngineConfig(model=str(tiny_model_dir), cache=cache))
        bm = worker.llm.block_manager
        holding, go = threading.Event(), threading.Event()

        def hold_then_reset() -> None:  # runs under the engine lock, on a thread
            holding.set()
            go.wait(NEXT_S)
            bm.reset_prefix_cache()  # one event, recorded before b's snapshot is taken

        try:
            await run(worker, "r0", list(range(50, 71)))
            a = Subscription(worker, "a")
            await a.next()  # the log and its pump exist from here on
            holder = threading.Thread(target=worker.engine.call, args=(hold_then_reset,))
            holder.start()
            await asyncio.to_thread(holding.wait, NEXT_S)
            b = Subscription(worker, "b")
            b_first = asyncio.ensure_future(b.next())
            # (private: the only sign that b is registered while its snapshot waits)
            await wait_until_async(lambda: len(worker._kv_subscribers) == 2)
            go.set()
            first = await b_first
            assert first.snapshot and first.events[1].block_hashes == []
            b_second = asyncio.ensure_future(b.next())
            assert (await a.next()).events == [AllBlocksCleared()]  # the pump has run
            await run(worker, "r1", list(range(150, 171)))
            second = await b_second
            assert second.events and all(isinstance(e, BlockStored) for e in second.events)
            assert [batch.seq for batch in b.batches] == [0, 1]
            await asyncio.to_thread(holder.join, NEXT_S)
            await a.stream.aclose()
            await b.stream.aclose()
        finally:
            await worker.shutdown()

    asyncio.run(main())
