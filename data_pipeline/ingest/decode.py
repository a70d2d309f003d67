"""Decode + validate stage: untrusted bytes -> RGB uint8 pixels, or a reject reason (never an exception)."""

from __future__ import annotations

import hashlib
import io
import signal
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, DecodeConfig
from data_pipeline.core.stage import Stage, StageContext, reject_counts
from data_pipeline.ingest.ingest import MANIFEST_SCHEMA, read_item_bytes

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

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DecodeReject(Exception):
    """An image that fails validation; `reason` is a short machine-readable code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextmanager
def time_limit(seconds: float):
    """Raise DecodeReject('timeout') after `seconds` (main thread only; elsewhere the executor's hard limit applies)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise DecodeReject("timeout")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_untrusted(data: bytes, cfg: DecodeConfig) -> Image.Image:
    """Open (header only) with the format allowlist and an explicit pixel limit; size filters applied here.

    Raises:
        DecodeReject: empty_file, unsupported_format, decompression_bomb, aspect_ratio, too_small.
    """
    if not data:
        raise DecodeReject("empty_file")
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(cfg.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeReject("decompression_bomb") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError):
        raise DecodeReject("unsupported_format") from None
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise DecodeReject("decompression_bomb")
    if max(w, h) / max(1, min(w, h)) > cfg.max_aspect_ratio:
        raise DecodeReject("aspect_ratio")
    if min(w, h) < cfg.min_size:
        raise DecodeReject("too_small")
    return img


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode the (first) frame and apply EXIF orientation. Raises DecodeReject('truncated' | 'decode_error')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
    except OSError as exc:
        raise DecodeReject("truncated" if "truncated" in str(exc) else "decode_error") from None
    except (SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombWarning):
        raise DecodeReject("decode_error") from None
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return img  # unreadable EXIF: keep the stored orientation rather than lose the image


def _white_composite(rgba: Image.Image) -> np.ndarray:
    a = np.asarray(rgba, dtype=np.float32)
    alpha = a[..., 3:4] / 255.0
    return np.round(a[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any Pillow mode.

    16-bit modes are scaled (65535 -> 255), not clipped; transparency is composited onto white; CMYK uses the
    multiplicative formula on Pillow's (already Adobe-uninverted) channels.
    """
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        g = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "CMYK":
        c = np.asarray(img).astype(np.float32)
        rgb = (255.0 - c[..., :3]) * (255.0 - c[..., 3:4]) / 255.0
        return np.round(rgb).astype(np.uint8)
    if mode == "P" and "transparency" in img.info or mode in ALPHA_MODES:
        return _white_composite(img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


def decode_rgb(data: bytes, cfg: DecodeConfig) -> tuple[np.ndarray, str, str]:
    """Bytes -> ((H, W, 3) uint8 RGB, format name, stored Pillow mode).

    Raises:
        DecodeReject: with a reason code; every other failure is mapped to one too.
    """
    with time_limit(cfg.item_timeout_s):
        try:
            img = open_untrusted(data, cfg)
            fmt, mode = img.format or "", img.mode
            rgb = to_rgb(load_pixels(img))
        except MemoryError:
            raise DecodeReject("out_of_memory") from None
    return rgb, fmt, mode


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
            except DecodeReject as exc:
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
    artifacts.write_parquet_atomic(ctx.stage_dir("decode") / "manifest.parquet", table)
    ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    return {"inputs": table.num_rows, "outputs": ok, "rejects": reject_counts(table)}


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
