"""NIXL KV agent: one engine rank's KV pool, registered with NIXL's UCX backend, that pulls
blocks from other ranks' pools (READ) and hears when others have pulled from it.

The whole KV tensor is registered once at start-up (DRAM on CPU, VRAM on CUDA): registration
pins memory and is far too slow to do per request. A pull is then only arithmetic on the two
base addresses (block i lives at base + i * block_bytes, layout.py) merged into runs
(descriptors.py), one transfer request, and a notification that NIXL delivers to the holder
after the data has landed: the holder frees its blocks on it (lease.py).

    decode rank (puller)                          prefill rank (holder)
    add_remote(info)      <-- KVAgentInfo ---      info()
    read_blocks(...)      --- READ + notif -->     get_notifications() -> free blocks
    poll(handle) == "DONE"

Pure transport: no scheduler, no Ray. UCX picks its own transports (CMA or shared memory
within a host, RDMA or TCP across hosts, CUDA IPC for VRAM) and needs no UCX_* variables on
a CPU-only host: there it reads the data with CMA (process_vm_readv, zero-copy) and carries
wireup, flush and notifications over TCP loopback. A holder must keep UCX progressing for a
READ of its memory to finish; the agent's own progress thread does that (_make_nixl_agent).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.descriptors import check_block_ids, count_runs, run_descs
from cluster.kv_transfer.layout import KVLayout
from cluster.kv_transfer.reshard import Piece, piece_descs

XferState = Literal["DONE", "PROC", "ERR"]


class KVTransferError(RuntimeError):
    """NIXL refused to set up or post a transfer (unknown remote, memory not registered...)."""


def _import_nixl() -> tuple[ModuleType, ModuleType, tuple[type[Exception], ...]]:
    """NIXL's Python API from whichever wheel is installed (`nixl` picks cu12/cu13 itself, but
    refuses when it detects a CUDA major whose wheel is missing), and its exception types."""
    last_error: ImportError | None = None
    for prefix in ("nixl", "nixl_cu12", "nixl_cu13"):
        try:
            api = importlib.import_module(f"{prefix}._api")
            bindings = importlib.import_module(f"{prefix}._bindings")
        except ImportError as e:
            last_error = e
            continue
        errors = tuple(
            obj
            for obj in vars(bindings).values()
            if isinstance(obj, type) and issubclass(obj, Exception)
        )
        return api, bindings, errors
    raise ImportError(
        "NIXL is not importable; install `nixl` (it pulls nixl-cu12 or nixl-cu13), which "
        "the KV transfer layer needs"
    ) from last_error


_nixl_api, _nixl_bindings, _NIXL_ERRORS = _import_nixl()


def _make_nixl_agent(name: str, progress_delay_us: int) -> Any:
    """A nixl_agent with the UCX backend and a progress thread that sleeps between wakeups.

    The holder must progress UCX for a READ of its memory to complete: NIXL flushes the
    endpoint after the READ and, on hosts where UCX has no one-sided path both ways (here:
    CMA for the data, TCP loopback for everything else), the flush waits for the holder.
    NIXL's progress thread does that without Python or the GIL, but the Python API fixes its
    poll delay at 0 µs, which busy-spins a whole core per agent. So the agent is built bare
    and its C++ agent swapped for one configured with a delay: the thread then sleeps in poll()
    on UCX's event fd, wakes on traffic at once and on the delay otherwise
    (1 ms: ~3% of a core idle; 10 ms: ~1%). Measured on this host: a READ from an idle
    holder completes in under 1 ms with either delay, so the delay is only a backstop."""
    if progress_delay_us < 1:
        raise ValueError("progress_delay_us must be >= 1; 0 busy-spins a core")
    agent = _nixl_api.nixl_agent(name, _nixl_api.nixl_agent_config(backends=[]))
    config = _nixl_bindings.nixlAgentConfig()
    config.useProgThread = True
    config.useListenThread = False
    config.syncMode = _nixl_bindings.NIXL_THREAD_SYNC_NONE  # the Python API's own default
    config.pthrDelay = progress_delay_us
    agent.agent = _nixl_bindings.nixlAgent(name, config)
    if "UCX" not in agent.get_plugin_list():
        raise KVTransferError("NIXL has no UCX backend plugin on this host")
    agent.create_backend("UCX")
    return agent


def _descs(base: int, offsets: np.ndarray, lengths: np.ndarray, device_id: int) -> np.ndarray:
    descs = np.empty((len(offsets), 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base) + offsets.astype(np.uint64)
    descs[:, 1] = lengths.astype(np.uint64)
    descs[:, 2] = device_id
    return descs


@dataclass(slots=True)
class TransferHandle:
    remote_name: str
    num_bytes: int
    num_descs: int
    xfer: Any  # nixl_xfer_handle
    state: XferState = "PROC"


class NixlKVAgent:
    def __init__(
        self,
        name: str,
        kv_cache: torch.Tensor,
        tp_rank: int = 0,
        tp_size: int = 1,
        progress_delay_us: int = 10_000,
        layerwise: bool = False,
        pp_rank: int = 0,
        pp_size: int = 1,
        model_layers: int = 0,
        model_kv_heads: int = 0,
        model_id: str = "",
    ) -> None:
        self.name = name
        self.layout = KVLayout.from_tensor(
            kv_cache, tp_rank, tp_size, pp_rank, pp_size, model_layers, model_kv_heads, model_id
        )
        self.num_blocks = kv_cache.shape[0]
        self.base_addr = kv_cache.data_ptr()
        self.device_id = max(kv_cache.get_device(), 0)
        self._kv_cache = kv_cache  # NIXL keeps raw addresses: the tensor must outlive us
        self._nixl = _make_nixl_agent(name, progress_delay_us)
        self._reg_descs = self._nixl.register_memory(kv_cache)
        self._remotes: dict[str, KVAgentInfo] = {}
        # One prepared descriptor per block on each side: a pull is then two index arrays,
        # and NIXL merges consecutive indices itself (about half the per-pull cost of
        # building descriptor lists per transfer, measured by `cluster bench transfer`).
        self._local_dlist = self._prep_blocks(
            "NIXL_INIT_AGENT", self.base_addr, self.num_blocks, self.device_id, self.mem_type
        )
        self._remote_dlists: dict[str, Any] = {}
        # Layer-wise pulls (optional): one prepared descriptor per (block, head, layer), so
        # layer i of a request moves while later layers are still being computed
        # (`cluster bench layerwise` measures whether that pays).
        self.layerwise = layerwise
        self._local_layer_dlist = (
            self._prep_layers("NIXL_INIT_AGENT", self.base_addr, self.num_blocks,
                              self.device_id, self.mem_type) if layerwise else None
        )  # fmt: skip
        self._remote_layer_dlists: dict[str, Any] = {}
        # Workers pull for several requests from several threads; NIXL calls go one at a time.
        self._lock = threading.RLock()

    @property
    def mem_type(self) -> str:
        return "VRAM" if self.layout.device_type == "cuda" else "DRAM"

    def metadata(self) -> bytes:
        return self._nixl.get_agent_metadata()

    def info(self) -> KVAgentInfo:
        """What a puller needs to read our blocks; publish it through Ray or the router."""
        return KVAgentInfo(
            self.name,
            self.metadata(),
            self.base_addr,
            self.num_blocks,
            self.layout,
            self.device_id,
        )

    def add_remote(self, info: KVAgentInfo) -> str:
        """Make `info`'s pool readable; idempotent. A remote that restarted under the same name
        brings new metadata (new endpoint, new registrations): NIXL refuses to load it over
        the old one, so the old one is dropped first."""
        self.layout.check_compatible(info.layout)
        with self._lock:
            return self._add_remote(info)

    def _add_remote(self, info: KVAgentInfo) -> str:
        known = self._remotes.get(info.agent_name)
        if known is not None and known.metadata == info.metadata:
            return info.agent_name
        if known is not None:
            self._remove_remote(info.agent_name)
        try:
            name = self._nixl.add_remote_agent(info.metadata)
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"cannot load metadata of {info.agent_name!r}: {e}") from e
        name = name.decode() if isinstance(name, bytes) else name
        if name != info.agent_name:
            self._nixl.remove_remote_agent(name)
            raise ValueError(f"metadata is of agent {name!r}, info says {info.agent_name!r}")
        self._remotes[name] = info
        if not self.layout.same_shard(info.layout):  # re-sharded pulls build their own lists
            return name
        try:
            self._remote_dlists[name] = self._prep_blocks(
                name, info.base_addr, info.num_blocks, info.device_id, info.mem_type
            )
            if self.layerwise:
                self._remote_layer_dlists[name] = self._prep_layers(
                    name, info.base_addr, info.num_blocks, info.device_id, info.mem_type
                )
        except KVTransferError:
            self._remove_remote(name)
            raise
        return name

    def _prep_blocks(self, agent: str, base: int, num_blocks: int, dev: int, mem: str) -> Any:
        descs = run_descs(base, self.layout.block_bytes, dev, range(num_blocks), [1] * num_blocks)
        try:
            return self._nixl.prep_xfer_dlist(agent, descs, mem)
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"cannot prepare block descriptors of {agent!r}: {e}") from e

    def _prep_layers(self, agent: str, base: int, num_blocks: int, dev: int, mem: str) -> Any:
        """One descriptor per (block, head, layer), index (block·H + head)·L + layer: a
        layer of a block is one K+V range per head in the head-major layout."""
        slices = np.arange(num_blocks * self.layout.num_kv_heads * self.layout.num_layers,
                           dtype=np.uint64)  # fmt: skip
        one = 2 * self.layout.tile_bytes
        descs = np.empty((len(slices), 3), dtype=np.uint64)
        descs[:, 0] = np.uint64(base) + slices * np.uint64(one)
        descs[:, 1] = one
        descs[:, 2] = dev
        try:
            return self._nixl.prep_xfer_dlist(agent, descs, mem)
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"cannot prepare layer descriptors of {agent!r}: {e}") from e

    def remove_remote(self, remote_name: str) -> None:
        """Forget a remote (it died or left); NIXL disconnects from it."""
        with self._lock:
            self._remove_remote(remote_name)

    def _remove_remote(self, remote_name: str) -> None:
        for dlists in (self._remote_dlists, self._remote_layer_dlists):
            dlist = dlists.pop(remote_name, None)
            if dlist is not None:
                self._nixl.release_dlist_handle(dlist)
        if self._remotes.pop(remote_name, None) is not None:
            self._nixl.remove_remote_agent(remote_name)

    def read_blocks(
        self,
        remote_name: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notif: bytes,
    ) -> TransferHandle:
        """Post a READ of remote_block_ids[i] into local_block_ids[i] for every i; NIXL sends
        `notif` to the remote once all of it has landed. Poll the handle, then release it."""
        remote = self._remote(remote_name)
        if not self.layout.same_shard(remote.layout):
            raise ValueError(
                f"{remote_name!r} holds other layers or heads than this pool: re-shard with "
                "read_pieces (kv_transfer/reshard.py)"
            )
        self._check_pull(remote, remote_block_ids, local_block_ids)
        src = np.asarray(remote_block_ids, dtype=np.int32)
        dst = np.asarray(local_block_ids, dtype=np.int32)
        num_bytes = len(dst) * self.layout.block_bytes
        with self._lock:
            xfer, state = self._post(remote, src, dst, notif)
        return TransferHandle(remote_name, num_bytes, count_runs(src, dst), xfer, state)

    def read_layers(
        self,
        remote_name: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        layers: Sequence[int],
        notif: bytes,
    ) -> TransferHandle:
        """Like read_blocks, for only `layers` of each block (needs layerwise=True)."""
        if not self.layerwise:
            raise ValueError("this agent was built without layerwise=True")
        remote = self._remote(remote_name)
        self._check_pull(remote, remote_block_ids, local_block_ids)
        num_layers = self.layout.num_layers
        if not layers or not all(0 <= i < num_layers for i in layers):
            raise ValueError(f"layers must be a non-empty subset of [0, {num_layers})")
        lay = np.asarray(layers, dtype=np.int64)
        heads = np.arange(self.layout.num_kv_heads, dtype=np.int64)

        def index(block_ids) -> np.ndarray:
            slots = np.asarray(block_ids, dtype=np.int64)[:, None] * len(heads) + heads
            return (slots[:, :, None] * num_layers + lay).ravel().astype(np.int32)

        src, dst = index(remote_block_ids), index(local_block_ids)
        num_bytes = len(dst) * 2 * self.layout.tile_bytes
        with self._lock:
            try:
                xfer = self._nixl.make_prepped_xfer(
                    "READ", self._local_layer_dlist, dst,
                    self._remote_layer_dlists[remote_name], src, notif,
                )  # fmt: skip
                state = self._nixl.transfer(xfer)
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"cannot READ from {remote_name!r}: {e!r}") from e
        return TransferHandle(remote_name, num_bytes, count_runs(src, dst), xfer, state)

    def read_pieces(
        self,
        remote_name: str,
        pieces: Sequence[Piece],
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notif: bytes = b"",
    ) -> TransferHandle:
        """One READ of the layers and heads `pieces` name (reshard.plan_reads) of each remote
        block into the matching local block, for pools of different TP/PP layouts. No
        notification unless `notif`: a re-sharded pull is several READs, and the holder frees
        on the one message the puller sends when all have landed."""
        remote = self._remote(remote_name)
        self._check_pull(remote, remote_block_ids, local_block_ids)
        src, dst, lengths = piece_descs(
            pieces, remote.layout, self.layout, remote_block_ids, local_block_ids
        )
        with self._lock:
            try:
                xfer = self._nixl.initialize_xfer(
                    "READ",
                    self._nixl.get_xfer_descs(
                        _descs(self.base_addr, dst, lengths, self.device_id), self.mem_type
                    ),
                    self._nixl.get_xfer_descs(
                        _descs(remote.base_addr, src, lengths, remote.device_id), remote.mem_type
                    ),
                    remote_name,
                    notif,
                )
                state = self._nixl.transfer(xfer)
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"cannot READ from {remote_name!r}: {e!r}") from e
        return TransferHandle(remote_name, int(lengths.sum()), len(lengths), xfer, state)

    def send_notification(self, remote_name: str, message: bytes) -> None:
        """A message to a remote agent we know (its get_notifications returns it): prefill
        uses it to announce a layer is ready when pulling layer by layer."""
        self._remote(remote_name)
        with self._lock:
            try:
                self._nixl.send_notif(remote_name, message)
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"cannot notify {remote_name!r}: {e!r}") from e

    def _remote(self, remote_name: str) -> KVAgentInfo:
        try:
            return self._remotes[remote_name]
        except KeyError:
            raise KeyError(f"unknown remote KV agent {remote_name!r}; add_remote it") from None

    def _check_pull(self, remote: KVAgentInfo, remote_block_ids, local_block_ids) -> None:
        if not local_block_ids:
            raise ValueError("a pull needs at least one block")
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError(
                f"{len(remote_block_ids)} remote blocks but {len(local_block_ids)} local blocks"
            )
        if len(set(local_block_ids)) != len(local_block_ids):
            raise ValueError(f"local block ids repeat: {list(local_block_ids)}")
        check_block_ids(remote_block_ids, remote.num_blocks, "remote")
        check_block_ids(local_block_ids, self.num_blocks, "local")

    def _post(self, remote: KVAgentInfo, src: np.ndarray, dst: np.ndarray, notif: bytes):
        nixl = self._nixl
        remote_dlist = self._remote_dlists[remote.agent_name]
        try:
            xfer = nixl.make_prepped_xfer("READ", self._local_dlist, dst, remote_dlist, src, notif)
            return xfer, nixl.transfer(xfer)
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"cannot READ from {remote.agent_name!r}: {e!r}") from e

    def poll(self, handle: TransferHandle) -> XferState:
        """DONE and ERR are final; only PROC asks NIXL again."""
        if handle.state == "PROC":
            with self._lock:
                handle.state = self._nixl.check_xfer_state(handle.xfer)
        return handle.state

    def release(self, handle: TransferHandle) -> None:
        """Free the NIXL request. On a READ still in flight NIXL tries to cancel it and raises
        if it cannot: then the local destination blocks may still be written and must not be
        reused yet."""
        try:
            with self._lock:
                handle.xfer.release()
        except _NIXL_ERRORS as e:
            raise KVTransferError(f"cannot release a READ from {handle.remote_name!r}") from e

    def get_notifications(self) -> list[tuple[str, bytes]]:
        """(remote agent name, notif) for every pull of our blocks finished since last call."""
        with self._lock:
            notifs = self._nixl.get_new_notifs()
        return [(name, msg) for name, msgs in notifs.items() for msg in msgs]

    def close(self) -> None:
        """Disconnect from every remote, deregister the KV tensor and drop the NIXL agent (its
        progress thread stops once no TransferHandle refers to it); idempotent."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._nixl is None:
            return
        for name in list(self._remotes):
            self._remove_remote(name)
        self._nixl.release_dlist_handle(self._local_dlist)
        if self._local_layer_dlist is not None:
            self._nixl.release_dlist_handle(self._local_layer_dlist)
        self._nixl.deregister_memory(self._reg_descs)
        self._nixl = None
