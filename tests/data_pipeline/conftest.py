"""Curation test fixtures: real photos (scikit-image) written by PIL with planted duplicates; a hostile corpus."""

from __future__ import annotations

import functools
import io
import shutil
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "clock", "retina")
# Bases that get near-duplicate variants; the rest stay singletons so that false merges would show.
NEAR_BASES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


@functools.cache
def _photo(name: str) -> Image.Image:
    import skimage.data

    im = Image.fromarray(getattr(skimage.data, name)())
    return im.convert("RGB") if im.mode not in ("RGB", "L") else im


def load_photos(side: int = 256, names: tuple[str, ...] = PHOTOS) -> dict[str, Image.Image]:
    """Real photos from scikit-image's bundled data, shrunk to at most `side` px."""
    out = {}
    for name in names:
        im = _photo(name).copy()
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        out[name] = im
    return out


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """Encode a PIL image to bytes."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_planted(root: Path) -> dict[str, tuple[str, str]]:
    """Write the planted dedup set into `root`; returns file name -> (base, variant).

    Variants: `orig` (PNG), `bytes` (byte copy), `pixels` (same pixels, other PNG compression), `jpeg50`,
    `webp`, `half` (0.5x), `up` (1.5x), `crop` (2% border cut).
    """
    root.mkdir(parents=True, exist_ok=True)
    truth = {}

    def put(name: str, data: bytes, base: str, variant: str) -> None:
        (root / name).write_bytes(data)
        truth[name] = (base, variant)

    for name, im in load_photos().items():
        put(f"{name}.png", encode(im, "PNG", compress_level=6), name, "orig")
        if name not in NEAR_BASES:
            continue
        w, h = im.size
        rgb = im.convert("RGB")
        put(f"{name}_copy.png", (root / f"{name}.png").read_bytes(), name, "bytes")
        put(f"{name}_pix.png", encode(im, "PNG", compress_level=1), name, "pixels")
        put(f"{name}_q50.jpg", encode(rgb, "JPEG", quality=50), name, "jpeg50")
        put(f"{name}.webp", encode(rgb, "WEBP", quality=70), name, "webp")
        put(f"{name}_half.jpg", encode(rgb.resize((w // 2, h // 2), Image.Resampling.LANCZOS), "JPEG", quality=90),
            name, "half")
        put(f"{name}_up.png", encode(im.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.BICUBIC), "PNG"),
            name, "up")
        dx, dy = w // 50, h // 50
        put(f"{name}_crop.jpg", encode(rgb.crop((dx, dy, w - dx, h - dy)), "JPEG", quality=90), name, "crop")
    return truth


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 30000) -> bytes:
    """A tiny PNG whose header declares side x side grey pixels (only the first rows' data is present)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (side + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def make_malformed(root: Path) -> dict[str, str]:
    """Write the hostile corpus; returns file name (or `tar::member`) -> expected reason ('' = decodes)."""
    root.mkdir(parents=True, exist_ok=True)
    photo = load_photos(names=("astronaut",))["astronaut"].resize((96, 64))
    expected = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (root / name).write_bytes(data)
        expected[name] = reason

    put("zero.jpg", b"", "empty_file")
    jpg = encode(photo, "JPEG", quality=90)
    put("truncated.jpg", jpg[: len(jpg) // 2], "truncated")
    put("page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "unsupported_format")
    put("bomb.png", png_bomb(), "decompression_bomb")
    put("fits.tif", b"SIMPLE  =                    T" + b" " * 2850, "unsupported_format")
    put("cmyk.jpg", encode(photo.convert("CMYK"), "JPEG", quality=95), "")
    ramp = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (64, 1))
    put("ramp16.png", encode(Image.fromarray(ramp), "PNG"), "")
    put("ramp16.tif", encode(Image.fromarray(ramp), "TIFF"), "")
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 32, 48))
    put("palette_transparent.png", encode(pal, "PNG", transparency=0), "")
    la = Image.new("LA", (64, 48), (0, 0))
    la.paste((0, 255), (0, 0, 32, 48))
    put("la.png", encode(la, "PNG"), "")
    frames = [Image.new("RGB", (64, 48), c) for c in ((0, 200, 0), (200, 0, 0))]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), "")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    put("exif_rotated.jpg", encode(photo, "JPEG", quality=90, exif=exif), "")
    put("thin.png", encode(Image.new("L", (10000, 1), 128), "PNG"), "aspect_ratio")
    put("ok.png", encode(photo, "PNG"), "")
    # A WebDataset-style shard with unsafe members next to a good sample.
    tar_path = root / "hostile.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name, data in (("good.jpg", jpg), ("good.json", b"{}"), ("../escape.jpg", jpg), ("/abs.jpg", jpg)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        dev = tarfile.TarInfo("dev.jpg")
        dev.type = tarfile.CHRTYPE
        tf.addfile(dev)
    expected.update({"hostile.tar::good.jpg": "", "hostile.tar::../escape.jpg": "tar_path_traversal",
                     "hostile.tar::/abs.jpg": "tar_absolute_path", "hostile.tar::link.jpg": "tar_link",
                     "hostile.tar::dev.jpg": "tar_device"})
    return expected


@pytest.fixture(scope="session")
def planted_src(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Folder of planted duplicates + ground truth (session-scoped; never modify it)."""
    root = tmp_path_factory.mktemp("planted")
    return root, make_planted(root)


@pytest.fixture(scope="session")
def malformed_src(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Folder with the hostile corpus + expected reject reasons (session-scoped; never modify it)."""
    root = tmp_path_factory.mktemp("malformed")
    return root, make_malformed(root)


@pytest.fixture
def planted_copy(planted_src, tmp_path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A private copy of the planted folder (for tests that need their own source path)."""
    src, truth = planted_src
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst, truth


@pytest.fixture(scope="session")
def imgtools() -> SimpleNamespace:
    """The image helpers above, for test modules (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(load_photos=load_photos, encode=encode, make_planted=make_planted,
                           make_malformed=make_malformed)


def build_copy_model(path: Path) -> Path:
    """A TorchScript copy-detection descriptor with the SSCD contract ([B, 3, H, W] ImageNet-normalised -> [B, 192]).

    No training: 8x8 adaptive-average thumbnail per channel, minus its per-image channel mean, flattened and
    L2-normalised; robust to rescaling, re-encoding and mild colour shifts, so planted copies score high.
    """
    import torch
    import torch.nn.functional as F

    class ThumbDescriptor(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = F.adaptive_avg_pool2d(x, 8)  # [B, 3, 8, 8]
            t = t - t.mean(dim=(2, 3), keepdim=True)
            return F.normalize(t.flatten(1), dim=1)  # [B, 192]

    torch.jit.script(ThumbDescriptor()).save(str(path))
    return path


def build_ssl_model(path: Path) -> Path:
    """A tiny random-init ViT (D=128, depth 2, 2 heads, patch 14, 56 px grid) exported in the official hub layout."""
    import torch

    from dinov2.models.registry import build_backbone
    from dinov2.weights import export_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_custom", embed_dim=128, depth=2, num_heads=2, patch_size=14, img_size=56)
    return export_backbone(model, path, layout="hub")


@pytest.fixture(scope="session")
def copy_model_path(tmp_path_factory) -> Path:
    """TorchScript stand-in for SSCD (see `build_copy_model`); session-scoped, never modify it."""
    return build_copy_model(tmp_path_factory.mktemp("models") / "thumb_copy.torchscript.pt")


@pytest.fixture(scope="session")
def ssl_model_path(tmp_path_factory) -> Path:
    """Tiny ViT checkpoint in the DINOv2 hub layout (see `build_ssl_model`); session-scoped, never modify it."""
    return build_ssl_model(tmp_path_factory.mktemp("models") / "tiny_vit14.pth")
