"""Tests for the iBOT mask generator and collate_crops against the official ``MaskingGenerator`` and
``collate_data_and_cast`` (their algorithm, random-call order and mask invariants)."""

import math
import random

import numpy as np
import pytest
import torch

from dinov2.data.collate import collate_crops
from dinov2.data.masking import MaskingGenerator, official_max_num_patches


def _spec_mask(height, width, target, max_block, seed):
    """The official ``MaskingGenerator`` algorithm written out here, on the *global* random module."""
    random.seed(seed)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < target:
        limit = min(target - count, max_block)
        delta = 0
        for _ in range(10):
            area = random.uniform(4, limit)
            aspect = math.exp(random.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= limit:
                    mask[top : top + h, left : left + w] = True
                    delta += new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


def test_official_max_num_patches_precedence_quirk():
    assert official_max_num_patches(224, 14) == 128
    assert official_max_num_patches(518, 14) == 666  # half the 37x37 grid would be 684.5
    assert official_max_num_patches(224, 16) == 98


@pytest.mark.parametrize("grid,max_block", [((16, 16), 128.0), ((37, 37), 666.0), ((6, 9), 27.0)])
def test_masks_equal_the_spec_algorithm_with_the_same_seed(grid, max_block):
    generator = MaskingGenerator(grid, max_num_patches=max_block)
    n = grid[0] * grid[1]
    for seed in range(20):
        target = int(n * (0.1 + 0.4 * seed / 20))
        ours = generator(target, rng=random.Random(seed))
        assert np.array_equal(ours, _spec_mask(*grid, target, max_block, seed))


def test_counts_never_exceed_target():
    generator = MaskingGenerator(16, max_num_patches=128.0)
    rng = random.Random(0)
    reached = 0
    for _ in range(300):
        target = rng.randint(0, 200)
        mask = generator(target, rng=rng)
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert mask.sum() <= target
        reached += mask.sum() >= 0.8 * target
    assert reached > 250  # it usually gets close to the target


def test_explicit_rng_leaves_global_random_alone():
    generator = MaskingGenerator(14, max_num_patches=98.0)
    random.seed(123)
    state = random.getstate()
    a = generator(60, rng=random.Random(5))
    assert random.getstate() == state
    assert np.array_equal(a, generator(60, rng=random.Random(5)))
    with pytest.raises(ValueError, match="rng"):
        generator(60)


def test_repr_with_no_default_target():
    text = repr(MaskingGenerator((16, 16)))
    assert "16x16" in text and "num_masking_patches=None" in text


def _samples(batch, n_local, global_size=8, local_size=4):
    """Crops whose values encode (image, crop) so the stacking order can be checked."""
    out = []
    for i in range(batch):
        out.append(
            {
                "global_crops": [torch.full((3, global_size, global_size), 100.0 * i + c) for c in range(2)],
                "local_crops": [torch.full((3, local_size, local_size), 100.0 * i + 10 + c) for c in range(n_local)],
                "sample_index": 1000 + i,
                "sample_key": f"img{i}",
                "skips": [(f"bad{i}", "empty", "zero-byte file")] if i % 2 else [],
            }
        )
    return out


@pytest.mark.parametrize("batch,expected_upperbound", [(64, 4941), (32, 2496)])
def test_collate_mask_statistics(batch, expected_upperbound):
    n_tokens = 256
    generator = MaskingGenerator(16, max_num_patches=official_max_num_patches(224, 14))
    out = collate_crops(
        _samples(batch, 0, global_size=2),
        (0.1, 0.5),
        0.5,
        n_tokens=n_tokens,
        mask_generator=generator,
        rng=random.Random(0),
    )
    masks = out["collated_masks"]
    assert masks.shape == (2 * batch, n_tokens) and masks.dtype == torch.bool
    assert out["upperbound"] == expected_upperbound
    per_image = masks.sum(1)
    n_masked = int(2 * batch * 0.5)
    assert int((per_image > 0).sum()) == n_masked
    # Slot i targets at most int(N * probs[i+1]): the k-th smallest count is at most the k-th bound.
    probs = torch.linspace(0.1, 0.5, n_masked + 1)
    bounds = sorted(int(n_tokens * p) for p in probs[1:])
    counts = sorted(per_image[per_image > 0].tolist())
    assert all(c <= b for c, b in zip(counts, bounds))
    assert out["n_masked_patches"].shape == (1,) and out["n_masked_patches"].dtype == torch.long
    assert int(out["n_masked_patches"]) == int(masks.sum()) <= out["upperbound"]
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["masks_weight"].shape == (int(masks.sum()),)
    torch.testing.assert_close(out["masks_weight"].sum(), torch.tensor(float(n_masked)))
    # Masked and unmasked slots are mixed across both global crops, not all in the first half.
    assert 0 < int((per_image[:batch] > 0).sum()) < batch


def test_collate_crop_major_order_and_pass_through():
    batch, n_local = 3, 2
    out = collate_crops(
        _samples(batch, n_local),
        n_tokens=4,
        mask_generator=MaskingGenerator(2, max_num_patches=2.0),
        rng=random.Random(1),
        dtype=torch.bfloat16,
    )
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (2 * batch, 3, 8, 8) and g.dtype == torch.bfloat16
    assert loc.shape == (n_local * batch, 3, 4, 4) and loc.dtype == torch.bfloat16
    for c in range(2):
        for i in range(batch):
            assert float(g[c * batch + i, 0, 0, 0]) == 100.0 * i + c
    for c in range(n_local):
        for i in range(batch):
            assert float(loc[c * batch + i, 0, 0, 0]) == 100.0 * i + 10 + c
    assert out["sample_indices"].tolist() == [1000, 1001, 1002]
    assert out["sample_keys"] == ["img0", "img1", "img2"]
    assert out["skipped"] == {"empty": 1}
    assert out["skipped_samples"] == [("bad1", "empty", "zero-byte file")]


def test_collate_without_local_crops_or_masks():
    out = collate_crops(
        _samples(4, 0),
        mask_probability=0.0,
        n_tokens=16,
        mask_generator=MaskingGenerator(4, max_num_patches=8.0),
        rng=random.Random(2),
        local_crops_size=4,
    )
    assert out["collated_local_crops"].shape == (0, 3, 4, 4)
    assert not out["collated_masks"].any()
    assert out["upperbound"] == 0 and int(out["n_masked_patches"]) == 0
    assert out["mask_indices_list"].numel() == 0 and out["masks_weight"].numel() == 0


def test_collate_is_a_function_of_the_rng_seed():
    generator = MaskingGenerator(8, max_num_patches=32.0)

    def masks(seed):
        return collate_crops(_samples(8, 0), n_tokens=64, mask_generator=generator, rng=random.Random(seed))[
            "collated_masks"
        ]

    assert torch.equal(masks(3), masks(3))
    assert not torch.equal(masks(3), masks(4))


def test_collate_rejects_bad_settings():
    generator = MaskingGenerator(4, max_num_patches=8.0)
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        collate_crops(_samples(2, 0), (0.6, 0.2), n_tokens=16, mask_generator=generator, rng=random.Random(0))
    with pytest.raises(ValueError, match="n_tokens"):
        collate_crops(_samples(2, 0), n_tokens=25, mask_generator=generator, rng=random.Random(0))
