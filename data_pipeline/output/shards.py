"""Stage "shards": the selected images as deterministic WebDataset tars plus a wids-style `index.json`.

Layout of `D/shards/`:
    <prefix>-000000.tar ...   samples `<key>.<ext>` (image) and `<key>.json` (metadata), adjacent, in webdataset's
                              member order (extensions sorted)
    <prefix>-000000_stats.json  per-shard sidecar: member list, size, md5, where the next shard starts (resume)
    index.json                wids-shard-index-v1 (`shardlist` of {url, nsamples, filesize, md5sum}) + totals

Sample order is a seeded global shuffle: position = `numpy.random.Generator(PCG64(cfg.seed)).permutation` of the
selected rows (sorted by row_id, sha256, id), so a sequential reader sees a mixed stream and the same seed gives the
same tars. (Seeds outside the pool share row_id -1 and ids hash the source path: content orders them first, so the
same crawl and seeds at another path give the same sample order.)
Tars are written by webdataset's `TarWriter` and are byte-deterministic: USTAR headers, mtime 0, uid/gid 0, empty
user/group names, mode 0o444, fixed member order. (Its `ShardWriter` is not used: it checks its limits after a
sample is added, and it cannot resume.) Shards are written one after another (a shard's end depends on the bytes of
the samples before it); each is written atomically (`dinov2.io.atomic`), then its sidecar is written, so a killed
run resumes after the last shard whose sidecar matches the tar on disk and rewrites the rest identically.

Samples hold the original bytes under the extension of their decoded format (`.jpg`, `.png`, `.webp`, ...), checked
against the ingest sha256; with `shards.reencode` they are decoded safely (EXIF orientation applied), downscaled to
`shards.max_side` and stored as `.jpg`. Reads and encodes run ahead in `executor.workers` threads (0 = all cores);
the output does not depend on the thread count. Items that cannot be written are skipped and counted by reason
(`unreadable`, `bytes_changed`, or decode's reasons); a run where nothing at all can be written fails uncommitted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
from PIL import Image

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.ingest.decode import DecodeReject, decode_rgb, open_untrusted, time_limit
from data_pipeline.ingest.ingest import read_item_bytes
from dinov2.io.atomic import atomic_path

SELECTED_COLUMNS = ("row_id", "id", "source", "path", "member", "width", "height", "nbytes", "sha256", "cluster",
                    "reasons")
# Pillow format name -> file extension of the stored original bytes.
EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
INDEX_KIND = "wids-shard-index-v1"
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to a multiple of its record size
_MAX_KEY = 64
_OPEN_TARS = 16
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class SkipItem(Exception):
    """A selected item that cannot be written; `reason` is counted in the stage's rejects."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sanitize_key(item_id: str) -> str:
    """A WebDataset key for an id: only `[A-Za-z0-9_-]` (readers split the member name at its first dot), and at most
    64 characters (long ids are cut and suffixed with a digest of the full id so they stay distinct)."""
    key = _UNSAFE_KEY_CHARS.sub("_", item_id) or "_"
    if len(key) > _MAX_KEY:
        key = key[: _MAX_KEY - 17] + "_" + hashlib.sha256(item_id.encode()).hexdigest()[:16]
    return key


def unique_keys(ids: list[str]) -> list[str]:
    """Sanitised keys, made unique in list order by a `_<n>` suffix when two ids sanitise to the same key."""
    seen: set[str] = set()
    out = []
    for item_id in ids:
        base = key = sanitize_key(item_id)
        n = 1
        while key in seen:
            key = f"{base}_{n}"
            n += 1
        seen.add(key)
        out.append(key)
    return out


def shard_name(prefix: str, index: int) -> str:
    """File name of shard `index`, e.g. `curated-000012.tar`."""
    return f"{prefix}-{index:06d}.tar"


def _sidecar(stage_dir: Path, prefix: str, index: int) -> Path:
    return stage_dir / f"{prefix}-{index:06d}_stats.json"


def member_bytes(size: int) -> int:
    """Bytes one tar member of `size` data bytes takes: a 512-byte header plus the data padded to 512."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def tar_file_size(payload: int) -> int:
    """Final size of a tar whose members take `payload` bytes: two zero end blocks, padded to the record size."""
    return -(-(payload + 2 * _BLOCK) // _RECORD) * _RECORD


def plan_shards(ctx: StageContext) -> pa.Table:
    """retrieve/selected.parquet (sorted by row_id, sha256, id) plus `key` (sanitised, unique) and `order` (the sample's
    position in the shards: a permutation seeded by `cfg.seed`, so the seed enters the fingerprint via the plan)."""
    cfg = ctx.cfg.shards
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", cfg.prefix):
        raise ValueError(f"shards.prefix must be a plain file name prefix ([A-Za-z0-9_.-]), got {cfg.prefix!r}")
    if cfg.max_side and not cfg.reencode:
        raise ValueError("shards.max_side needs shards.reencode=true (original bytes are never resized)")
    table = artifacts.read_table(ctx.require("retrieve") / "selected.parquet")
    missing = [c for c in SELECTED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"retrieve/selected.parquet lacks columns {missing}")
    table = table.select(list(SELECTED_COLUMNS)).sort_by([("row_id", "ascending"), ("sha256", "ascending"),
                                                          ("id", "ascending")])
    n = table.num_rows
    perm = np.random.Generator(np.random.PCG64(ctx.cfg.seed)).permutation(n)
    order = np.empty(n, dtype=np.int64)
    order[perm] = np.arange(n, dtype=np.int64)
    table = table.append_column("key", pa.array(unique_keys(table.column("id").to_pylist()), pa.string()))
    return table.append_column("order", pa.array(order, pa.int64()))


def _read_bytes(row: dict, tars: dict) -> bytes:
    try:
        data = read_item_bytes(row["path"], row["member"], tars)
    except (OSError, KeyError, tarfile.TarError):
        raise SkipItem("unreadable") from None
    finally:
        while len(tars) > _OPEN_TARS:  # bound open source tars; the oldest opened goes first
            tars.pop(next(iter(tars))).close()
    if row["sha256"] and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise SkipItem("bytes_changed")
    return data


def encode_sample(cfg: CurateConfig, row: dict, data: bytes) -> tuple[str, bytes, int, int]:
    """The image member of one sample.

    Default: the original bytes, extension from the format found in the header (safe open, same limits as decode).
    With `shards.reencode`: full safe decode (EXIF orientation applied), optional downscale so that the longer side is
    at most `shards.max_side`, JPEG at `shards.quality`.

    Returns:
        (extension, bytes, width, height) of the stored image.

    Raises:
        SkipItem: with the decode reject reason, or `unsupported_format`.
    """
    sc = cfg.shards
    try:
        if not sc.reencode:
            with time_limit(cfg.decode.item_timeout_s):
                fmt = open_untrusted(data, cfg.decode).format or ""
            if fmt not in EXT_BY_FORMAT:
                raise SkipItem("unsupported_format")
            return EXT_BY_FORMAT[fmt], data, row["width"], row["height"]
        rgb, _, _ = decode_rgb(data, cfg.decode)
    except DecodeReject as exc:
        raise SkipItem(exc.reason) from None
    im = Image.fromarray(rgb)
    w, h = im.size
    if sc.max_side and max(w, h) > sc.max_side:
        scale = sc.max_side / max(w, h)
        # reducing_gap: integer box-reduce first for large factors (fast), LANCZOS for the rest (quality).
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=sc.quality)
    return "jpg", buf.getvalue(), im.size[0], im.size[1]


def sample_json(row: dict, width: int, height: int) -> bytes:
    """The `.json` member: id, key, row_id, source, path, member, stored width/height, original sha256, cluster and
    the selection reasons (parsed from retrieve's JSON string), with sorted keys."""
    meta = {
        "id": row["id"],
        "key": row["key"],
        "row_id": row["row_id"],
        "source": row["source"],
        "path": row["path"],
        "member": row["member"],
        "width": width,
        "height": height,
        "sha256": row["sha256"],
        "cluster": row["cluster"],
        "reasons": json.loads(row["reasons"]) if row["reasons"] else [],
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


class _HashingFile:
    """Write-only file wrapper that tracks md5 and position while the tar streams into it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.md5, self.pos = fh, hashlib.md5(usedforsecurity=False), 0  # wids index checksum

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.md5.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


class _ShardWriter:
    """One shard streamed into an open file by webdataset's `TarWriter`, with fixed member metadata (mtime 0,
    uid/gid 0, empty user and group names, mode 0o444) so that the same samples always give the same bytes."""

    def __init__(self, fh: BinaryIO) -> None:
        # Imported here: webdataset imports torch (3 GB of address space), and the CLI's process-pool workers, which
        # fork from a server that imports this module, run under an address-space cap (decode.worker_memory_mb).
        import webdataset as wds

        self.out = _HashingFile(fh)
        self.tar = wds.TarWriter(self.out, user="", group="", mode=0o444, mtime=0, encoder=False)
        self.keys: list[str] = []
        self.payload = 0

    def add(self, key: str, ext: str, image: bytes, meta: bytes) -> None:
        self.tar.write({"__key__": key, ext: image, "json": meta})
        self.payload += member_bytes(len(image)) + member_bytes(len(meta))
        self.keys.append(key)

    def close(self) -> dict:
        """Finish the tar; returns its sidecar fields (nsamples, filesize, md5sum, members in tar order)."""
        members = self.tar.tarstream.getnames()
        self.tar.close()
        assert self.out.pos == tar_file_size(self.payload), "tar size differs from the shard-limit accounting"
        return {"nsamples": len(self.keys), "filesize": self.out.pos, "md5sum": self.out.md5.hexdigest(),
                "members": members}


def _tar_members(path: Path) -> list[str] | None:
    try:
        with tarfile.open(path, "r:") as tf:
            return tf.getnames()
    except (OSError, tarfile.TarError):
        return None


def resume_point(stage_dir: Path, prefix: str) -> list[dict]:
    """Sidecars of the leading shards that are complete on disk (tar size and member list match its sidecar).

    Everything after the first mismatch (and stray temp files) is deleted, to be rewritten.
    """
    done: list[dict] = []
    while True:
        side_path = _sidecar(stage_dir, prefix, len(done))
        tar_path = stage_dir / shard_name(prefix, len(done))
        if not (side_path.is_file() and tar_path.is_file()):
            break
        side = json.loads(side_path.read_text())
        if tar_path.stat().st_size != side["filesize"] or _tar_members(tar_path) != side["members"]:
            break
        done.append(side)
    pattern = re.compile(re.escape(prefix) + r"-(\d{6})(\.tar|_stats\.json)$")
    for p in stage_dir.iterdir():
        m = pattern.match(p.name)
        if (m and int(m.group(1)) >= len(done)) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink()
    return done


class _Rows:
    """Row dicts of a table by index, converted one chunk at a time (a selection can hold 10^8 rows)."""

    def __init__(self, table: pa.Table, chunk: int = 4096) -> None:
        self.table, self.chunk, self.base, self.rows = table, chunk, -1, []

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        base = i - i % self.chunk
        if base != self.base:
            self.base, self.rows = base, self.table.slice(base, self.chunk).to_pylist()
        return self.rows[i - base]


class _SampleStream:
    """Prepared samples of `rows[start:]`, in row order, skipped rows counted by reason in `rejects`.

    With `threads` > 1, reads and encodes run ahead in a thread pool (file reads, hashing and Pillow's codecs release
    the GIL); each thread keeps its own open source tars. Only the main thread has decode's SIGALRM time limit, which
    matters little here: the decode stage already timed every selected image.
    """

    def __init__(self, cfg: CurateConfig, rows: _Rows, start: int, threads: int) -> None:
        self.cfg, self.rows, self.submitted = cfg, rows, start
        self.rejects: dict[str, int] = {}
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.depth = 4 * threads
        self.window: deque = deque()
        self.local = threading.local()
        self.caches: list[dict] = []

    def _prepare(self, row: dict) -> tuple | str:
        tars = getattr(self.local, "tars", None)
        if tars is None:
            tars = self.local.tars = {}
            self.caches.append(tars)
        try:
            ext, image, w, h = encode_sample(self.cfg, row, _read_bytes(row, tars))
        except SkipItem as exc:
            return exc.reason
        return row, ext, image, sample_json(row, w, h)

    def next(self) -> tuple[int, tuple]:
        """(index, (row, ext, image, meta)) of the next writable row; (len(rows), ()) when none is left."""
        n = len(self.rows)
        while True:
            if self.pool is not None:
                while len(self.window) < self.depth and self.submitted < n:
                    self.window.append((self.submitted, self.pool.submit(self._prepare, self.rows[self.submitted])))
                    self.submitted += 1
                if not self.window:
                    return n, ()
                i, future = self.window.popleft()
                result = future.result()
            else:
                if self.submitted >= n:
                    return n, ()
                i, result = self.submitted, self._prepare(self.rows[self.submitted])
                self.submitted += 1
            if isinstance(result, str):
                self.rejects[result] = self.rejects.get(result, 0) + 1
                continue
            return i, result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for tars in self.caches:
            for tf in tars.values():
                tf.close()


def write_shards(ctx: StageContext, table: pa.Table) -> list[dict]:
    """Write (or resume) the shards for the plan `table`.

    Returns:
        One dict per shard, in order (its sidecar: url, nsamples, filesize, md5sum, members, keys, start/end positions
        in the shuffled rows, rejects among them), plus a final `url=None` entry when rows after the last written
        sample were all skipped.
    """
    sc = ctx.cfg.shards
    stage_dir = ctx.stage_dir("shards")
    rows = _Rows(table.sort_by("order"))
    done = resume_point(stage_dir, sc.prefix)
    start = done[-1]["end"] if done else 0
    stream = _SampleStream(ctx.cfg, rows, start, ctx.cfg.executor.workers or os.cpu_count() or 1)
    try:
        # `sample` is the next writable row, read ahead so that a shard's limits can be checked before adding it.
        cursor, sample = stream.next()
        while sample:
            path = stage_dir / shard_name(sc.prefix, len(done))
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                writer = _ShardWriter(fh)
                while sample:
                    row, ext, image, meta = sample
                    size = member_bytes(len(image)) + member_bytes(len(meta))
                    # Close before a sample that would break a limit; a lone oversize sample still gets a shard.
                    if writer.keys and (len(writer.keys) + 1 > sc.max_count
                                        or tar_file_size(writer.payload + size) > sc.max_bytes):
                        break
                    writer.add(row["key"], ext, image, meta)
                    cursor, sample = stream.next()
                side = writer.close()
            # Rows skipped before `cursor` (the next shard's first sample) belong to this shard's range.
            side.update(url=path.name, start=start, end=cursor, rejects=stream.rejects, keys=writer.keys)
            artifacts.write_json_atomic(_sidecar(stage_dir, sc.prefix, len(done)), side)
            done.append(side)
            start, stream.rejects = cursor, {}
    finally:
        stream.close()
    if stream.rejects:
        done.append({"url": None, "start": start, "end": len(rows), "rejects": stream.rejects})
    return done


def finish_shards(ctx: StageContext, table: pa.Table) -> dict:
    """Write the shards and `index.json`; counts: inputs (selected), outputs (samples written), shards, bytes, rejects
    (skipped items by reason)."""
    sc = ctx.cfg.shards
    sides = write_shards(ctx, table)
    shards = [s for s in sides if s["url"] is not None]
    rejects: dict[str, int] = {}
    for s in sides:
        for reason, n in s["rejects"].items():
            rejects[reason] = rejects.get(reason, 0) + n
    shardlist = [{k: s[k] for k in ("url", "nsamples", "filesize", "md5sum")} for s in shards]
    nsamples = sum(s["nsamples"] for s in shards)
    if table.num_rows and not nsamples:
        # Nothing readable at all points at the environment (sources moved or unmounted), not at the data.
        raise RuntimeError(f"shards: none of the {table.num_rows} selected images could be written: {rejects}")
    total = sum(s["filesize"] for s in shards)
    pattern = f"{sc.prefix}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else ""
    index = {
        "__kind__": INDEX_KIND,
        "wids_version": 1,
        "name": sc.prefix,
        "shardlist": shardlist,
        "pattern": pattern,
        "nshards": len(shards),
        "nsamples": nsamples,
        "total_bytes": total,
        "selected": table.num_rows,
        "rejects": dict(sorted(rejects.items())),
        "order": f"seeded permutation of selected rows sorted by (row_id, sha256, id), PCG64 seed {ctx.cfg.seed}",
        "reencode": sc.reencode,
    }
    artifacts.write_json_atomic(ctx.stage_dir("shards") / "index.json", index)
    return {"inputs": table.num_rows, "outputs": nsamples, "shards": len(shards), "bytes": total,
            "rejects": dict(sorted(rejects.items()))}


STAGE = Stage(
    name="shards",
    inputs=("retrieve",),
    outputs=("index.json",),
    config_sections=("shards", "decode", "seed"),
    plan=plan_shards,
    finish=finish_shards,
    rules=1,  # 1: order (row_id, sha256, id) (was: row_id, id)
)
