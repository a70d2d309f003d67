"""Block-wise float32 views of stored float16 vector arrays, with resident memory that does not grow with the pool.

Embedding arrays are read as memory maps (`np.load(mmap_mode="r")`). A sequential pass over a memmap leaves every
page it touched mapped in the process, so its resident set (what `ru_maxrss` / VmHWM count) climbs to the file size
even though those pages are clean page cache. `blocks` hands out one float32 block at a time and, after each one,
tells the kernel the mapping's pages are no longer needed (`MADV_DONTNEED` on a read-only shared file mapping only
unmaps them: the page cache keeps the data, nothing is lost and nothing is re-read from disk while it stays cached).
So a pass over n vectors holds one block plus one float32 copy of it, whatever n is.

Random row gathers (the exact re-rank) are not released: they touch few rows per query, and unmapping after every
query block would turn each re-touch into a page fault.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np


def release(x: np.ndarray) -> None:
    """Unmap the resident pages of the memmap behind `x` (no-op for in-memory arrays)."""
    handle = getattr(x, "_mmap", None)
    if isinstance(handle, mmap.mmap) and not handle.closed and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def to_f32(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 copy (or the array itself when it already is one), the layout Faiss takes."""
    return np.ascontiguousarray(x, dtype=np.float32)


def blocks(x: np.ndarray, size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, float32 [<= size, d] copy of x[offset : offset + size]) for consecutive blocks of rows [start, stop).

    The pages of each block are released once the caller asks for the next one (and after the last).
    """
    stop = x.shape[0] if stop is None else min(stop, x.shape[0])
    for s in range(start, stop, size):
        block = np.array(x[s : min(s + size, stop)], dtype=np.float32, order="C", copy=True)
        release(x)
        yield s, block
    release(x)


def bytes_per_block(size: int, d: int) -> int:
    """Resident bytes of one `blocks` step: the float32 block (the float16 pages are released)."""
    return size * d * 4
