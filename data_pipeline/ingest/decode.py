"""Decode + validate stage: untrusted bytes -> RGB uint8 pixels, or a reject reason (never an exception).

The decoding itself is the project's one safe decoder, :mod:`dinov2.io.images`, which the trainer's loader uses too;
this module maps the ``decode`` config section onto its limits and runs it per shard.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from PIL import Image

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, DecodeConfig
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.ingest.ingest import MANIFEST_SCHEMA, read_item_bytes, write_manifest
from dinov2.io import images
from dinov2.io.files import UnsafeFile
from dinov2.io.images import ImageRejected as DecodeReject
from dinov2.io.images import load_image as load_pixels
from dinov2.io.images import time_limit, to_rgb

__all__ = ["DecodeReject", "decode_rgb", "load_pixels", "open_untrusted", "time_limit", "to_rgb"]

DECODED_SCHEMA = pa.schema(
    list(MANIFEST_SCHEMA)
    + [
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("pixel_sha256", pa.string()),
    ]
)


def decode_limits(cfg: DecodeConfig) -> images.DecodeLimits:
    """The shared decoder's limits for a ``decode`` config section."""
    return images.DecodeLimits(
        formats=tuple(cfg.formats),
        max_pixels=cfg.max_pixels,
        min_side=cfg.min_size,
        max_aspect_ratio=cfg.max_aspect_ratio,
        timeout_s=cfg.item_timeout_s,
    )


def _allow_pixels(cfg: DecodeConfig) -> None:
    # Pillow's global bomb limit would otherwise cap a configured max_pixels above its default; curation
    # processes decode with one config, so setting the global here is safe.
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels


def open_untrusted(data: bytes, cfg: DecodeConfig) -> Image.Image:
    """Open (header only) with the format allowlist, pixel limit, aspect and size checks (see ``dinov2.io.images``).

    Raises:
        DecodeReject: empty_file, unsupported_format, decompression_bomb, aspect_ratio, too_small.
    """
    _allow_pixels(cfg)
    return images.open_image(data, decode_limits(cfg))


def decode_rgb(data: bytes, cfg: DecodeConfig) -> tuple[np.ndarray, str, str]:
    """Bytes -> ((H, W, 3) uint8 RGB, format name, stored Pillow mode).

    Raises:
        DecodeReject: with a reason code; every other failure is mapped to one too.
    """
    _allow_pixels(cfg)
    decoded = images.decode_rgb(data, decode_limits(cfg))
    return decoded.pixels, decoded.format, decoded.mode


def pixel_digest(rgb: np.ndarray) -> str:
    """sha256 of decoded pixels, shape included (equal pixels => equal digest, whatever the encoding)."""
    h, w, _ = rgb.shape
    return hashlib.sha256(f"{h}x{w}:".encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


def decode_shard(cfg: CurateConfig, rows: pa.Table) -> pa.Table:
    """Per-shard decode: validate each ok item, record size, format, mode and pixel digest or a reject reason."""
    out, cache = [], {}
    for r in rows.to_pylist():
        r.update(width=None, height=None, format=None, mode=None, pixel_sha256=None)
        if r["status"] == "ok":
            try:
                data = read_item_bytes(r["path"], r["member"], cache)
                rgb, fmt, mode = decode_rgb(data, cfg.decode)
                r.update(height=rgb.shape[0], width=rgb.shape[1], format=fmt, mode=mode, pixel_sha256=pixel_digest(rgb))
            except (DecodeReject, UnsafeFile) as exc:
                r.update(status="rejected", reject_reason=exc.reason)
            except OSError:
                r.update(status="rejected", reject_reason="unreadable")
        out.append(r)
    for tf in cache.values():
        tf.close()
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def reject_decoded(rows: pa.Table, reason: str) -> pa.Table:
    """Result rows for items whose decode worker died or hung."""
    out = []
    for r in rows.to_pylist():
        r.update(width=None, height=None, format=None, mode=None, pixel_sha256=None)
        out.append({**r, "status": "rejected", "reject_reason": reason})
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def plan_decode(ctx: StageContext) -> pa.Table:
    """The ingest manifest, in row_id order."""
    return artifacts.read_table(ctx.stage_dir("ingest") / "manifest.parquet")


def finish_decode(ctx: StageContext, table: pa.Table) -> dict:
    """Write `manifest.parquet` (ingest columns + width, height, format, mode, pixel_sha256)."""
    return write_manifest(ctx, "decode", table)


STAGE = Stage(
    name="decode",
    inputs=("ingest",),
    outputs=("manifest.parquet",),
    config_sections=("ingest", "decode"),
    plan=plan_decode,
    finish=finish_decode,
    map_shard=decode_shard,
    reject_item=reject_decoded,
)
