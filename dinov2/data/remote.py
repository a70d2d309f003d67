"""Training shards read where they live: WebDataset ``.tar`` shards behind fsspec URLs (``s3://``, ``gs://``,
``https://``, ``http://`` ...), by byte-range reads against the shard index.

The index (key, data offset, size of each sample's image) is built once, in the process that opens the source, by
the same tar-header scan as local shards (:func:`dinov2.data.sources._scan_shard`) over a chunked range reader, so
sample ``i`` is the same image here as in a local copy of the shards and exact resume holds unchanged. After that,
``read_bytes(i)`` is one range request of exactly that member's bytes.

Network faults: every request is retried with exponential backoff (``RemoteOptions``) on transient errors (OSError
other than not-found / permission, timeouts, aiohttp client errors, short reads). A shard whose read still fails is
marked unavailable in this process: its samples then raise at once (no more waiting on it), and the training loop
replaces them deterministically and counts them (reason ``read_error``), like a corrupt file. A shard whose index
cannot be read at start is left out of the source (``unavailable_shards``) with a warning; the run then has fewer
images, which ``TrainLoader.load_loader_state`` reports if a later run sees a different count.

Read-ahead: the loader announces each batch's sample indices (:meth:`RemoteTarShardSource.prefetch`) and they are
fetched on a small thread pool, bounded by ``readahead_bytes`` in flight or waiting, so a batch's requests overlap
instead of queueing one after another. Prefetching changes when bytes arrive, never which bytes.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from braceexpand import braceexpand

from dinov2.data.sources import _scan_shard

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
# Local-file URLs are opened by the local sources; everything else with a scheme goes through fsspec.
_LOCAL_SCHEMES = ("file", "local")


def is_remote(spec: str) -> bool:
    """Whether ``spec`` is an fsspec URL other than a local file (``scheme://...``)."""
    scheme, sep, _ = spec.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() not in _LOCAL_SCHEMES


@dataclass(frozen=True)
class RemoteOptions:
    """Retry, read-ahead and chunking settings of remote shard reads.

    Attributes:
        retries: further attempts after a failed request (so ``retries + 1`` in all) before giving up on it.
        backoff_s: wait before the first retry; it doubles with each further retry (times a random factor in
            [0.5, 1] so that many readers do not retry in lockstep).
        backoff_max_s: cap on one wait.
        readahead_bytes: bytes of announced samples fetched ahead or waiting to be used, at most.
        readahead_threads: concurrent prefetch requests.
        scan_chunk_bytes: range-request size of the index scan (tar headers are read sequentially; members larger
            than a chunk are skipped over, not downloaded).
        storage_options: keyword arguments for ``fsspec.filesystem`` (credentials, endpoints, timeouts).
    """

    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    readahead_bytes: int = 64 << 20
    readahead_threads: int = 8
    scan_chunk_bytes: int = 4 << 20
    storage_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0 or self.readahead_bytes < 0:
            raise ValueError("remote retries, backoff_s, backoff_max_s and readahead_bytes must be >= 0")
        if self.readahead_threads < 1 or self.scan_chunk_bytes < 1:
            raise ValueError("remote readahead_threads and scan_chunk_bytes must be >= 1")


class ShardUnavailable(OSError):
    """A shard that failed after all retries; its samples are skipped for the rest of this process."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, TimeoutError, EOFError]
    try:  # the HTTP filesystem's client errors (dropped connections, 5xx) are not OSErrors
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    from fsspec.exceptions import FSTimeoutError

    kinds.append(FSTimeoutError)
    return tuple(kinds)


# Retrying these cannot help: the object is not there or we may not read it.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, ShardUnavailable)


def with_retries(call: Callable[[], Any], what: str, options: RemoteOptions,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> Any:
    """``call()``, retried with exponential backoff on transient errors.

    Args:
        call: the request.
        what: named in the log and in the final error.
        options: retry settings.
        sleep: the wait (tests pass a recorder).
        rng: jitter source (a private generator: the global ``random`` state is the loader's business).

    Raises:
        ShardUnavailable: after ``options.retries + 1`` failed attempts, or at once on a permanent error.
    """
    rng = rng if rng is not None else random.Random()
    transient = _transient_errors()
    for attempt in range(options.retries + 1):
        try:
            return call()
        except _PERMANENT as exc:
            raise ShardUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        except transient as exc:
            if attempt == options.retries:
                raise ShardUnavailable(
                    f"{what}: failed {attempt + 1} times, last {type(exc).__name__}: {exc}"
                ) from exc
            delay = min(options.backoff_max_s, options.backoff_s * 2**attempt) * rng.uniform(0.5, 1.0)
            log.debug("%s: %s: %s; retry %d in %.2f s", what, type(exc).__name__, exc, attempt + 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class _RangeReader:
    """A read-only, seekable file over one remote object: reads are served from ``chunk`` sized range requests,
    each retried on its own, so a dropped connection costs one chunk, not the whole scan."""

    def __init__(self, fs: Any, url: str, size: int, chunk: int, options: RemoteOptions,
                 sleep: Callable[[float], None]) -> None:
        self.fs, self.url, self.size, self.chunk, self.options, self.sleep = fs, url, size, chunk, options, sleep
        self.pos = 0
        self._start, self._data = 0, b""

    def _fetch(self, start: int) -> None:
        end = min(self.size, start + self.chunk)

        def get() -> bytes:
            data = self.fs.cat_file(self.url, start=start, end=end)
            if len(data) != end - start:
                raise OSError(f"range {start}-{end}: got {len(data)} bytes")
            return data

        self._start, self._data = start, with_retries(get, f"{self.url} [{start}, {end})", self.options, self.sleep)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        out = bytearray()
        while n > 0 and self.pos < self.size:
            if not self._start <= self.pos < self._start + len(self._data):
                self._fetch(self.pos)
            piece = self._data[self.pos - self._start : self.pos - self._start + n]
            out += piece
            self.pos += len(piece)
            n -= len(piece)
        return bytes(out)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._data = b""


def _filesystem(url: str, options: RemoteOptions) -> Any:
    import fsspec

    protocol = url.partition("://")[0]
    return fsspec.filesystem(protocol, **dict(options.storage_options))


def expand_remote(spec: str, options: RemoteOptions | None = None) -> list[str]:
    """Shard URLs of a remote spec: brace ranges expanded; globs listed where the filesystem can list (not HTTP).

    Args:
        spec: e.g. ``https://host/shards/shard-{000000..000099}.tar`` or ``s3://bucket/shards/*.tar``.

    Returns:
        URLs, in brace order, each glob's matches sorted.
    """
    options = options or RemoteOptions()
    urls: list[str] = []
    for pattern in braceexpand(spec):
        if not any(ch in pattern.partition("://")[2] for ch in _GLOB_CHARS):
            urls.append(pattern)
            continue
        fs = _filesystem(pattern, options)
        protocol = pattern.partition("://")[0]
        found = with_retries(lambda fs=fs, p=pattern: fs.glob(p), f"listing {pattern}", options)
        urls.extend(m if "://" in m else f"{protocol}://{m}" for m in sorted(found))
    return urls


class RemoteTarShardSource:
    """Images inside uncompressed WebDataset ``.tar`` shards at fsspec URLs, read by range requests.

    Same sample grouping, order and keys as :class:`dinov2.data.sources.TarShardSource` on local copies of the
    shards. Picklable: the filesystem handle, thread pool and read-ahead buffer are per process.

    Args:
        urls: shard URLs.
        options: retries, backoff and read-ahead.
        sleep: the backoff wait (tests record it instead of sleeping).
    """

    def __init__(self, urls: list[str], options: RemoteOptions | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not urls:
            raise ValueError("RemoteTarShardSource needs at least one shard URL")
        self.options = options or RemoteOptions()
        self.sleep = sleep
        self.shards = [str(u) for u in urls]
        self._reset_process_state()
        self.unavailable_shards: dict[str, str] = {}
        keys: list[str] = []
        shard_ids, offsets, sizes = [], [], []
        for shard_id, url in enumerate(self.shards):
            try:
                entries = self._scan(url)
            except ShardUnavailable as exc:
                self.unavailable_shards[url] = str(exc)
                log.warning("shard %s left out: its index could not be read (%s)", url, exc)
                continue
            for key, offset, size in entries:
                keys.append(key)
                shard_ids.append(shard_id)
                offsets.append(offset)
                sizes.append(size)
        if not keys:
            raise ValueError(f"no readable images in {len(self.shards)} remote shards, e.g. {self.shards[0]!r}: "
                             f"{next(iter(self.unavailable_shards.values()), 'no image members')}")
        self.keys = keys
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._fs: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: OrderedDict[int, Future] = OrderedDict()
        self._ahead_bytes = 0
        self._lock = threading.Lock()
        self._failed: dict[int, str] = {}
        self._rng = random.Random(self._pid)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_fs", "_pool", "_ahead", "_ahead_bytes", "_lock", "_failed", "_rng", "_pid"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images in {len(self.shards)} shards)"

    def _filesystem(self) -> Any:
        if self._pid != os.getpid():  # forked DataLoader worker: nothing of the parent's is reused
            self._reset_process_state()
        if self._fs is None:
            self._fs = _filesystem(self.shards[0], self.options)
        return self._fs

    def _scan(self, url: str) -> list[tuple[str, int, int]]:
        fs = self._filesystem()
        size = int(with_retries(lambda: fs.size(url), f"size of {url}", self.options, self.sleep, self._rng))
        reader = _RangeReader(fs, url, size, self.options.scan_chunk_bytes, self.options, self.sleep)
        try:
            return _scan_shard(url, fileobj=reader)
        except ValueError as exc:  # not a plain tar: no retry can fix that
            raise ShardUnavailable(str(exc)) from exc

    def key(self, i: int) -> str:
        """WebDataset key of sample i."""
        return self.keys[i]

    def _fetch(self, i: int) -> bytes:
        shard_id = int(self.shard_ids[i])
        if shard_id in self._failed:
            raise ShardUnavailable(f"{self.shards[shard_id]} skipped after earlier failures: {self._failed[shard_id]}")
        url, start, size = self.shards[shard_id], int(self.offsets[i]), int(self.sizes[i])
        fs = self._filesystem()

        def get() -> bytes:
            data = fs.cat_file(url, start=start, end=start + size)
            if len(data) != size:
                raise OSError(f"range read of {size} bytes at {start} returned {len(data)}")
            return data

        try:
            return with_retries(get, f"{url} sample {self.keys[i]!r}", self.options, self.sleep, self._rng)
        except ShardUnavailable as exc:
            self._failed.setdefault(shard_id, str(exc))
            log.warning("shard %s unavailable, its samples are skipped in this process: %s", url, exc)
            raise

    def read_bytes(self, i: int) -> bytes:
        """Raw bytes of sample i's image member (from the read-ahead buffer when it was announced).

        Raises:
            ShardUnavailable: (an OSError) when the shard keeps failing; the loader counts and replaces the sample.
        """
        if self._pid != os.getpid():
            self._reset_process_state()
        with self._lock:
            future = self._ahead.pop(i, None)
            if future is not None:
                self._ahead_bytes -= int(self.sizes[i])
        if future is not None:
            return future.result()
        return self._fetch(i)

    def prefetch(self, indices: Iterable[int]) -> None:
        """Start fetching these samples in the background, within the read-ahead byte budget (in order; the rest
        are read when asked for). Announcing an index that is never read only costs its buffer until evicted."""
        if self.options.readahead_bytes == 0:
            return
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options.readahead_threads, thread_name_prefix="shard-readahead")
        with self._lock:
            announced = set()
            for i in indices:
                i = int(i)
                announced.add(i)
                size = int(self.sizes[i])
                if i in self._ahead or int(self.shard_ids[i]) in self._failed:
                    continue
                # Earlier announcements that were never read make room first; this batch's own come in order.
                while self._ahead_bytes + size > self.options.readahead_bytes:
                    stale = next((j for j in self._ahead if j not in announced), None)
                    if stale is None:
                        break
                    self._ahead.pop(stale).cancel()
                    self._ahead_bytes -= int(self.sizes[stale])
                if self._ahead_bytes + size > self.options.readahead_bytes:
                    break
                self._ahead[i] = self._pool.submit(self._fetch, i)
                self._ahead_bytes += size

    def close(self) -> None:
        """Drop the read-ahead buffer and stop its threads (waiting for requests already running)."""
        with self._lock:
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()
            self._ahead_bytes = 0
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


def open_remote_source(spec: str, options: RemoteOptions | None = None) -> RemoteTarShardSource:
    """A :class:`RemoteTarShardSource` for a URL spec (brace ranges, globs where the store can list).

    Raises:
        ValueError: when the spec names no ``.tar`` shards.
    """
    urls = expand_remote(spec, options)
    if not urls:
        raise ValueError(f"no shards match {spec!r}")
    others = [u for u in urls if not u.endswith(".tar")]
    if others:
        raise ValueError(f"remote datasets must be .tar shards; {spec!r} names e.g. {others[0]!r}")
    return RemoteTarShardSource(urls, options)
