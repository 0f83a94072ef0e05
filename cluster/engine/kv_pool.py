"""Allocation of the KV pool tensor. On CPU the pool is anonymous memory advised for
transparent huge pages: the KV transfer layer reads it from another process with CMA, which
pins every page it touches, and 2 MiB pages make large pulls ~1.3-1.5x faster than 4 KiB ones
(`cluster bench transfer --no-huge-pages` shows the difference). On CUDA it is a plain
device tensor."""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE_BYTES = 2 * 1024 * 1024


def allocate_kv_pool(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, huge_pages: bool = True
) -> torch.Tensor:
    """A zero-filled tensor of `shape`; on CPU 2 MiB-aligned and madvised for huge pages."""
    if device.type != "cpu" or not huge_pages or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Private anonymous memory (zero-filled by the kernel): a shared mapping would be shmem,
    # which transparent huge pages leave alone.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    buf = mmap.mmap(-1, num_bytes + HUGE_PAGE_BYTES, flags=flags)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive as long as it lives
    offset = -raw.data_ptr() % HUGE_PAGE_BYTES
    buf.madvise(mmap.MADV_HUGEPAGE, offset, num_bytes - num_bytes % mmap.PAGESIZE)
    return raw[offset : offset + num_bytes].view(dtype).view(shape)
