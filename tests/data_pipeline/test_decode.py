"""Decode + validate on the hostile corpus: every item decodes to sane RGB or is rejected with its reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_pipeline.core.config import DecodeConfig
from data_pipeline.ingest.decode import DecodeReject, decode_rgb, to_rgb
from data_pipeline.ingest.ingest import list_source

CFG = DecodeConfig(min_size=16)


def _decode(path):
    return decode_rgb(path.read_bytes(), CFG)


@pytest.mark.parametrize(
    "name", ["zero.jpg", "truncated.jpg", "page.jpg", "bomb.png", "fits.tif", "thin.png"]
)
def test_rejects_carry_their_reason(malformed_src, name):
    root, expected = malformed_src
    with pytest.raises(DecodeReject) as exc:
        _decode(root / name)
    assert exc.value.reason == expected[name]


def test_bomb_rejected_before_decoding(malformed_src):
    # 30000^2 declared pixels: must be refused from the header alone, far below 900 MB of pixel memory.
    root, _ = malformed_src
    assert (root / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(DecodeReject, match="decompression_bomb"):
        decode_rgb((root / "bomb.png").read_bytes(), DecodeConfig(max_pixels=10_000_000))


def test_cmyk_adobe_matches_rgb_source(malformed_src):
    root, _ = malformed_src
    rgb, fmt, mode = _decode(root / "cmyk.jpg")
    ref, _, _ = _decode(root / "ok.png")
    assert (fmt, mode, rgb.shape) == ("JPEG", "CMYK", ref.shape)
    # JPEG loss only: an un-inverted Adobe CMYK would be off by ~255 - 2x.
    assert np.abs(rgb.astype(int) - ref.astype(int)).mean() < 6


@pytest.mark.parametrize("name", ["ramp16.png", "ramp16.tif"])
def test_16bit_ramp_scaled_not_clipped(malformed_src, name):
    root, _ = malformed_src
    rgb, _, mode = _decode(root / name)
    assert mode.startswith("I;16")
    row = rgb[0, :, 0]
    assert len(np.unique(row)) > 200  # clipping would leave ~1 level (everything >= 255 is white)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0)
    assert abs(int(row[256]) - 128) <= 1


def test_palette_transparency_and_la_on_white(malformed_src):
    root, _ = malformed_src
    pal, _, _ = _decode(root / "palette_transparent.png")
    # Index 0 (red) is transparent -> white; index 1 (blue) opaque on the left half.
    assert tuple(pal[10, 10]) == (0, 0, 255)
    assert tuple(pal[10, 50]) == (255, 255, 255)
    la, _, _ = _decode(root / "la.png")
    assert tuple(la[10, 10]) == (0, 0, 0) and tuple(la[10, 50]) == (255, 255, 255)


def test_animated_gif_first_frame(malformed_src):
    root, _ = malformed_src
    rgb, fmt, _ = _decode(root / "animated.gif")
    assert fmt == "GIF" and rgb.shape == (48, 64, 3)
    assert tuple(rgb[5, 5]) == (0, 200, 0)


def test_exif_orientation_applied(malformed_src):
    root, _ = malformed_src
    rotated, _, _ = _decode(root / "exif_rotated.jpg")
    upright, _, _ = _decode(root / "ok.png")
    assert upright.shape == (64, 96, 3) and rotated.shape == (96, 64, 3)
    # Orientation 6 displays the stored image rotated 90 degrees clockwise.
    expect = np.rot90(upright, k=-1)
    assert np.abs(rotated.astype(int) - expect.astype(int)).mean() < 6


def test_format_allowlist_is_enforced(tmp_path):
    p = tmp_path / "x.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(p, "PNG")
    assert _decode(p)[1] == "PNG"
    with pytest.raises(DecodeReject, match="unsupported_format"):
        decode_rgb(p.read_bytes(), DecodeConfig(formats=["JPEG"]))


def test_modes_to_rgb():
    assert to_rgb(Image.new("1", (4, 4), 1)).tolist() == [[[255] * 3] * 4] * 4
    assert to_rgb(Image.new("L", (4, 4), 7))[0, 0].tolist() == [7, 7, 7]
    assert to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 0)))[0, 0].tolist() == [255, 255, 255]


def test_unsafe_tar_members_rejected_at_listing(malformed_src):
    root, expected = malformed_src
    rows = {r["member"]: r for r in list_source(str(root / "hostile.tar"))}
    assert "good.json" not in rows  # metadata members of a sample are not images
    for key, reason in expected.items():
        if key.startswith("hostile.tar::"):
            member = key.split("::", 1)[1]
            assert rows[member]["reject_reason"] == reason, member
