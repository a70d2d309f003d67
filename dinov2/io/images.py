"""The one safe image decoder, shared by the trainer's loader and the curation pipeline: untrusted bytes -> RGB.

Images are untrusted: Pillow opens only an allowlist of formats (``Image.open(formats=...)``), the pixel count is
checked from the header before any pixel is decoded (decompression bombs; Pillow's own ``DecompressionBombWarning``
is an error too), aspect ratio and minimum side can be checked from the header as well, and decoding can run under
a ``SIGALRM`` time limit. Every failure is an :class:`ImageRejected` with a short reason code, never another error.

Every Pillow mode maps to RGB uint8 (:func:`to_rgb`): EXIF orientation applied; transparency composited onto white;
CMYK with the multiplicative formula; 16-bit modes scaled by 1/257; 32-bit integer (``I``) and float (``F``) images
mapped by their actual range (see :func:`gray_to_uint8`), where ``convert("RGB")`` would clip them to black or white.
"""

from __future__ import annotations

import io
import math
import signal
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats the decoder may open (multi-picture JPEGs open as JPEG, the first frame of GIF/WebP/TIFF is used).
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
# Names that are taken as images without looking inside; any other regular file is sniffed (`sniff_format`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm", ".pnm")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bound, made explicit
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Enough bytes for every signature in `sniff_format`.
SNIFF_BYTES = 32

# (offset, signature, format). Formats outside SAFE_FORMATS are recognised so a reject can name them.
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "TIFF"),
    (0, b"MM\x00+", "TIFF"),
    (0, b"BM", "BMP"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG2000"),
    (0, b"8BPS", "PSD"),
    (0, b"qoif", "QOI"),
    (0, b"\x76\x2f\x31\x01", "EXR"),
)


class ImageRejected(Exception):
    """An image the decoder refuses; ``reason`` is a short code, ``detail`` says more (may be empty).

    Reasons: ``empty_file``, ``unsupported_format``, ``decompression_bomb``, ``aspect_ratio``, ``too_small``,
    ``truncated``, ``decode_error``, ``timeout``, ``out_of_memory``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    """What the decoder accepts.

    Attributes:
        formats: Pillow format names allowed (a subset of ``SAFE_FORMATS``).
        max_pixels: largest ``width * height``, checked from the header.
        min_side: smallest accepted ``min(width, height)``.
        max_aspect_ratio: largest accepted ``max(w, h) / min(w, h)``.
        timeout_s: per-image time limit (``SIGALRM``; main thread only); 0 = none.
    """

    formats: tuple[str, ...] = SAFE_FORMATS
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 1
    max_aspect_ratio: float = math.inf
    timeout_s: float = 0.0


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``pixels`` (H, W, 3) uint8 RGB, the file's ``format`` and its stored Pillow ``mode``."""

    pixels: np.ndarray
    format: str
    mode: str

    def to_pil(self) -> Image.Image:
        """The pixels as an RGB PIL image."""
        return Image.fromarray(self.pixels, mode="RGB")


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes (``SNIFF_BYTES`` suffice), or None when it is no image."""
    for offset, signature, name in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PPM"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis"):
        return "AVIF" if head[8:12].startswith(b"avi") else "HEIF"
    return None


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``ImageRejected('timeout')`` after ``seconds`` (main thread only; elsewhere a caller's process-level
    limit applies, e.g. the curation executor's)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum: int, frame: object) -> None:
        raise ImageRejected("timeout", f"decoding took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Open (header only) with the format allowlist; size, aspect and pixel-count checks from the header.

    Raises:
        ImageRejected: ``empty_file``, ``unsupported_format``, ``decompression_bomb``, ``aspect_ratio``,
            ``too_small``.
    """
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        found = sniff_format(data[:SNIFF_BYTES])
        raise ImageRejected("unsupported_format", f"{found} is not allowed" if found else "not an image") from None
    except (SyntaxError, ValueError, OSError, EOFError, IndexError, struct.error) as exc:
        raise ImageRejected("unsupported_format", f"{type(exc).__name__}: {exc}") from None
    w, h = image.size
    if w * h > limits.max_pixels:
        raise ImageRejected("decompression_bomb", f"{w}x{h} > {limits.max_pixels} pixels")
    if max(w, h) > limits.max_aspect_ratio * max(1, min(w, h)):
        raise ImageRejected("aspect_ratio", f"{w}x{h}")
    if min(w, h) < limits.min_side:
        raise ImageRejected("too_small", f"{w}x{h}")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode the first frame and apply EXIF orientation (a broken EXIF block keeps the stored orientation).

    Raises:
        ImageRejected: ``truncated``, ``decode_error``, ``decompression_bomb``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "decode_error"
        raise ImageRejected(reason, f"{type(exc).__name__}: {exc}") from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: keep the stored orientation rather than lose the image
        return image


def gray_to_uint8(values: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Map one channel of any numeric dtype to uint8.

    With ``bits`` (16 for the ``I;16`` modes) the full range of that depth maps to 0..255. Otherwise the values'
    actual range decides: within [0, 1] for floats -> x 255; within [0, 255] -> as is; within [0, 65535] for
    integers -> / 257 (16-bit data stored as ``I``); anything else (negative, larger, HDR) is stretched linearly
    from its minimum to its maximum. NaN maps like the minimum, infinities like the ends of the finite range.
    """
    a = values.astype(np.float64)
    if bits is not None:
        scaled = a * (255.0 / (2**bits - 1))
    else:
        finite = np.isfinite(a)
        if not finite.any():
            return np.zeros(a.shape, np.uint8)
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(np.isnan(a), lo, np.clip(a, lo, hi))
        floating = np.issubdtype(values.dtype, np.floating)
        if floating and lo >= 0 and hi <= 1:
            scaled = a * 255.0
        elif lo >= 0 and hi <= 255:
            scaled = a
        elif not floating and lo >= 0 and hi <= 65535:
            scaled = a / 257.0
        else:
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _white_composite(rgba: Image.Image) -> np.ndarray:
    a = np.asarray(rgba, dtype=np.float32)
    alpha = a[..., 3:4] / 255.0
    return np.round(a[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any Pillow mode (module docstring)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = gray_to_uint8(np.asarray(image), 16 if mode in SIXTEEN_BIT_MODES else None)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "CMYK":  # Pillow has already undone Adobe's inverted CMYK
        c = np.asarray(image).astype(np.float32)
        return np.round((255.0 - c[..., :3]) * (255.0 - c[..., 3:4]) / 255.0).astype(np.uint8)
    if mode == "La":  # premultiplied: Pillow converts it to LA only, not to RGBA
        image, mode = image.convert("LA"), "LA"
    if mode in ALPHA_MODES or "transparency" in image.info and mode in ("P", "L", "RGB", "1"):
        return _white_composite(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def decode_rgb(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Untrusted bytes -> :class:`DecodedImage` (first frame, upright, RGB uint8).

    Raises:
        ImageRejected: with a reason code; every other failure is mapped to one too.
    """
    try:
        with time_limit(limits.timeout_s):
            image = open_image(data, limits)
            fmt, mode = image.format or "", image.mode
            pixels = to_rgb(load_image(image))
    except MemoryError:
        raise ImageRejected("out_of_memory") from None
    except ImageRejected:
        raise
    except Exception as exc:  # a mode or file Pillow half-supports must cost one image, never the caller
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    return DecodedImage(pixels, fmt, mode)
