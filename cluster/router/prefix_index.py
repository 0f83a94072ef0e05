"""The router's cluster-wide index of cached prefixes: which instance holds which KV block,
kept from the instances' KV events (engine/kv_events.py), and how much of a prompt each
instance could serve from its cache.

    instance ═ SubscribeKVEvents ═▶ snapshot, then BlockStored / BlockRemoved batches
                                    ─▶ PrefixIndex.apply(instance, batch)
    instance lost, its stream broken ─▶ PrefixIndex.drop(instance): it is forgotten until a
                                        new subscription's snapshot says what it holds

A block hash names its whole prefix, salt included (block_manager.py), so a prompt's blocks
are looked up in order and an instance's overlap is how many leading hashes it holds;
requests with different salts (tenants) never match each other's entries. An entry can be
stale for as long as an event takes to arrive: routing on it costs speed (the engine
recomputes or pulls what it lacks), never correctness, since engines verify every hit.
"""

from __future__ import annotations

from cluster.engine.block_manager import hash_block, root_hash
from cluster.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch


def prompt_hashes(token_ids: list[int], cache_salt: str | None, block_size: int) -> list[bytes]:
    """The chained hashes of the prompt's full blocks an engine could serve from its cache
    (as BlockManager.find_cached_prefix: at least one token is always computed)."""
    num_blocks = (len(token_ids) - 1) // block_size
    hashes, parent = [], root_hash(cache_salt)
    for i in range(num_blocks):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}
        self._held: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        """Distinct blocks cached somewhere in the cluster."""
        return len(self._holders)

    def num_blocks(self, instance_id: str) -> int:
        return len(self._held.get(instance_id, ()))

    def apply(self, instance_id: str, batch: KVEventBatch) -> None:
        held = self._held.setdefault(instance_id, set())
        for event in batch.events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    self._holders.setdefault(h, set()).add(instance_id)
                held.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._remove(h, instance_id)
                held.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.drop(instance_id)
                held = self._held.setdefault(instance_id, set())

    def drop(self, instance_id: str) -> None:
        """Forget everything `instance_id` was known to hold."""
        for h in self._held.pop(instance_id, ()):
            self._remove(h, instance_id)

    def overlap(self, hashes: list[bytes], instance_ids) -> dict[str, int]:
        """Per instance, how many of `hashes` (a prompt's, in order) it holds from the first
        on: the blocks of the prompt it need not compute or receive."""
        matched = dict.fromkeys(instance_ids, 0)
        alive = set(matched)
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for instance_id in alive:
                matched[instance_id] = i + 1
        return matched

    def _remove(self, block_hash: bytes, instance_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is None:
            return
        holders.discard(instance_id)
        if not holders:
            del self._holders[block_hash]
