"""Ingest stage: folders, `.tar`/WebDataset shards, file lists -> manifest (id, source, path/member, size, sha256).

Every entry a source names gets a row, accepted or rejected with a reason; one bad entry never stops the listing.
Folders are walked with `dinov2.io.files.walk_folder` (no loops, each file once, FIFOs/sockets/devices never
opened); every regular file is listed, and one without an image suffix is sniffed when its bytes are read (content
that is no image: `not_an_image`). Paths and member names that are not UTF-8 are stored escaped
(`dinov2.io.files.escape_name`) and unescaped by `read_item_bytes`, so nothing is lost and the manifest stays text.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig
from data_pipeline.core.stage import Stage, StageContext, reject_counts
from dinov2.io.files import (
    MAX_FILE_BYTES,
    UnsafeFile,
    check_regular,
    escape_name,
    open_regular,
    read_regular,
    unescape_name,
    walk_folder,
)
from dinov2.io.images import IMAGE_SUFFIXES, SNIFF_BYTES, sniff_format

LIST_COLUMNS = ("path", "uri", "url")
# What a broken tar raises besides TarError: gzip/bz2/xz streams cut short or corrupt.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)

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
    return hashlib.sha256(f"{source}\0{escape_name(locator)}".encode()).hexdigest()[:16]


def _row(source: str, locator: str, path: str, member: str | None, nbytes: int, reason: str = "",
         mtime_ns: int = 0) -> dict:
    return {
        "id": stable_id(source, locator),
        "source": source,
        "path": escape_name(path),
        "member": None if member is None else escape_name(member),
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


class _OpenTar:
    """A tar read through a checked regular-file handle; `close` closes both (tarfile leaves a given file open)."""

    def __init__(self, path: str) -> None:
        self.file = open_regular(path)
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r:*")
        except BaseException:
            self.file.close()
            raise

        self.members: dict[str, tarfile.TarInfo] = {}
        self.at_end = False

    def member(self, name: str) -> tarfile.TarInfo:
        """The member called `name`, reading headers only as far as it (`getmember` reads them all, so a tar cut
        after the member would lose it too)."""
        while name not in self.members and not self.at_end:
            info = self.tar.next()
            if info is None:
                self.at_end = True
            else:
                self.members.setdefault(info.name, info)
        if name not in self.members:
            raise KeyError(f"no member {name!r}")
        return self.members[name]

    def close(self) -> None:
        self.tar.close()
        self.file.close()


def _list_tar(source: str, tar_path: Path, locator: str) -> list[dict]:
    """Image members of one tar; a tar that cannot be read is one rejected row, a truncated one keeps what it has
    and adds a `truncated_tar` row for what was lost after the cut."""
    reason, st = check_regular(tar_path)
    if reason:
        return [_row(source, locator, str(tar_path), None, 0, "missing_file" if reason == "missing" else reason)]
    try:
        opened = _OpenTar(str(tar_path))
    except _TAR_ERRORS as exc:
        reason = "unreadable" if isinstance(exc, PermissionError) else "not_a_tar"
        return [_row(source, locator, str(tar_path), None, st.st_size, reason, st.st_mtime_ns)]
    rows = []
    try:
        for info in opened.tar:
            if info.isdir() or not info.name.lower().endswith(IMAGE_SUFFIXES) and not unsafe_member_reason(info):
                continue  # non-image members of a sample (.json, .cls) are metadata, not images
            reason = unsafe_member_reason(info) or ("too_large" if info.size > MAX_FILE_BYTES else "")
            rows.append(_row(source, f"{locator}::{info.name}", str(tar_path), info.name, info.size, reason,
                             st.st_mtime_ns))
    except _TAR_ERRORS:
        rows.append(_row(source, locator, str(tar_path), None, st.st_size, "truncated_tar", st.st_mtime_ns))
    finally:
        opened.close()
    return rows


def _list_file(source: str, locator: str, path: Path) -> list[dict]:
    if path.suffix.lower() == ".tar":
        return _list_tar(source, path, locator)
    reason, st = check_regular(path)
    if reason:
        return [_row(source, locator, str(path), None, 0, "missing_file" if reason == "missing" else reason)]
    return [_row(source, locator, str(path), None, st.st_size, mtime_ns=st.st_mtime_ns)]


def _read_list(list_path: Path) -> list[str]:
    if list_path.suffix.lower() == ".parquet":
        table = pq.read_table(list_path)
        col = next((c for c in LIST_COLUMNS if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{list_path}: file list needs one of the columns {list(LIST_COLUMNS)}")
        return [str(v) for v in table.column(col).to_pylist() if v]
    lines = (os.fsdecode(raw.strip()) for raw in read_regular(list_path).splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _list_folder(source: str, root: Path) -> list[dict]:
    rows = []
    for entry in walk_folder(root, with_stat=True):
        path = Path(entry.path)
        if entry.reason:
            rows.append(_row(source, entry.rel, entry.path, None, 0, entry.reason))
        elif entry.rel.lower().endswith(".tar"):
            rows.extend(_list_tar(source, path, entry.rel))
        else:
            rows.append(_row(source, entry.rel, entry.path, None, entry.size, mtime_ns=entry.mtime_ns))
    return rows


def list_source(source: str) -> list[dict]:
    """All items of one source, in a deterministic order; unsafe or unreadable entries come back rejected."""
    root = Path(source)
    if root.is_dir():
        return _list_folder(source, root)
    if check_regular(root)[0]:
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
    """Bytes of a file or of a (validated) tar member, as named in a manifest (escaped names are unescaped).

    Only regular files are opened and every read is bounded by `MAX_FILE_BYTES`; `cache` keeps tars open within
    one shard (its values have `close()`).

    Raises:
        UnsafeFile: not a regular file, or too large.
        OSError, tarfile.TarError, KeyError: unreadable.
    """
    path = unescape_name(path)
    if member is None:
        return read_regular(path, MAX_FILE_BYTES)
    cache = {} if cache is None else cache
    if path not in cache:
        cache[path] = _OpenTar(path)
    info = cache[path].member(unescape_name(member))
    if info.size > MAX_FILE_BYTES:
        raise UnsafeFile("too_large", f"{path}::{member}", f"{info.size} bytes")
    fh = cache[path].tar.extractfile(info)
    if fh is None:
        raise OSError(f"tar member {member!r} is not a regular file")
    return fh.read()


def content_reason(path: str, member: str | None, data: bytes) -> str:
    """'' when an item may be an image; `not_an_image` when a file without an image suffix holds no image.

    Files named as images go to the decoder as they are (it names what is wrong with them); anything else is
    sniffed, so a JPEG named `.jfif` or with no extension is kept, and a text file is rejected here.
    """
    name = member if member is not None else path
    if name.lower().endswith(IMAGE_SUFFIXES) or sniff_format(data[:SNIFF_BYTES]) is not None:
        return ""
    return "not_an_image"


def checksum_shard(cfg: CurateConfig, rows: pa.Table) -> pa.Table:
    """Per-shard ingest: read each pending item's bytes, record size and sha256."""
    out, cache = rows.to_pylist(), {}
    for r in out:
        if r["status"] != "pending":
            continue
        try:
            data = read_item_bytes(r["path"], r["member"], cache)
        except UnsafeFile as exc:
            r.update(status="rejected", reject_reason=exc.reason)
            continue
        except (OSError, tarfile.TarError, KeyError, EOFError, zlib.error) as exc:
            r.update(status="rejected", reject_reason=f"unreadable:{type(exc).__name__}")
            continue
        reason = content_reason(r["path"], r["member"], data)
        r.update(nbytes=len(data), sha256=hashlib.sha256(data).hexdigest(), status="rejected" if reason else "ok",
                 reject_reason=reason)
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


def write_manifest(ctx: StageContext, stage: str, table: pa.Table) -> dict:
    """Write `<stage>/manifest.parquet`; its counts for stats: rows in, ok rows out, rejects by reason."""
    artifacts.write_parquet_atomic(ctx.stage_dir(stage) / "manifest.parquet", table)
    ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    return {"inputs": table.num_rows, "outputs": ok, "rejects": reject_counts(table)}


def finish_ingest(ctx: StageContext, table: pa.Table) -> dict:
    """Write `manifest.parquet`; counts for stats."""
    return write_manifest(ctx, "ingest", table)


STAGE = Stage(
    name="ingest",
    inputs=(),
    outputs=("manifest.parquet",),
    config_sections=("ingest",),
    plan=plan_ingest,
    finish=finish_ingest,
    map_shard=checksum_shard,
    reject_item=reject_rows,
)
