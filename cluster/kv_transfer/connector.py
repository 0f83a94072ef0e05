"""The two ends of one KV handoff, glued to an engine: `KVSender` on a prefill instance,
`KVReceiver` on a decode instance. Workers own one of each role; the router carries the
`KVHandle` from one to the other.

    prefill                                      decode
    engine output "prefilled" ─▶ sender.offer() ─ KVHandle ─▶ receiver.pull(handle, renew)
       blocks pinned under a lease                  reserve local blocks
                                   ◀── renew ───    (lease view = before the call + remaining)
                                   ◀══ READ ═════   one descriptor per run of blocks
       sender.poll(): notif ──▶ release  ◀─ notif   commit_remote(first token) ─▶ decode

Failure: a READ that errors, outlives its deadline or its lease view aborts the decode-side
request (its blocks are freed, the READ is cancelled first) and raises a `TransferError`
subclass; the prefill side frees on the notification, or on lease expiry if none comes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.kv_transfer.agent import KVTransferError
from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.lease import LeaseTable
from cluster.kv_transfer.metrics import KVTransferMetrics
from cluster.kv_transfer.reshard import plan_reads


class TransferError(RuntimeError):
    """A KV pull did not complete; the decode side has freed what it had reserved."""

    reason = "error"


class TransferTimeout(TransferError):
    reason = "timeout"


class LeaseExpired(TransferError):
    reason = "lease_expired"


class RemoteTransferError(TransferError):
    reason = "remote_error"


class PrefillUnavailable(RemoteTransferError):
    """The prefill instance of a handoff died or could not be reached."""

    reason = "prefill_lost"


class NoCapacity(TransferError):
    reason = "no_capacity"


@dataclass(slots=True, frozen=True)
class KVHandle:
    """Where a prefilled request's KV is, and what decode needs to continue it."""

    request_id: str  # the prefill instance's id for it (the notification carries it)
    agent_name: str
    agent_epoch: bytes  # changes when the prefill agent restarts: re-fetch its info
    block_ids: tuple[int, ...]
    layout_hash: str
    first_token_id: int
    first_logprob: float | None = None
    lease_s: float = 0.0
    # Every rank's agent of a tensor/pipeline-parallel prefill instance, rank 0 first (its
    # agent_name); empty for a one-rank instance. The decode side re-shards from them.
    rank_agents: tuple[str, ...] = ()


def agent_epoch(info: KVAgentInfo) -> bytes:
    return hashlib.blake2b(info.metadata, digest_size=8).digest()


class KVSender:
    """Prefill side: pins blocks under leases, frees them on notification or expiry."""

    def __init__(
        self,
        engine,
        agent,
        lease_s: float = 30.0,
        grace_s: float = 1.0,
        metrics: KVTransferMetrics | None = None,
    ):
        self.engine = engine
        self.agent = agent
        self.lease_s = lease_s
        self.leases = LeaseTable(grace_s=grace_s)
        self.metrics = metrics or KVTransferMetrics("prefill")
        self._info = agent.info()
        self._epoch = agent_epoch(self._info)
        self.rank_infos = [self._info]  # a parallel instance's worker adds its other ranks'

    def info(self) -> KVAgentInfo:
        return self._info

    def offer(self, out) -> KVHandle:
        """Lease a prefilled request's pinned blocks; the handle goes to a decode instance."""
        self.leases.grant(out.request_id, out.kv_block_ids, self.lease_s)
        return KVHandle(
            request_id=out.request_id,
            agent_name=self._info.agent_name,
            agent_epoch=self._epoch,
            block_ids=tuple(out.kv_block_ids),
            layout_hash=self._info.layout.compat_hash,
            first_token_id=out.token_ids[-1],  # the one sampled here (a resumed request's
            first_logprob=out.logprobs[-1] if out.logprobs else None,  # output precedes it)
            lease_s=self.lease_s,
            rank_agents=tuple(i.agent_name for i in self.rank_infos)
            if len(self.rank_infos) > 1
            else (),
        )

    def renew(self, request_id: str) -> float | None:
        """Remaining lease seconds after renewal, None if it is gone (expired or released)."""
        return self.leases.renew(request_id)

    def poll(self, notifs: list[tuple[str, bytes]] | None = None) -> list[str]:
        """Free blocks of finished pulls (`notifs`, else read from the agent now) and of
        expired leases; return the request ids freed."""
        freed = []
        if notifs is None:
            notifs = self.agent.get_notifications()
        for _, notif in notifs:
            request_id = notif.decode(errors="replace")
            if self.leases.complete(request_id) is None:  # late or unknown: ignored
                self.metrics.unmatched_notification()
                continue
            self.engine.release(request_id)
            freed.append(request_id)
        for request_id in self.leases.expire():
            self.metrics.expired()
            self.engine.release(request_id)
            freed.append(request_id)
        return freed

    def drop(self, request_id: str) -> None:
        """The router gave up on the request before any pull: free its blocks now."""
        if self.leases.complete(request_id) is not None:
            self.engine.release(request_id)


class KVReceiver:
    """Decode side: reserves blocks, pulls, and commits the request to the engine."""

    def __init__(
        self,
        engine,
        agent,
        poll_interval_s: float = 0.0002,
        metrics: KVTransferMetrics | None = None,
    ):
        self.engine = engine
        self.agent = agent
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics or KVTransferMetrics("decode")
        self._faults = getattr(engine, "faults", None)  # cluster/faults.py, when armed
        self._epochs: dict[str, bytes] = {}
        self._stuck: dict[str, object] = {}  # request id -> READ that would not release

    def connect(self, info: KVAgentInfo) -> None:
        """Load a prefill agent's metadata (once per epoch; raises on a layout mismatch)."""
        self.agent.add_remote(info)
        self._epochs[info.agent_name] = agent_epoch(info)

    def needs_info(self, handle: KVHandle) -> bool:
        """True when this receiver has not seen the handle's agent at its current epoch."""
        return self._epochs.get(handle.agent_name) != handle.agent_epoch

    def pull(
        self,
        handle: KVHandle,
        request_id: str,
        prompt_token_ids: list[int],
        params,
        renew: Callable[[str], float | None],
        deadline_s: float = 5.0,
        **request_kwargs,
    ):
        """Pull the prompt's KV and start decoding; returns the first RequestOutput. Raises a
        TransferError subclass within deadline_s (plus one renew call) on any failure, with
        every block it reserved freed."""
        block_ids = self.reserve(handle, request_id, prompt_token_ids, params, **request_kwargs)
        try:
            self.read(handle, request_id, block_ids, renew, deadline_s)
        except TransferError:
            if not self.is_stuck(request_id):  # a stuck READ's blocks wait for reap()
                self.engine.abort(request_id)
            raise
        return self.engine.commit_remote(request_id, handle.first_token_id, handle.first_logprob)

    def reserve(self, handle: KVHandle, request_id: str, prompt_token_ids, params, **kwargs):
        """First phase of pull(), the only one that needs the engine: the local blocks the
        READ will fill (past any prefix this engine has cached: they match the tail of the
        handle's blocks). Raises TransferError (layout) or NoCapacity with nothing
        reserved."""
        return self.reserve_for(handle.layout_hash, handle.agent_name, request_id,
                                prompt_token_ids, params, **kwargs)  # fmt: skip

    def reserve_for(self, layout_hash: str, agent_name: str, request_id: str, prompt_token_ids,
                    params, **kwargs):  # fmt: skip
        """reserve() before any handle exists (layer-wise pulls start during the prefill)."""
        if layout_hash != self.agent.layout.compat_hash:
            self.metrics.failed("layout")
            raise TransferError(f"prefill agent {agent_name!r} has an incompatible layout")
        block_ids = self.engine.add_remote_request(request_id, prompt_token_ids, params, **kwargs)
        if block_ids is None:
            self.metrics.failed(NoCapacity.reason)
            raise NoCapacity("decode instance has no free KV blocks for this prompt now")
        # A prefix already cached here (an earlier turn) is not pulled again: the blocks to
        # write are the tail past it, matched to the same tail of the prefill's blocks.
        return block_ids[self.engine.num_remote_cached_blocks(request_id) :]

    def read(self, handle, request_id: str, block_ids, renew, deadline_s: float) -> PullStats:
        """Second phase: the READ, no engine involved (run it off the engine's thread). On a
        TransferError the caller aborts the request in the engine unless is_stuck()."""
        try:
            return self._read(handle, request_id, block_ids, renew, deadline_s)
        except TransferError as e:
            self.metrics.failed(e.reason)
            raise

    def is_stuck(self, request_id: str) -> bool:
        return request_id in self._stuck

    @staticmethod
    def _window(handle: KVHandle, block_ids, renew, deadline_s: float):
        """(monotonic time a pull must be done by, the TransferError class for missing it):
        renew the lease first; our view of it ends `remaining` after we asked, never later
        than the holder's, and never after the deadline."""
        if not 0 < len(block_ids) <= len(handle.block_ids):
            raise TransferError(f"{len(handle.block_ids)} remote blocks for {len(block_ids)}")
        asked = time.monotonic()
        remaining = renew(handle.request_id)
        if remaining is None or remaining <= 0:  # never post a READ past the lease
            raise LeaseExpired(f"lease on {handle.request_id!r} expired before the pull")
        until = min(asked + remaining, time.monotonic() + deadline_s)
        return until, LeaseExpired if until == asked + remaining else TransferTimeout

    def _read(self, handle, request_id, block_ids, renew, deadline_s) -> PullStats:
        until, late = self._window(handle, block_ids, renew, deadline_s)
        start = time.monotonic()
        notif = handle.request_id.encode()
        if self._faults is not None and self._faults.hit("kv.notify", request_id):
            notif = b"~dropped"  # a lost notification: the prefill frees on lease expiry
        try:
            xfer = self.agent.read_blocks(
                handle.agent_name, remote_tail(handle, block_ids), block_ids, notif
            )
        except KVTransferError as e:  # e.g. the remote disconnected: nothing was posted
            raise RemoteTransferError(str(e)) from e
        posted = time.monotonic()
        try:
            if self._faults is not None:
                self._faults.hit("decode.read", request_id)  # (a sleep: a READ slow to land)
            state = self._wait(xfer, until)
        finally:
            self._release(xfer, request_id)
        if state == "ERR":
            raise RemoteTransferError(f"READ from {handle.agent_name!r} failed")
        if state != "DONE":
            raise late(f"READ from {handle.agent_name!r} not done in time")
        stats = PullStats(xfer.num_bytes, 1, xfer.num_descs, time.monotonic() - start)
        self.metrics.transfer(xfer.num_bytes, xfer.num_descs, posted - start, stats.read_s)
        return stats

    def _release(self, xfer, request_id: str) -> None:
        """Release the NIXL request. If NIXL cannot cancel a READ in flight, the destination
        blocks may still be written: keep them (and the request) until reap() succeeds."""
        try:
            self.agent.release(xfer)
        except KVTransferError:
            self._stuck[request_id] = xfer

    def keep_stuck(self, request_id: str, reads: list) -> None:
        """READs NIXL would not release (e.g. a layer-wise pull's): the request's blocks stay
        taken until reap() releases them all."""
        self._stuck[request_id] = reads

    def reap(self) -> list[str]:
        """Retry releasing stuck READs; free the blocks of those that let go."""
        freed = []
        for request_id, xfer in list(self._stuck.items()):
            # a layer-wise or re-sharded pull can leave several READs behind
            held = release_reads(self.agent, xfer if isinstance(xfer, list) else [xfer])
            if held:
                self._stuck[request_id] = held
                continue
            del self._stuck[request_id]
            self.engine.abort(request_id)
            freed.append(request_id)
        return freed

    def read_sharded(self, handle: KVHandle, infos: list[KVAgentInfo], request_id: str,
                     block_ids, renew, deadline_s: float, followers=None) -> PullStats:  # fmt: skip
        """read() between instances of different (or parallel) TP/PP layouts: this rank and
        every follower rank of ours READ their own heads and layers from the prefill ranks
        holding them (`infos`, rank 0 first), all within the lease view and the deadline;
        then the prefill's rank 0 hears that it may free the blocks. Raises TransferError;
        on STUCK the blocks stay taken until reap() (keep_stuck)."""
        try:
            return self._read_sharded(handle, infos, request_id, block_ids, renew, deadline_s,
                                      followers)  # fmt: skip
        except TransferError as e:
            self.metrics.failed(e.reason)
            raise

    def _read_sharded(self, handle, infos, request_id, block_ids, renew, deadline_s, followers):
        until, late = self._window(handle, block_ids, renew, deadline_s)
        start = time.monotonic()
        remote_ids = remote_tail(handle, block_ids)
        wait = None
        if followers is not None:
            wait = followers.start_pull(infos, remote_ids, list(block_ids), until - start,
                                        request_id)  # fmt: skip
        mine = pull_from_ranks(self.agent, infos, remote_ids, block_ids, until,
                               self.poll_interval_s)  # fmt: skip
        states = [mine.state if not mine.stuck else "STUCK"]
        stuck = list(mine.stuck)
        if wait is not None:
            theirs, their_stuck = wait(max(until - time.monotonic(), 0) + 5.0)
            states += theirs
            stuck += their_stuck
        if stuck:
            self.keep_stuck(request_id, stuck)
            raise RemoteTransferError(f"a READ from {handle.agent_name!r} could not be released")
        if "ERR" in states:
            raise RemoteTransferError(f"re-sharded READs from {handle.agent_name!r} failed")
        if "TIMEOUT" in states or time.monotonic() > until:
            raise late(f"re-sharded READs from {handle.agent_name!r} not done in time")
        stats = PullStats(mine.num_bytes, mine.num_reads, mine.num_descs,
                          time.monotonic() - start)  # fmt: skip
        self.metrics.transfer(mine.num_bytes, mine.num_descs, mine.posted_s, stats.read_s)
        if self._faults is not None and self._faults.hit("kv.notify", request_id):
            return stats  # a lost notification: the prefill frees on lease expiry
        try:  # one message frees the prefill's blocks, as a whole-block READ's does
            self.agent.add_remote(infos[0])
            self.agent.send_notification(handle.agent_name, handle.request_id.encode())
        except (KVTransferError, ValueError):
            pass  # the prefill's lease frees them instead
        return stats

    def _wait(self, xfer, until: float) -> str:
        while (state := self.agent.poll(xfer)) == "PROC":
            if time.monotonic() > until:
                return "TIMEOUT"
            time.sleep(self.poll_interval_s)
        return state if time.monotonic() <= until else "TIMEOUT"


def remote_tail(handle: KVHandle, local_block_ids) -> list[int]:
    """The prefill's blocks that `local_block_ids` receive: the last as many of the handle's
    (the decode side's cached prefix, if any, covers the ones before)."""
    return list(handle.block_ids[len(handle.block_ids) - len(local_block_ids) :])


@dataclass(slots=True, frozen=True)
class PullStats:
    """One request's KV pull as this rank saw it (the server timing reports it)."""

    num_bytes: int
    num_reads: int  # NIXL READs posted
    num_descs: int
    read_s: float  # posted to landed (to released)

    def timing(self) -> dict[str, float]:
        return {"kv_bytes": self.num_bytes, "kv_reads": self.num_reads,
                "kv_descriptors": self.num_descs, "kv_read_s": self.read_s}  # fmt: skip


@dataclass(slots=True)
class RankPull:
    """One rank's share of a re-sharded pull."""

    state: str  # DONE, ERR, TIMEOUT
    num_bytes: int = 0
    num_descs: int = 0
    posted_s: float = 0.0
    stuck: list = field(default_factory=list)  # READs NIXL would not release
    num_reads: int = 0


def pull_from_ranks(agent, infos: list[KVAgentInfo], remote_block_ids, local_block_ids,
                    until: float, poll_interval_s: float = 0.0002) -> RankPull:  # fmt: skip
    """READ what this rank's pool owns of remote_block_ids from the ranks (`infos`) that
    hold it (reshard.plan_reads: one READ per overlapping rank), wait until all land or
    `until` (monotonic) passes, release them."""
    start = time.monotonic()
    reads = []
    state = "DONE"
    try:
        plan = plan_reads(agent.layout, [info.layout for info in infos])
        for index, pieces in plan.items():
            name = agent.add_remote(infos[index])
            reads.append(agent.read_pieces(name, pieces, remote_block_ids, local_block_ids))
    except (KVTransferError, ValueError):
        state = "ERR"
    posted = time.monotonic() - start
    while state == "DONE" and any(agent.poll(r) == "PROC" for r in reads):
        if time.monotonic() > until:
            state = "TIMEOUT"
            break
        time.sleep(poll_interval_s)
    if state == "DONE" and any(r.state == "ERR" for r in reads):
        state = "ERR"
    stuck = release_reads(agent, reads)
    return RankPull(
        state,
        sum(r.num_bytes for r in reads),
        sum(r.num_descs for r in reads),
        posted,
        stuck,
        len(reads),
    )


def release_reads(agent, reads: list) -> list:
    """Release each READ (one a follower rank holds has its own release(), which asks that
    rank); return those that would not let go: their destination blocks may still be
    written."""
    held = []
    for read in reads:
        try:
            read.release() if hasattr(read, "release") else agent.release(read)
        except KVTransferError:
            held.append(read)
    return held
