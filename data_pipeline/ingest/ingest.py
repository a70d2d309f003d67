"""Ingest stage: folders, `.tar`/WebDataset shards, file lists -> manifest (id, source, path/member, size, sha256)."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig
from data_pipeline.core.stage import Stage, StageContext, reject_counts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
LIST_COLUMNS = ("path", "uri", "url")

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("member", pa.string()),
        ("nbytes", pa.int64()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("reject_reason", pa.string()),
    ]
)


# The plan also carries each file's modification time, so that a file rewritten in place (same size, new bytes)
# changes the ingest fingerprint and is re-read; the manifest itself stays free of mtimes (byte-stable copies).
PLAN_SCHEMA = MANIFEST_SCHEMA.append(pa.field("mtime_ns", pa.int64()))


def stable_id(source: str, locator: str) -> str:
    """16-hex id from the source spec and the item's location inside it (independent of content and run)."""
    return hashlib.sha256(f"{source}\0{locator}".encode()).hexdigest()[:16]


def _row(source: str, locator: str, path: str, member: str | None, nbytes: int, reason: str = "",
         mtime_ns: int = 0) -> dict:
    return {
        "id": stable_id(source, locator),
        "source": source,
        "path": path,
        "member": member,
        "nbytes": nbytes,
        "sha256": "",
        "status": "rejected" if reason else "pending",
        "reject_reason": reason,
        "mtime_ns": mtime_ns,
    }


def unsafe_member_reason(info: tarfile.TarInfo) -> str:
    """Why a tar member must not be read ('' if it is a safe regular file)."""
    name = info.name
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "tar_absolute_path"
    if ".." in PurePosixPath(name).parts:
        return "tar_path_traversal"
    if info.issym() or info.islnk():
        return "tar_link"
    if info.isdev() or info.isfifo():
        return "tar_device"
    if not info.isfile():
        return "tar_not_a_file"
    return ""


def _list_tar(source: str, tar_path: Path, locator: str) -> list[dict]:
    rows = []
    tar_mtime = tar_path.stat().st_mtime_ns
    with tarfile.open(tar_path, "r:*") as tf:
        for info in tf:
            if info.isdir() or not info.name.lower().endswith(IMAGE_SUFFIXES) and not unsafe_member_reason(info):
                continue  # non-image members of a sample (.json, .cls) are metadata, not images
            reason = unsafe_member_reason(info)
            rows.append(_row(source, f"{locator}::{info.name}", str(tar_path), info.name, info.size, reason,
                             tar_mtime))
    return rows


def _list_file(source: str, locator: str, path: Path) -> list[dict]:
    if path.suffix.lower() == ".tar":
        return _list_tar(source, path, locator)
    if path.is_symlink():
        return [_row(source, locator, str(path), None, 0, "symlink")]
    if not path.is_file():
        return [_row(source, locator, str(path), None, 0, "missing_file")]
    st = path.stat()
    return [_row(source, locator, str(path), None, st.st_size, mtime_ns=st.st_mtime_ns)]


def _read_list(list_path: Path) -> list[str]:
    if list_path.suffix.lower() == ".parquet":
        table = pq.read_table(list_path)
        col = next((c for c in LIST_COLUMNS if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{list_path}: file list needs one of the columns {list(LIST_COLUMNS)}")
        return [str(v) for v in table.column(col).to_pylist() if v]
    return [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def list_source(source: str) -> list[dict]:
    """All items of one source, in a deterministic order; unsafe or unreadable entries come back rejected."""
    root = Path(source)
    if root.is_dir():
        rows = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                if fn.lower().endswith(IMAGE_SUFFIXES + (".tar",)):
                    rows.extend(_list_file(source, str(p.relative_to(root)), p))
        return rows
    if not root.is_file():
        raise ValueError(f"ingest.sources: {source!r} is neither a folder, a .tar, nor a file list")
    if root.suffix.lower() == ".tar":
        return _list_tar(source, root, "")
    rows = []
    for entry in _read_list(root):
        if "://" in entry and not entry.startswith("file://"):
            rows.append(_row(source, entry, entry, None, 0, "unsupported_uri"))
            continue
        p = Path(entry.removeprefix("file://"))
        p = p if p.is_absolute() else root.parent / p
        rows.extend(_list_file(source, entry, p))
    return rows


def read_item_bytes(path: str, member: str | None, cache: dict | None = None) -> bytes:
    """Bytes of a file or of a (validated) tar member; `cache` keeps tar files open within one shard."""
    if member is None:
        return Path(path).read_bytes()
    cache = {} if cache is None else cache
    if path not in cache:
        cache[path] = tarfile.open(path, "r:*")
    fh = cache[path].extractfile(member)
    if fh is None:
        raise OSError(f"tar member {member!r} is not a regular file")
    return fh.read()


def hash_shard(cfg: CurateConfig, rows: pa.Table) -> pa.Table:
    """Per-shard ingest: read each pending item's bytes, record size and sha256."""
    out, cache = rows.to_pylist(), {}
    for r in out:
        if r["status"] != "pending":
            continue
        try:
            data = read_item_bytes(r["path"], r["member"], cache)
        except (OSError, tarfile.TarError, KeyError) as exc:
            r.update(status="rejected", reject_reason=f"unreadable:{type(exc).__name__}")
            continue
        r.update(nbytes=len(data), sha256=hashlib.sha256(data).hexdigest(), status="ok")
    for tf in cache.values():
        tf.close()
    return pa.Table.from_pylist(out, schema=MANIFEST_SCHEMA)


def reject_rows(rows: pa.Table, reason: str) -> pa.Table:
    """Result rows for items whose worker died: rejected with `reason`."""
    out = [{**r, "status": "rejected", "reject_reason": reason} for r in rows.to_pylist()]
    return pa.Table.from_pylist(out, schema=MANIFEST_SCHEMA)


def plan_ingest(ctx: StageContext) -> pa.Table:
    """Listing of every configured source, in config order, then path/member order."""
    if not ctx.cfg.ingest.sources:
        raise ValueError("ingest.sources is empty: give at least one folder, .tar or file list")
    rows = [r for s in ctx.cfg.ingest.sources for r in list_source(s)]
    seen, unique = set(), []
    for r in rows:  # a path listed twice is one item
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append(r)
    return pa.Table.from_pylist(unique, schema=PLAN_SCHEMA)


def finish_ingest(ctx: StageContext, table: pa.Table) -> dict:
    """Write `manifest.parquet`; counts for stats."""
    artifacts.write_parquet_atomic(ctx.stage_dir("ingest") / "manifest.parquet", table)
    ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    return {"inputs": table.num_rows, "outputs": ok, "rejects": reject_counts(table)}


STAGE = Stage(
    name="ingest",
    inputs=(),
    outputs=("manifest.parquet",),
    config_sections=("ingest",),
    plan=plan_ingest,
    finish=finish_ingest,
    map_shard=hash_shard,
    reject_item=reject_rows,
)
