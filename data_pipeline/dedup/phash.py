"""Perceptual-hash stage: reduced-size JPEG decode (`draft`), batched pHash (or dHash/wHash) -> uint64 per row."""

from __future__ import annotations

import imagehash
import numpy as np
import pyarrow as pa
import scipy.fft
from PIL import Image

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, DecodeConfig
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.ingest.decode import DecodeReject, load_pixels, open_untrusted, time_limit, to_rgb
from data_pipeline.ingest.ingest import read_item_bytes

HASH_SIZE = 8
PHASH_SIDE = HASH_SIZE * 4  # imagehash's highfreq_factor=4: a 32x32 thumbnail
FLAG_HASHED, FLAG_DEGENERATE = 1, 2

PART_SCHEMA = pa.schema([("row_id", pa.int64()), ("hash", pa.uint64()), ("flags", pa.uint8())])


def gray_thumbnail(data: bytes, cfg: DecodeConfig, draft_side: int, side: int = PHASH_SIDE) -> Image.Image:
    """Untrusted bytes -> grey `side`x`side` LANCZOS thumbnail, as `imagehash.phash` builds it.

    With `draft_side` > 0, JPEGs are decoded at a reduced size by libjpeg DCT scaling (1/2, 1/4 or 1/8, keeping
    at least `draft_side` pixels per side); other formats are decoded fully. Raises DecodeReject.
    """
    with time_limit(cfg.item_timeout_s):
        img = open_untrusted(data, cfg)
        if draft_side and img.format == "JPEG" and img.mode in ("L", "RGB"):
            img.draft("L", (draft_side, draft_side))
        img = load_pixels(img)
        # Pillow's own L conversion for L/RGB matches the naive loop bit for bit; other modes need to_rgb first.
        gray = img.convert("L") if img.mode in ("L", "RGB") else Image.fromarray(to_rgb(img)).convert("L")
        return gray.resize((side, side), Image.Resampling.LANCZOS)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool [B, 64] (row-major hash bits) -> uint64 [B] equal to `int(str(imagehash_hash), 16)`."""
    return np.packbits(bits.astype(np.uint8), axis=1).view(">u8").astype(np.uint64).reshape(-1)


def phash_batch(thumbs: np.ndarray) -> np.ndarray:
    """Batched pHash, bit-identical to `imagehash.phash` on the same 32x32 grey thumbnails.

    Args:
        thumbs: uint8 [B, 32, 32].

    Returns:
        uint64 [B].
    """
    x = thumbs.astype(np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(x, axis=1), axis=2)[:, :HASH_SIZE, :HASH_SIZE]  # [B, 8, 8]
    med = np.median(dct.reshape(len(x), -1), axis=1)
    return pack_bits((dct > med[:, None, None]).reshape(len(x), -1))


def hash_one(gray: Image.Image, method: str) -> int:
    """dHash / wHash of one grey image through imagehash (whash at a fixed 64 px scale: cost independent of size)."""
    if method == "dhash":
        h = imagehash.dhash(gray, HASH_SIZE)
    else:
        h = imagehash.whash(gray, HASH_SIZE, image_scale=64)
    return int(str(h), 16)


def is_degenerate(hashes: np.ndarray) -> np.ndarray:
    """bool [B]: near-constant hashes (popcount <= 8 or >= 56) that blank images share by the thousand."""
    pop = np.unpackbits(hashes.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
    return (pop <= 8) | (pop >= 56)


def hash_images(datas: list[bytes], cfg: CurateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Hash a batch of encoded images.

    Returns:
        (uint64 [B] hashes, uint8 [B] flags: FLAG_HASHED | FLAG_DEGENERATE); undecodable items get flags 0.
    """
    method = cfg.hash.method
    side = PHASH_SIDE if method == "phash" else 64
    thumbs, ok = [], np.zeros(len(datas), dtype=bool)
    for k, data in enumerate(datas):
        try:
            thumbs.append(gray_thumbnail(data, cfg.decode, cfg.hash.draft_side, side))
            ok[k] = True
        except DecodeReject:
            pass
    hashes = np.zeros(len(datas), dtype=np.uint64)
    if thumbs:
        if method == "phash":
            hashes[ok] = phash_batch(np.stack([np.asarray(t) for t in thumbs]))
        else:
            hashes[ok] = np.array([hash_one(t, method) for t in thumbs], dtype=np.uint64)
    flags = ok.astype(np.uint8) * FLAG_HASHED
    flags[ok & is_degenerate(hashes)] |= FLAG_DEGENERATE
    return hashes, flags


def hash_shard(cfg: CurateConfig, rows: pa.Table) -> pa.Table:
    """Per-shard hashing of the rows kept by exact dedup (others get hash 0, flags 0)."""
    todo = [r for r in rows.to_pylist() if r["keep"]]
    cache: dict = {}
    datas = []
    for r in todo:
        try:
            datas.append(read_item_bytes(r["path"], r["member"], cache))
        except OSError:
            datas.append(b"")  # vanished since decode: left unhashed
    for tf in cache.values():
        tf.close()
    hashes, flags = hash_images(datas, cfg)
    by_row = {r["row_id"]: (int(h), int(f)) for r, h, f in zip(todo, hashes, flags)}
    row_ids = rows.column("row_id").to_pylist()
    return pa.table(
        {
            "row_id": pa.array(row_ids, pa.int64()),
            "hash": pa.array([by_row.get(r, (0, 0))[0] for r in row_ids], pa.uint64()),
            "flags": pa.array([by_row.get(r, (0, 0))[1] for r in row_ids], pa.uint8()),
        },
        schema=PART_SCHEMA,
    )


def reject_hash(rows: pa.Table, reason: str) -> pa.Table:
    """Rows whose hashing worker died: not hashed (they stay in the pool, unsearched)."""
    zeros = [0] * rows.num_rows
    cols = {"row_id": rows.column("row_id"), "hash": pa.array(zeros, pa.uint64()), "flags": pa.array(zeros, pa.uint8())}
    return pa.table(cols, schema=PART_SCHEMA)


def plan_phash(ctx: StageContext) -> pa.Table:
    """(row_id, path, member, keep) from the exact-dedup manifest."""
    t = artifacts.read_table(ctx.stage_dir("exact_dedup") / "manifest.parquet").select(["path", "member", "keep"])
    return t.add_column(0, "row_id", pa.array(np.arange(t.num_rows, dtype=np.int64)))


def finish_phash(ctx: StageContext, table: pa.Table) -> dict:
    """Write `phash.npy` (uint64 [n]) and `phash_flags.npy` (uint8 [n]), aligned to row_id."""
    d = ctx.stage_dir("phash")
    hashes = table.column("hash").to_numpy().astype(np.uint64)
    flags = table.column("flags").to_numpy().astype(np.uint8)
    artifacts.write_npy_atomic(d / "phash.npy", hashes)
    artifacts.write_npy_atomic(d / "phash_flags.npy", flags)
    todo = int(sum(plan_phash(ctx).column("keep").to_pylist()))
    hashed = int((flags & FLAG_HASHED).astype(bool).sum())
    return {
        "inputs": todo,
        "outputs": hashed,
        "degenerate": int((flags & FLAG_DEGENERATE).astype(bool).sum()),
        "rejects": {"unhashable": todo - hashed} if todo > hashed else {},
    }


STAGE = Stage(
    name="phash",
    inputs=("exact_dedup",),
    outputs=("phash.npy", "phash_flags.npy"),
    config_sections=("ingest", "decode", "hash"),
    plan=plan_phash,
    finish=finish_phash,
    map_shard=hash_shard,
    reject_item=reject_hash,
)
