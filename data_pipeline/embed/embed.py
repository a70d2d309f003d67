"""Embedding stages: copy-detection descriptors (`embed_copy`) and SSL descriptors (`embed_ssl`) of the pool and of
the evaluation / seed sets, as float16 L2-normalised `.npy` arrays aligned with a rows table.

Both are whole-table stages that resume on their own: items are embedded in chunks of `embed.chunk_size` rows,
each chunk written atomically under `D/<stage>/_work/` and skipped when it exists, then assembled into the final
arrays. Loader worker processes read, decode (`decode_rgb`: allowlist, pixel limit, EXIF orientation) and preprocess
while the main process runs the model.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, DecodeConfig, EmbedConfig, parse_eval_set
from data_pipeline.core.lifeline import die_with_parent
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.ingest.decode import DecodeReject, decode_rgb
from data_pipeline.ingest.ingest import list_source, read_item_bytes
from dinov2.io.atomic import atomic_path

if TYPE_CHECKING:  # torch loads only when a stage embeds: curation workers re-import the CLI module under a
    import torch  # memory cap, and a CUDA build of torch maps gigabytes of address space
    from torch.utils.data import DataLoader

    from data_pipeline.embed.embedders import Embedder

POOL = "pool"
WORK = "_work"
# Fault injection for resume tests: SIGKILL this process after writing that many chunk files.
KILL_AFTER_CHUNKS_ENV = "DP_EMBED_KILL_AFTER_CHUNKS"
# Pending (decoded, not yet embedded) images are capped at this many batches; the cap bounds memory when image
# sizes vary and same-size buckets fill slowly.
MAX_PENDING_BATCHES = 4

PLAN_SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("row_id", pa.int64()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("member", pa.string()),
        ("status", pa.string()),
        ("reject_reason", pa.string()),
        ("mtime_ns", pa.int64()),
        ("model_sha256", pa.string()),
    ]
)
# One row per item of a chunk; the chunk's `.npy` holds the vectors of the `ok` rows, in order.
CHUNK_SCHEMA = pa.schema(
    [
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("nbytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)
SET_COLUMNS = {
    "eval": ("id", "source", "path", "member", "width", "height"),
    "seed": ("id", "source", "path", "member", "width", "height", "nbytes", "sha256"),
}
_NAME_OK = re.compile(r"^[A-Za-z0-9_.+-]+$")


def set_sources(cfg: CurateConfig, role: str) -> list[tuple[str, list[str]]]:
    """The extra sets embedded next to the pool: `eval-<name>` (copy role) or `seed-<name>` (ssl role).

    Returns:
        (set name, source specs) in config order.

    Raises:
        ValueError: on an empty or duplicate set name.
    """
    if role == "copy":
        named = [parse_eval_set(e) for e in cfg.decontaminate.eval_sets]
        out = [(f"eval-{n}", [p]) for n, p in named]
    else:
        out = []
        for k, s in enumerate(cfg.retrieve.seed_sets):
            if not _NAME_OK.match(s.name):
                raise ValueError(f"retrieve.seed_sets[{k}].name {s.name!r} must be a non-empty safe file-name fragment")
            out.append((f"seed-{s.name}", list(s.sources)))
    names = [n for n, _ in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"duplicate embedding set names: {dups}")
    return out


def load_embeddings(stage_dir: Path, name: str) -> tuple[np.ndarray, pa.Table]:
    """Vectors and rows of one set of an embed stage.

    Args:
        stage_dir: `D/embed_copy` or `D/embed_ssl`.
        name: "pool", "eval-<x>" or "seed-<x>".

    Returns:
        (float16 [n, d] memory-mapped read-only, rows table with n rows: `pool_rows.parquet` for the pool, else
        `<name>.parquet`).

    Raises:
        ValueError: when the vectors and the rows table disagree on n.
    """
    stage_dir = Path(stage_dir)
    arr = np.load(stage_dir / f"{name}.npy", mmap_mode="r")
    rows = artifacts.read_table(stage_dir / ("pool_rows.parquet" if name == POOL else f"{name}.parquet"))
    if rows.num_rows != arr.shape[0]:
        raise ValueError(f"{stage_dir}/{name}: {arr.shape[0]} vectors but {rows.num_rows} rows; re-run the stage")
    return arr, rows


# ---------------------------------------------------------------------------------------------------------------- plan


def _pool_plan(manifest: pa.Table, digest: str) -> pa.Table:
    keep = manifest.column("keep").to_numpy(zero_copy_only=False)
    rows = manifest.filter(pa.array(keep))
    n = rows.num_rows
    return pa.table(
        {
            "set": pa.array([POOL] * n, pa.string()),
            "row_id": pa.array(np.flatnonzero(keep).astype(np.int64)),
            "id": rows.column("id"),
            "source": rows.column("source"),
            "path": rows.column("path"),
            "member": rows.column("member"),
            "status": pa.array(["ok"] * n, pa.string()),
            "reject_reason": pa.array([""] * n, pa.string()),
            "mtime_ns": pa.array(np.zeros(n, np.int64)),
            "model_sha256": pa.array([digest] * n, pa.string()),
        },
        schema=PLAN_SCHEMA,
    )


def _listed_plan(set_name: str, sources: list[str], digest: str) -> pa.Table:
    seen, rows = set(), []
    for src in sources:
        for r in list_source(src):
            if r["id"] in seen:
                continue
            seen.add(r["id"])
            # File mtimes and sizes make an edited eval/seed folder change the fingerprint (as ingest does).
            rows.append({**r, "set": set_name, "row_id": -1, "model_sha256": digest})
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def make_plan(ctx: StageContext, upstream: str, role: str) -> pa.Table:
    """Pool rows (upstream keep rows, row_id order), then each extra set's listing; every row carries the model
    file's sha256, so swapping the model file changes the stage fingerprint."""
    e = ctx.cfg.embed
    path, key = (e.copy_model, "embed.copy_model") if role == "copy" else (e.ssl_model, "embed.ssl_model")
    from data_pipeline.embed.embedders import model_digest

    digest = model_digest(path, key)
    manifest = artifacts.read_table(ctx.require(upstream) / "manifest.parquet")
    parts = [_pool_plan(manifest, digest)]
    parts += [_listed_plan(name, sources, digest) for name, sources in set_sources(ctx.cfg, role)]
    return pa.concat_tables(parts)


# ------------------------------------------------------------------------------------------------------------- loading


@dataclass
class ItemDataset:
    """Items to embed: read bytes, decode safely, preprocess. Never raises for a bad item.

    `__getitem__(k)` returns (k, float32 [3, h, w] tensor or None, reject reason, width, height, nbytes, sha256).
    """

    paths: list[str]
    members: list[str | None]
    transform: Callable[[np.ndarray], torch.Tensor]
    decode_cfg: DecodeConfig
    hash_bytes: bool = False
    _tars: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple:
        try:
            data = read_item_bytes(self.paths[k], self.members[k], self._tars)
        except (OSError, tarfile.TarError, KeyError):
            return k, None, "unreadable", 0, 0, 0, ""
        sha = hashlib.sha256(data).hexdigest() if self.hash_bytes else ""
        try:
            rgb, _, _ = decode_rgb(data, self.decode_cfg)
            x = self.transform(rgb)
        except DecodeReject as exc:
            return k, None, exc.reason, 0, 0, len(data), sha
        except (ValueError, OSError, MemoryError) as exc:
            return k, None, f"error:{type(exc).__name__}", 0, 0, len(data), sha
        return k, x, "", rgb.shape[1], rgb.shape[0], len(data), sha

    def __getstate__(self) -> dict:
        # Open tar handles stay per process (each loader worker opens its own).
        return {**self.__dict__, "_tars": {}}


def _collate_list(batch: list) -> list:
    return batch


def _worker_init(_: int) -> None:
    import torch

    die_with_parent()  # a loader worker must not outlive the CLI process (see data_pipeline.core.lifeline)

    # Preprocessing is numpy/PIL; one torch thread per worker keeps the cores for the model.
    torch.set_num_threads(1)


def make_loader(dataset: ItemDataset, cfg: EmbedConfig, pin_memory: bool) -> DataLoader:
    """In-order loader yielding lists of `ItemDataset` items; `cfg.loader_workers` processes (0 = inline)."""
    from torch.utils.data import DataLoader

    workers = cfg.loader_workers
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_list,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
    )


# ------------------------------------------------------------------------------------------------------------- chunks


def chunk_paths(work_dir: Path, set_name: str, chunk: int) -> tuple[Path, Path]:
    """(vectors .npy, item table .parquet) of one chunk; a chunk is done when both exist (see `chunk_done`)."""
    stem = work_dir / f"{set_name}-chunk-{chunk:06d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".parquet")


def chunk_done(work_dir: Path, set_name: str, chunk: int) -> bool:
    """Both files of the chunk exist. The .npy is written last, but a run killed while `_work` is being deleted
    can leave an .npy whose .parquet is gone: such a chunk is embedded again."""
    return all(p.is_file() for p in chunk_paths(work_dir, set_name, chunk))


class _ChunkBuffer:
    """Items of one chunk being embedded; images of equal size are batched together (SSCD inputs vary in size)."""

    def __init__(self, chunk: int, size: int, dim: int) -> None:
        self.chunk = chunk
        self.vectors = np.zeros((size, dim), np.float32)
        self.meta = [None] * size
        self.buckets: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self.pending = 0

    def add(self, local: int, x: torch.Tensor | None, meta: tuple, embedder: Embedder, batch_size: int) -> None:
        self.meta[local] = meta
        if x is None:
            return
        bucket = self.buckets.setdefault(tuple(x.shape), [])
        bucket.append((local, x))
        self.pending += 1
        if len(bucket) >= batch_size:
            self._run(tuple(x.shape), embedder)
        if self.pending >= MAX_PENDING_BATCHES * batch_size:
            self.flush(embedder)

    def _run(self, key: tuple, embedder: Embedder) -> None:
        items = self.buckets.pop(key)
        self.pending -= len(items)
        import torch

        out = embedder.embed(torch.stack([x for _, x in items]))  # [B, d]
        self.vectors[[i for i, _ in items]] = out.numpy()

    def flush(self, embedder: Embedder) -> None:
        """Embed every pending bucket (in insertion order: deterministic for a given item order)."""
        for key in list(self.buckets):
            self._run(key, embedder)

    def write(self, work_dir: Path, set_name: str) -> None:
        ok, reason, width, height, nbytes, sha = (list(c) for c in zip(*self.meta))
        npy, parquet = chunk_paths(work_dir, set_name, self.chunk)
        table = pa.table(dict(zip(CHUNK_SCHEMA.names, (ok, reason, width, height, nbytes, sha))), schema=CHUNK_SCHEMA)
        artifacts.write_parquet_atomic(parquet, table)
        artifacts.write_npy_atomic(npy, self.vectors[np.asarray(ok, bool)].astype(np.float16))


def _close_chunk(buf: _ChunkBuffer, embedder: Embedder, work_dir: Path, set_name: str, written: int) -> int:
    buf.flush(embedder)
    buf.write(work_dir, set_name)
    written += 1
    limit = os.environ.get(KILL_AFTER_CHUNKS_ENV)
    if limit and written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
    return written


def embed_chunks(embedder: Embedder, items: pa.Table, cfg: CurateConfig, work_dir: Path, set_name: str,
                 hash_bytes: bool = False, written: int = 0) -> int:
    """Embed `items` (path, member columns) chunk by chunk into `work_dir`, skipping chunks already there.

    Returns:
        `written` plus the number of chunk files written by this call.
    """
    size = cfg.embed.chunk_size
    n = items.num_rows
    todo = [c for c in range(-(-n // size)) if not chunk_done(work_dir, set_name, c)]
    if not todo:
        return written
    index = np.concatenate([np.arange(c * size, min(n, (c + 1) * size)) for c in todo])
    paths, members = items.column("path").to_pylist(), items.column("member").to_pylist()
    dataset = ItemDataset([paths[i] for i in index], [members[i] for i in index], embedder.transform, cfg.decode,
                          hash_bytes)
    loader = make_loader(dataset, cfg.embed, pin_memory=embedder.device.type == "cuda")
    buf: _ChunkBuffer | None = None
    for batch in loader:
        for k, x, reason, w, h, nbytes, sha in batch:
            i = int(index[k])
            chunk = i // size
            if buf is None or buf.chunk != chunk:
                if buf is not None:
                    written = _close_chunk(buf, embedder, work_dir, set_name, written)
                buf = _ChunkBuffer(chunk, min(n, (chunk + 1) * size) - chunk * size, embedder.dim)
            buf.add(i - chunk * size, x, (x is not None, reason, w, h, nbytes, sha), embedder, cfg.embed.batch_size)
    if buf is not None:
        written = _close_chunk(buf, embedder, work_dir, set_name, written)
    for tf in dataset._tars.values():  # opened here only when loading ran in this process (loader_workers=0)
        tf.close()
    return written


def _write_npy_memmap(path: Path, chunks: list[Path], n: int, dim: int) -> None:
    """Concatenate chunk arrays into `path` through a memory-mapped temp file (never all in RAM), then rename."""
    if n == 0:
        artifacts.write_npy_atomic(path, np.zeros((0, dim), np.float16))
        return
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        start = 0
        for c in chunks:
            block = np.load(c)
            out[start : start + len(block)] = block
            start += len(block)
        assert start == n, (start, n)
        out.flush()
        del out  # unmapped before the rename


def assemble_set(work_dir: Path, set_name: str, n: int, chunk_size: int, dim: int, out_npy: Path) -> pa.Table:
    """Write the set's vectors to `out_npy`; returns the CHUNK_SCHEMA table of all `n` items, in order."""
    n_chunks = -(-n // chunk_size)
    pairs = [chunk_paths(work_dir, set_name, c) for c in range(n_chunks)]
    meta = pa.concat_tables([artifacts.read_table(p) for _, p in pairs]) if pairs else CHUNK_SCHEMA.empty_table()
    n_ok = int(pc.sum(meta.column("ok")).as_py() or 0)
    _write_npy_memmap(out_npy, [v for v, _ in pairs], n_ok, dim)
    return meta


# ------------------------------------------------------------------------------------------------------------- finish


def _reasons(plan_rows: pa.Table, meta: pa.Table) -> dict[str, int]:
    listed = [r for r in plan_rows.column("reject_reason").to_pylist() if r]
    failed = [r for r, ok in zip(meta.column("reason").to_pylist(), meta.column("ok").to_pylist()) if not ok]
    out: dict[str, int] = {}
    for r in listed + failed:
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))


def _set_rows(kind: str, rows: pa.Table, meta: pa.Table) -> pa.Table:
    ok = meta.column("ok")
    cols = {"id": rows.column("id"), "source": rows.column("source"), "path": rows.column("path"),
            "member": rows.column("member"), "width": meta.column("width"), "height": meta.column("height"),
            "nbytes": meta.column("nbytes"), "sha256": meta.column("sha256")}
    return pa.table({c: cols[c] for c in SET_COLUMNS[kind]}).filter(ok)


def _finish(ctx: StageContext, table: pa.Table, stage: str, role: str) -> dict:
    e = ctx.cfg.embed
    stage_dir = ctx.stage_dir(stage)
    work = stage_dir / WORK
    work.mkdir(parents=True, exist_ok=True)
    kind, path = (e.copy_kind, e.copy_model) if role == "copy" else (e.ssl_kind, e.ssl_model)
    from data_pipeline.embed.embedders import build_embedder

    embedder = build_embedder(kind, path, e, role)
    names = [POOL] + [n for n, _ in set_sources(ctx.cfg, role)]
    set_col = table.column("set")
    counts: dict = {"dim": embedder.dim, "model_sha256": embedder.fingerprint, "sets": {}}
    written = 0
    for name in names:
        rows = table.filter(pc.equal(set_col, name))
        todo = rows.filter(pc.equal(rows.column("status"), "ok" if name == POOL else "pending"))
        written = embed_chunks(embedder, todo, ctx.cfg, work, name, hash_bytes=name.startswith("seed-"),
                               written=written)
        meta = assemble_set(work, name, todo.num_rows, e.chunk_size, embedder.dim, stage_dir / f"{name}.npy")
        n_ok = meta.num_rows - int(pc.sum(pc.invert(meta.column("ok"))).as_py() or 0)
        set_counts = {"inputs": rows.num_rows, "outputs": n_ok, "rejects": _reasons(rows, meta)}
        if name == POOL:
            pool_rows = pa.table({"row_id": todo.column("row_id"), "id": todo.column("id")}).filter(meta.column("ok"))
            artifacts.write_parquet_atomic(stage_dir / "pool_rows.parquet", pool_rows)
            counts.update(set_counts)
        else:
            artifacts.write_parquet_atomic(stage_dir / f"{name}.parquet",
                                           _set_rows(name.split("-", 1)[0], todo, meta))
            counts["sets"][name] = set_counts
    # Chunks are folded into the outputs; the stage is committed right after this returns.
    shutil.rmtree(work)
    return counts


def embed_stage(role: str, upstream: str) -> Stage:
    """The stage embedding `upstream`'s keep rows and the role's extra sets (copy: the evaluation sets, ssl: the seed
    sets) with the role's model. The sets (names, files, mtimes) are rows of the plan, so only the `embed` and
    `decode` sections are its config: decontamination's or retrieval's own knobs must not re-embed the pool."""
    name = f"embed_{role}"
    return Stage(
        name=name,
        inputs=(upstream,),
        outputs=("pool.npy", "pool_rows.parquet"),
        config_sections=("embed", "decode"),
        plan=partial(make_plan, upstream=upstream, role=role),
        finish=partial(_finish, stage=name, role=role),
    )


COPY_STAGE = embed_stage("copy", upstream="near_dedup")
SSL_STAGE = embed_stage("ssl", upstream="decontaminate")

STAGES = (COPY_STAGE, SSL_STAGE)
