"""Remote shards over HTTP: a real server on 127.0.0.1 (stdlib, with Range support) serving real WebDataset shards,
one of which drops connections. Batches must be bitwise those of the local-path run; a shard that keeps failing is
skipped and counted, never a crash."""

from __future__ import annotations

import io
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dinov2.data.augment import MultiCropAugmentation
from dinov2.data.loader import make_train_loader
from dinov2.data.remote import (
    RemoteOptions,
    RemoteTarShardSource,
    ShardUnavailable,
    expand_remote,
    is_remote,
    with_retries,
)
from dinov2.data.sources import open_source

pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")

TENSOR_KEYS = ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list",
               "masks_weight", "n_masked_patches", "sample_indices")
FAST = RemoteOptions(retries=4, backoff_s=0.001, backoff_max_s=0.01, scan_chunk_bytes=4096)


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + seed % 5, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder with single byte ranges (206). Files named in `flaky` drop every other request after half
    the body; files in `broken` fail every range request (their full GET, used for nothing here, still works)."""

    flaky: set[str] = set()
    broken: set[str] = set()
    counts: dict[str, int] = {}
    refused: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        path = Path(self.directory) / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        rng = self.headers.get("Range")
        if rng:
            if name in self.broken:
                with self.lock:
                    self.refused[name] = self.refused.get(name, 0) + 1
                self.send_error(503)
                return
            lo, _, hi = rng.removeprefix("bytes=").partition("-")
            start, end = int(lo), min(len(data), int(hi) + 1 if hi else len(data))
        body = data[start:end]
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            drop = name in self.flaky and self.counts[name] % 2 == 1
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if drop:  # a connection dropped mid-body: the client sees a short payload
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


@pytest.fixture
def served(tmp_path):
    """Four shards (the second drops connections) behind http://127.0.0.1:PORT/; yields (base URL, folder)."""
    for shard in range(4):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:06d}.tar")) as sink:
            for j in range(3):
                sink.write({"__key__": f"s{shard}_{j:03d}", "jpg": _jpeg(10 * shard + j), "cls": j})
    handler = type("Handler", (_Handler,), {"flaky": {"shard-000001.tar"}, "broken": set(), "counts": {}, "refused": {},
                                            "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _loader(source, **kw):
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    return make_train_loader(source, 4, augmentation=aug, patch_size=8, seed=3, **kw)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_is_remote():
    assert is_remote("https://h/x.tar") and is_remote("s3://b/k/{0..3}.tar") and is_remote("gs://b/x.tar")
    assert not is_remote("/data/x.tar") and not is_remote("file:///data/x.tar") and not is_remote("a:b")


def test_remote_batches_bitwise_equal_local_despite_dropped_connections(served):
    base, folder, handler = served
    local = open_source(str(folder / "shard-{000000..000003}.tar"))
    remote = RemoteTarShardSource(expand_remote(base + "/shard-{000000..000003}.tar"), FAST)
    assert [remote.key(i) for i in range(len(remote))] == [local.key(i) for i in range(len(local))]
    assert np.array_equal(remote.offsets, local.offsets) and np.array_equal(remote.sizes, local.sizes)
    assert handler.counts["shard-000001.tar"] >= 2  # the flaky shard's index was read through a drop
    # Two epochs (6 batches of 4 from 12 images), with DataLoader workers: same batches, nothing skipped.
    want = _take(_loader(local), 6)
    got = _take(_loader(remote, num_workers=2), 6)
    for a, b in zip(want, got):
        assert a["batch_index"] == b["batch_index"] and a["sample_keys"] == b["sample_keys"]
        for key in TENSOR_KEYS:
            assert torch.equal(a[key], b[key]), key
        assert b["skipped"] == {}


def test_remote_resume_continues_bitwise(served):
    base, _, _ = served
    spec = base + "/shard-{000000..000003}.tar"
    full = _take(_loader(RemoteTarShardSource(expand_remote(spec), FAST)), 4)
    first = _loader(RemoteTarShardSource(expand_remote(spec), FAST))
    _take(first, 2)
    resumed = _loader(RemoteTarShardSource(expand_remote(spec), FAST))
    resumed.load_loader_state(first.loader_state())
    for a, b in zip(full[2:], _take(resumed, 2), strict=True):
        assert a["batch_index"] == b["batch_index"]
        assert torch.equal(a["collated_global_crops"], b["collated_global_crops"])


def test_failing_shard_is_skipped_and_counted(served):
    base, _, handler = served
    urls = expand_remote(base + "/shard-{000000..000003}.tar")
    source = RemoteTarShardSource(urls, FAST)  # indexes all four while every shard still answers
    handler.broken.add("shard-000002.tar")
    handler.flaky.clear()
    loader = _loader(source)
    skipped: dict[str, int] = {}
    keys = []
    refused_after_epoch = []
    for batch in _take(loader, 6):  # two epochs: every image of the broken shard is drawn twice
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        keys += batch["sample_keys"]
        assert len(batch["sample_keys"]) == 4
        if batch["batch_index"] == 2:
            refused_after_epoch.append(handler.refused["shard-000002.tar"])
    assert skipped.get("read_error", 0) >= 6
    assert not any(k.startswith("s2_") for k in keys)
    # The shard was given up after its retries (several concurrent read-ahead requests may each have retried);
    # in the second epoch its samples failed at once, without a single request.
    assert FAST.retries + 1 <= refused_after_epoch[0] <= 4 * (FAST.retries + 1)
    assert handler.refused["shard-000002.tar"] == refused_after_epoch[0]
    with pytest.raises(ShardUnavailable, match="skipped after earlier failures"):
        source.read_bytes(next(i for i in range(len(source)) if source.key(i).startswith("s2_")))


def test_shard_whose_index_cannot_be_read_is_left_out(served):
    base, _, handler = served
    handler.broken.add("shard-000003.tar")
    source = RemoteTarShardSource(expand_remote(base + "/shard-{000000..000003}.tar"), FAST)
    assert len(source) == 9 and list(source.unavailable_shards) == [base + "/shard-000003.tar"]
    with pytest.raises(ValueError, match="no readable images.*FileNotFoundError"):
        RemoteTarShardSource([base + "/nope.tar"], FAST)


def test_with_retries_backs_off_exponentially_then_gives_up():
    waits: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("dropped")
        return b"ok"

    options = RemoteOptions(retries=3, backoff_s=1.0, backoff_max_s=1.5)
    assert with_retries(flaky, "x", options, sleep=waits.append) == b"ok"
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 0.75 <= waits[1] <= 1.5
    waits.clear()
    with pytest.raises(ShardUnavailable, match="failed 4 times"):
        with_retries(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "x", options, sleep=waits.append)
    assert len(waits) == 3 and max(waits) <= 1.5
    with pytest.raises(ShardUnavailable, match="FileNotFoundError"):
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "x", options, sleep=waits.append)
    assert len(waits) == 3  # permanent: no wait


def test_readahead_stays_within_budget(served):
    base, folder, _ = served
    local = open_source(str(folder / "shard-{000000..000003}.tar"))
    budget = int(local.sizes[:3].sum())
    source = RemoteTarShardSource(expand_remote(base + "/shard-{000000..000003}.tar"),
                                  RemoteOptions(retries=4, backoff_s=0.001, readahead_bytes=budget))
    source.prefetch(range(len(source)))
    assert len(source._ahead) == 3 and source._ahead_bytes <= budget
    for i in [0, 1, 2, 7]:
        assert source.read_bytes(i) == local.read_bytes(i)
    assert source._ahead_bytes == 0
    source.prefetch([5, 6])
    source.prefetch(range(7, 12))  # the unread 5 and 6 make room for the new batch's first images
    assert 5 not in source._ahead and list(source._ahead)[0] == 7 and source._ahead_bytes <= budget
    source.close()
    assert source._ahead_bytes == 0 and source.read_bytes(9) == local.read_bytes(9)
