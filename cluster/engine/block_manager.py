"""Paged KV block manager: which physical blocks each request owns, ref counts, and the
hash-chained prefix cache. Pure Python (ids and counts); the tensors live in the model runner.

Every block is in exactly one of two states:

    in use   ref_count > 0, listed in the block tables of ref_count requests
    free     ref_count == 0, in `free_queue` (front = evicted first)

A free block may still carry a hash: its KV stays valid and a later request with the same
prefix takes it back (a prefix hit) until allocation evicts it from the queue's front.
Freed blocks join at the back, a request's tail first, so a prefix outlives its tail (LRU).

    block hash h_i = H(h_{i-1} || token ids of block i),  h_{-1} = H(cache_salt or "")

A hit is verified against the block's stored parent hash and token ids, so a hash collision
can never hand out wrong KV; different salts never share a block.

With `events` set (a kv_events.KVEventLog), every block published to the cache and every
cached block evicted is recorded there, for the router's prefix index.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from cluster.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventLog
from cluster.engine.request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    parent_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def hash_block(parent_hash: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    digest = hashlib.blake2b(parent_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def root_hash(cache_salt: str | None) -> bytes:
    # surrogatepass: the engine refuses a salt that is not UTF-8, but a hash must never raise
    salt = (cache_salt or "").encode("utf-8", "surrogatepass")
    return hashlib.blake2b(salt, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[bytes, int] = {}
        self.req_block_ids: dict[str, list[int]] = {}
        self.events: KVEventLog | None = None  # set: record cache events (kv_events.py)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_block_ids.get(request_id, [])

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -----------------------------------------------------------------------

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding a verified prefix of the request's tokens. At least one token is
        left uncached so the model has something to run and sample from."""
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        parent = root_hash(request.cache_salt)
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None or not self._verify(block_id, parent, request, i):
                break
            hits.append(block_id)
            parent = block_hash
        return hits

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Publish the request's blocks that are now full of computed KV."""
        if not self.enable_prefix_caching:
            return
        self._extend_hashes(request)
        block_ids = self.req_block_ids[request.request_id]
        num_full = min(num_computed_tokens // self.block_size, len(request.block_hashes))
        stored: list[int] = []  # indexes of the blocks published now
        for i in range(num_full):
            block = self.blocks[block_ids[i]]
            block_hash = request.block_hashes[i]
            if block.hash is not None or block_hash in self.cached_block_ids:
                continue  # already published, or an identical block was first
            start = i * self.block_size
            block.hash = block_hash
            block.parent_hash = request.block_hashes[i - 1] if i else root_hash(request.cache_salt)
            block.token_ids = tuple(request.all_token_ids[start : start + self.block_size])
            self.cached_block_ids[block_hash] = block.block_id
            stored.append(i)
        if stored and self.events is not None:
            self._record_stored(request, stored)

    def _record_stored(self, request: Request, indexes: list[int]) -> None:
        """One BlockStored per run of consecutive blocks, each with its run's parent."""
        hashes, start = request.block_hashes, 0
        for k in range(1, len(indexes) + 1):
            if k == len(indexes) or indexes[k] != indexes[k - 1] + 1:
                first = indexes[start]
                parent = hashes[first - 1] if first else None
                self.events.append(BlockStored([hashes[i] for i in indexes[start:k]], parent))
                start = k

    def _extend_hashes(self, request: Request) -> None:
        hashes = request.block_hashes
        num_full = request.num_tokens // self.block_size
        parent = hashes[-1] if hashes else root_hash(request.cache_salt)
        for i in range(len(hashes), num_full):
            start = i * self.block_size
            parent = hash_block(parent, request.all_token_ids[start : start + self.block_size])
            hashes.append(parent)

    def _verify(self, block_id: int, parent: bytes, request: Request, index: int) -> bool:
        block = self.blocks[block_id]
        start = index * self.block_size
        expected = request.all_token_ids[start : start + self.block_size]
        return block.parent_hash == parent and list(block.token_ids) == expected

    # -- allocation -------------------------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int, cached_ids: list[int]) -> bool:
        return self._num_free_needed(request, num_new_tokens, cached_ids) <= self.num_free_blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_ids: list[int] | None = None
    ) -> bool:
        """Grow the request's block table to hold its computed tokens, `cached_ids` (prefix
        hits, first admission only) and `num_new_tokens` more. All or nothing."""
        cached_ids = cached_ids or []
        if not self.can_allocate(request, num_new_tokens, cached_ids):
            return False
        table = self.req_block_ids.setdefault(request.request_id, [])
        for block_id in cached_ids:
            self._take(block_id)
            table.append(block_id)
        total = request.num_computed_tokens + len(cached_ids) * self.block_size + num_new_tokens
        evicted = []
        for _ in range(self.num_blocks_needed(total) - len(table)):
            block_id = next(iter(self.free_queue))
            if (block_hash := self._evict(block_id)) is not None:
                evicted.append(block_hash)
            self._take(block_id)
            table.append(block_id)
        if evicted and self.events is not None:  # one event for the allocation's evictions
            self.events.append(BlockRemoved(evicted))
        return True

    def free(self, request_id: str) -> None:
        """Drop the request's references; blocks at zero go to the back of the free queue,
        the request's tail first so that its prefix stays cached longest."""
        for block_id in reversed(self.req_block_ids.pop(request_id, [])):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.cached_block_ids.values()):
            self._evict(block_id)  # one AllBlocksCleared, not a removal each
        if self.events is not None:
            self.events.append(AllBlocksCleared())

    def cached_hashes(self) -> list[bytes]:
        """Every block hash in the prefix cache now (a KV-events snapshot)."""
        return list(self.cached_block_ids)

    def _num_free_needed(self, request: Request, num_new_tokens: int, cached_ids: list[int]) -> int:
        table = self.req_block_ids.get(request.request_id, [])
        total = request.num_computed_tokens + len(cached_ids) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_needed(total) - len(table) - len(cached_ids))
        num_revived = sum(1 for b in cached_ids if self.blocks[b].ref_count == 0)
        return num_new_blocks + num_revived

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> bytes | None:
        """Make the block blank; the hash it took out of the prefix cache, if any."""
        block = self.blocks[block_id]
        removed = None
        if block.hash is not None and self.cached_block_ids.get(block.hash) == block_id:
            del self.cached_block_ids[block.hash]
            removed = block.hash
        block.hash, block.parent_hash, block.token_ids = None, None, ()
        return removed

    # -- integrity --------------------------------------------------------------------------

    def check_integrity(self, live_request_ids: set[str] | None = None) -> None:
        """Raise AssertionError if any invariant in the module docstring is broken. With
        `live_request_ids`, also check that no block is held by a request that is gone."""
        refs = [0] * self.num_blocks
        for request_id, table in self.req_block_ids.items():
            assert len(set(table)) == len(table), f"{request_id} lists a block twice"
            for block_id in table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but {refs[block.block_id]} "
                "tables hold it"
            )
            is_free = block.block_id in self.free_queue
            assert is_free == (block.ref_count == 0), f"block {block.block_id} free-queue state"
        for block_hash, block_id in self.cached_block_ids.items():
            assert self.blocks[block_id].hash == block_hash, f"stale cache entry {block_id}"
        if live_request_ids is not None:
            leaked = set(self.req_block_ids) - live_request_ids
            assert not leaked, f"blocks held by finished requests: {sorted(leaked)}"
