"""Tests for the multi-crop augmentation: shapes, crop geometry, application rates in both blur modes, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropParams,
    MultiCropAugmentation,
    apply_crop,
    sample_crop_box,
)


def _image(height=72, width=96, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _plain(size, box):
    return CropParams(size, box, False, (), (1.0, 1.0, 1.0, 0.0), False, None, False)


def _denormalise(x):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x * std + mean


@pytest.mark.parametrize("n_local", [0, 3])
def test_shapes_and_dtype(n_local):
    aug = MultiCropAugmentation(local_crops_number=n_local, global_crops_size=32, local_crops_size=16)
    out = aug(_image(), _gen(0))
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == n_local
    for crop in out["global_crops"]:
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32


def test_normalisation_of_a_plain_crop():
    value = 200
    image = Image.new("RGB", (40, 30), (value, value, value))
    out = apply_crop(image, _plain(16, (0, 0, 30, 40)))
    expected = (value / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_crop_box_fractions_and_aspect_in_range():
    height, width = 90, 120
    gen = _gen(1)
    for scale in [(0.32, 1.0), (0.05, 0.32)]:
        fractions = []
        for _ in range(2000):
            top, left, h, w = sample_crop_box(height, width, scale, gen)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            fractions.append(h * w / (height * width))
            # Rounding h and w to integers moves the ratio a little past 3/4..4/3.
            assert 0.70 < w / h < 1.42
        fractions = np.array(fractions)
        # h and w are rounded: allow the area to move by about one pixel row/column.
        slack = (height + width) / (height * width)
        assert fractions.min() >= scale[0] - slack and fractions.max() <= scale[1] + slack
        assert fractions.max() - fractions.min() > 0.5 * (scale[1] - scale[0])  # spans the range


def test_sampled_crop_fractions_per_crop_kind():
    aug = MultiCropAugmentation(local_crops_number=4, global_crops_size=32, local_crops_size=16)
    height, width = 80, 100
    slack = (height + width) / (height * width)
    gen = _gen(2)
    for _ in range(300):
        params = aug.sample_params(height, width, gen)
        for p in params[:2]:
            assert p.size == 32
            assert 0.32 - slack <= p.box[2] * p.box[3] / (height * width) <= 1.0
        for p in params[2:]:
            assert p.size == 16
            assert 0.05 - slack <= p.box[2] * p.box[3] / (height * width) <= 0.32 + slack


def _rates(blur_mode, n_images=3000):
    aug = MultiCropAugmentation(local_crops_number=2, blur_mode=blur_mode)
    gen = _gen(3)
    records = [aug.sample_params(64, 64, gen) for _ in range(n_images)]

    def rate(position, attribute):
        values = [getattr(r[position], attribute) for r in records]
        if attribute == "blur_sigma":
            values = [v is not None for v in values]
        elif attribute == "jitter_order":
            values = [len(v) > 0 for v in values]
        return float(np.mean(values))

    return rate, records


@pytest.mark.parametrize("blur_mode,expected_blur", [("intended", (1.0, 0.1, 0.5)), ("official", (0.0, 0.9, 0.5))])
def test_application_rates(blur_mode, expected_blur):
    rate, records = _rates(blur_mode)
    tol = 0.04  # > 4 binomial standard deviations at n = 3000 (and 6000 for the locals)
    g1_blur, g2_blur, local_blur = expected_blur
    assert abs(rate(0, "blur_sigma") - g1_blur) < tol
    assert abs(rate(1, "blur_sigma") - g2_blur) < tol
    assert abs((rate(2, "blur_sigma") + rate(3, "blur_sigma")) / 2 - local_blur) < tol
    if g1_blur in (0.0, 1.0):
        assert rate(0, "blur_sigma") == g1_blur  # exact, not just statistical
    # Solarize on global crop 2 only.
    assert abs(rate(1, "solarize") - 0.2) < tol
    assert rate(0, "solarize") == 0.0 and rate(2, "solarize") == 0.0 and rate(3, "solarize") == 0.0
    for position in range(4):
        assert abs(rate(position, "grayscale") - 0.2) < tol
        assert abs(rate(position, "jitter_order") - 0.8) < tol
        assert abs(rate(position, "flip") - 0.5) < tol
    sigmas = [r[1].blur_sigma for r in records if r[1].blur_sigma is not None]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    factors = np.array([r[0].jitter_factors for r in records])
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4  # brightness 0.4
    assert factors[:, 2].min() >= 0.8 and factors[:, 2].max() <= 1.2  # saturation 0.2
    assert np.abs(factors[:, 3]).max() <= 0.1  # hue 0.1


def test_blur_modes_share_the_random_stream():
    a = MultiCropAugmentation(local_crops_number=2, blur_mode="intended").sample_params(64, 64, _gen(4))
    b = MultiCropAugmentation(local_crops_number=2, blur_mode="official").sample_params(64, 64, _gen(4))
    assert [p.box for p in a] == [p.box for p in b]
    assert [p.grayscale for p in a] == [p.grayscale for p in b]
    assert a[0].blur_sigma is not None and b[0].blur_sigma is None


def test_recorded_ops_take_effect():
    image = _image(64, 64, seed=5)
    box = (0, 0, 64, 64)
    base = apply_crop(image, _plain(32, box))
    blurred = apply_crop(image, CropParams(32, box, False, (), (1, 1, 1, 0), False, 1.5, False))
    # Blur removes high-frequency energy from a noise image.
    assert blurred.diff(dim=-1).abs().mean() < 0.7 * base.diff(dim=-1).abs().mean()
    gray = _denormalise(apply_crop(image, CropParams(32, box, False, (), (1, 1, 1, 0), True, None, False)))
    torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[1], gray[2], atol=1e-5, rtol=0)
    solarized = _denormalise(apply_crop(image, CropParams(32, box, False, (), (1, 1, 1, 0), False, None, True)))
    assert solarized.max() < 128 / 255 + 1e-5  # every pixel >= 128 was inverted
    flipped = apply_crop(image, CropParams(32, box, True, (), (1, 1, 1, 0), False, None, False))
    torch.testing.assert_close(flipped, base.flip(-1))
    jittered = apply_crop(image, CropParams(32, box, False, (0, 1, 2, 3), (1.3, 0.7, 1.2, 0.05), False, None, False))
    assert not torch.equal(jittered, base)


def test_deterministic_given_the_seed():
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    image = _image()
    first, again, other = aug(image, _gen(7)), aug(image, _gen(7)), aug(image, _gen(8))
    for key in ("global_crops", "local_crops"):
        for x, y in zip(first[key], again[key]):
            assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(first["global_crops"], other["global_crops"]))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="blur_mode"):
        MultiCropAugmentation(blur_mode="bogus")
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropAugmentation(local_crops_number=-1)
