"""dinov2.io: the loop-free folder walk, regular-file checks, lossless names, magic-byte sniffing and the shared
decoder on every Pillow mode."""

from __future__ import annotations

import io
import os
import socket

import numpy as np
import pytest
from PIL import Image

from dinov2.io.files import (
    UnsafeFile,
    check_regular,
    escape_name,
    read_regular,
    unescape_name,
    walk_folder,
)
from dinov2.io.images import (
    SAFE_FORMATS,
    DecodeLimits,
    ImageRejected,
    decode_rgb,
    gray_to_uint8,
    sniff_format,
)


def _jpeg(value: int = 128, side: int = 16) -> bytes:
    pixels = np.random.default_rng(value).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """root/{a/x.jpg, b/y.jpg, hard.jpg (hard link of a/x.jpg)} plus loops, a `..` link, a sibling link, a broken
    link, a FIFO and a socket."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.jpg").write_bytes(_jpeg(1))
    (root / "b" / "y.jpg").write_bytes(_jpeg(2))
    os.link(root / "a" / "x.jpg", root / "hard.jpg")
    (root / "a" / "loop").symlink_to(".")
    (root / "a" / "up").symlink_to("..")
    (root / "0_to_b").symlink_to("b")  # sorts before b: the real folder must still win
    (root / "broken.jpg").symlink_to("nowhere.jpg")
    (root / "self").symlink_to("self")
    os.mkfifo(root / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jpg"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "z.jpg").write_bytes(_jpeg(3))
    (root / "ext").symlink_to(outside)
    yield root
    sock.close()


def test_walk_lists_each_file_once_and_never_follows_loops(tree):
    entries = walk_folder(tree)
    listed = {e.rel for e in entries if not e.reason}
    # Real paths win over links; a link adds only what nothing else reaches (the outside folder).
    assert listed == {"a/x.jpg", "b/y.jpg", "ext/z.jpg"}
    reasons = {e.rel: e.reason for e in entries if e.reason}
    assert reasons == {
        "0_to_b": "link_to_listed_folder", "a/loop": "link_to_listed_folder", "a/up": "link_to_listed_folder",
        "broken.jpg": "broken_link", "self": "link_loop", "fifo.jpg": "fifo", "sock.jpg": "socket",
        "hard.jpg": "link_to_listed_file",
    }
    assert [e.rel for e in entries] == sorted(e.rel for e in entries)


def test_regular_file_checks_never_open_a_fifo(tree):
    assert check_regular(tree / "fifo.jpg")[0] == "fifo"
    assert check_regular(tree / "missing")[0] == "missing"
    assert check_regular(tree / "self")[0] == "link_loop"
    with pytest.raises(UnsafeFile) as info:
        read_regular(tree / "fifo.jpg")  # would block for ever with a plain open()
    assert info.value.reason == "fifo"
    with pytest.raises(UnsafeFile) as info:
        read_regular(tree / "a" / "x.jpg", max_bytes=10)
    assert info.value.reason == "too_large"
    assert read_regular(tree / "a" / "x.jpg") == _jpeg(1)


@pytest.mark.parametrize("raw", [b"plain.jpg", "caf\u00e9.jpg".encode(), b"bad\xff\xfe.jpg", b"back\\x41\xff\\.jpg"])
def test_escaped_names_round_trip_and_are_valid_text(raw):
    name = os.fsdecode(raw)
    text = escape_name(name)
    text.encode("utf-8")  # storable in Parquet / JSON
    assert unescape_name(text) == name and os.fsencode(unescape_name(text)) == raw
    assert (text == name) == (b"\xff" not in raw)


def test_sniff_names_images_by_content():
    assert sniff_format(_jpeg()) == "JPEG"
    for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, fmt)
        assert sniff_format(buf.getvalue()[:32]) == fmt
    assert sniff_format(b"<!DOCTYPE html>") is None and sniff_format(b"") is None
    assert "ICO" not in SAFE_FORMATS


def test_float_and_int32_images_map_by_their_range():
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    assert gray_to_uint8(ramp).max() == 255  # [0, 1] floats are scaled, not truncated to 0 and 1
    assert gray_to_uint8(ramp * 255).tolist() == np.round(ramp * 255).astype(np.uint8).tolist()
    hdr = np.array([[-5.0, 0.0, 5.0, np.nan, np.inf]], dtype=np.float32)
    assert gray_to_uint8(hdr).tolist() == [[0, 128, 255, 0, 255]]
    assert gray_to_uint8(np.array([[0, 200]], np.int32)).tolist() == [[0, 200]]  # 8-bit data stored as I
    assert gray_to_uint8(np.array([[0, 65535]], np.int32)).tolist() == [[0, 255]]  # 16-bit data stored as I
    assert gray_to_uint8(np.array([[-100, 1_000_000]], np.int32)).tolist() == [[0, 255]]
    assert gray_to_uint8(np.array([[257, 65535]], np.uint16), bits=16).tolist() == [[1, 255]]


def _ramp_image(mode: str) -> Image.Image:
    """A 64x16 left-to-right brightness ramp in ``mode``'s natural value range."""
    t = np.tile(np.linspace(0.0, 1.0, 64), (16, 1))
    if mode == "F":
        return Image.fromarray(t.astype(np.float32), "F")
    if mode == "I":  # negative values (stretched) in formats that keep them, 16-bit data in those that clip
        return Image.fromarray((t * 60300 - 300).astype(np.int32), "I")
    if mode.startswith("I;16"):
        image = Image.new(mode, (64, 16))
        image.frombytes((t * 65535).astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        return image
    if mode == "CMYK":
        k = (255 - t * 255).astype(np.uint8)
        return Image.fromarray(np.stack([np.zeros_like(k)] * 3 + [k], axis=2), "CMYK")
    if mode == "HSV":
        v = (t * 255).astype(np.uint8)
        return Image.fromarray(np.stack([np.zeros_like(v), np.zeros_like(v), v], axis=2), "HSV")
    if mode == "LAB":
        lum = (t * 255).astype(np.uint8)
        return Image.fromarray(np.stack([lum, np.full_like(lum, 128), np.full_like(lum, 128)], axis=2), "LAB")
    gray = Image.fromarray((t * 255).astype(np.uint8), "L")
    if mode == "1":
        return gray.point(lambda v: 255 if v >= 128 else 0).convert("1")
    if mode in ("P", "PA"):
        return gray.convert("RGB").convert(mode)
    if mode in ("LA", "La"):
        return Image.merge("LA", (gray, Image.new("L", gray.size, 255))).convert(mode)
    if mode == "RGBa":
        return gray.convert("RGBA").convert("RGBa")
    return gray.convert(mode)


WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16L", "I;16B", "LA",
         "PA", "RGBX", "RGBa", "La")
FORMATS = ("PNG", "TIFF", "WEBP", "JPEG", "BMP", "GIF", "PPM")


def _saved(mode: str) -> list[tuple[str, bytes]]:
    out = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        try:
            _ramp_image(mode).save(buf, fmt)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # Pillow cannot write this mode in this format
        out.append((fmt, buf.getvalue()))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_pillow_can_save_decodes_to_a_ramp(mode):
    saved = _saved(mode)
    assert saved or mode in ("La", "RGBa", "I;16N"), f"Pillow saved {mode} in no format"
    for fmt, data in saved:
        decoded = decode_rgb(data, DecodeLimits())
        assert decoded.pixels.shape == (16, 64, 3) and decoded.pixels.dtype == np.uint8, (mode, fmt)
        if mode in WIDE_MODES and decoded.mode not in WIDE_MODES:
            continue  # the encoder itself squeezed the data to 8 bits (F in WebP/GIF): nothing left to decode
        luma = decoded.pixels.astype(np.float64).mean(axis=(0, 2))
        # Dark on the left, bright on the right, nothing collapsed to black or white (the F / I bug). The margin
        # is loose because Pillow's TIFF writer loses LAB's signed a/b channels.
        assert luma[-8:].mean() - luma[:8].mean() > 60, (mode, fmt, decoded.mode, luma[::8].round())
        blocks = luma.reshape(8, 8).mean(axis=1)  # palette modes are dithered: monotonic per block of columns
        assert np.all(np.diff(blocks) >= -2), (mode, fmt, decoded.mode, blocks.round())


def test_in_memory_modes_the_formats_cannot_store():
    from dinov2.io.images import to_rgb

    for mode in ("La", "RGBa", "I;16N", "HSV"):
        rgb = to_rgb(_ramp_image(mode)).astype(np.float64).mean(axis=(0, 2))
        assert rgb[:8].mean() < 90 and rgb[-8:].mean() > 165, mode


def test_decoder_rejects_with_reasons():
    for data, reason in [(b"", "empty_file"), (b"<html>", "unsupported_format"), (_jpeg(side=64)[:3000], "truncated")]:
        with pytest.raises(ImageRejected) as info:
            decode_rgb(data)
        assert info.value.reason == reason
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    with pytest.raises(ImageRejected, match="ICO is not allowed"):
        decode_rgb(buf.getvalue())
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        decode_rgb(_jpeg(), DecodeLimits(max_pixels=100))
