"""Tests for the training stream: rank partition, worker-count invariance, bitwise resume and corrupt-image handling."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.config import CropsConfig, IbotConfig, TrainSection
from dinov2.data import build_train_loader
from dinov2.data.augment import MultiCropAugmentation
from dinov2.data.loader import DecodeError, RankSampleStream, decode_image, make_train_loader
from dinov2.data.sources import ImageFolderSource

TENSOR_KEYS = (
    "collated_global_crops",
    "collated_local_crops",
    "collated_masks",
    "mask_indices_list",
    "masks_weight",
    "n_masked_patches",
    "sample_indices",
)


def _encoded(seed, size=64, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size, size + 8 * (seed % 3), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    for i in range(12):
        sub = root / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:02d}.jpg").write_bytes(_encoded(i))
    return root


def _augmentation(n_local=2):
    return MultiCropAugmentation(local_crops_number=n_local, global_crops_size=32, local_crops_size=16)


def _loader(source, **kwargs):
    settings = dict(batch_size=3, augmentation=_augmentation(), patch_size=8, seed=7)
    settings.update(kwargs)
    return make_train_loader(source, **settings)


def _take(loader, n):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def _assert_same(a, b):
    assert a["batch_index"] == b["batch_index"]
    for key in TENSOR_KEYS:
        assert torch.equal(a[key], b[key]), key
    assert a["upperbound"] == b["upperbound"] and a["sample_keys"] == b["sample_keys"]


@pytest.mark.parametrize("n,world", [(23, 4), (12, 2), (5, 1)])
def test_ranks_partition_each_epoch(n, world):
    streams = [RankSampleStream(n, r, world, seed=3) for r in range(world)]
    for epoch in range(3):
        per_rank = []
        for stream in streams:
            start = epoch * stream.samples_per_epoch
            per_rank.append([stream.index(s) for s in range(start, start + stream.samples_per_epoch)])
        flat = [i for indices in per_rank for i in indices]
        assert sorted(flat) == list(range(n))  # cover the data, no overlap
    if world > 1:
        first = streams[0]
        epoch0 = {first.index(s) for s in range(first.samples_per_epoch)}
        epoch1 = {first.index(s) for s in range(first.samples_per_epoch, 2 * first.samples_per_epoch)}
        assert epoch0 != epoch1  # each epoch the rank sees another subset (the official sampler does not)
    with pytest.raises(ValueError):
        RankSampleStream(3, 0, 4, seed=0)


def test_loader_ranks_do_not_overlap(image_dir):
    source = ImageFolderSource(image_dir)
    seen = []
    for rank in range(2):
        batches = _take(_loader(source, rank=rank, world_size=2), 2)  # 2 batches of 3 = one epoch of 6 per rank
        seen.append({i for b in batches for i in b["sample_indices"].tolist()})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(12))


def test_batch_contents_and_state(image_dir):
    loader = _loader(str(image_dir))
    batch = next(iter(loader))
    assert batch["collated_global_crops"].shape == (6, 3, 32, 32)
    assert batch["collated_local_crops"].shape == (6, 3, 16, 16)
    assert batch["collated_masks"].shape == (6, 16)
    assert batch["skipped"] == {} and batch["batch_index"] == 0
    assert loader.loader_state()["next_batch"] == 1


def test_same_batches_for_any_num_workers(image_dir):
    source = ImageFolderSource(image_dir)
    serial = _take(_loader(source, num_workers=0), 5)
    parallel = _take(_loader(source, num_workers=2), 5)
    assert [b["batch_index"] for b in parallel] == list(range(5))
    for a, b in zip(serial, parallel):
        _assert_same(a, b)


def test_resume_reproduces_batches_bitwise(image_dir):
    source = ImageFolderSource(image_dir)
    reference = _take(_loader(source), 6)  # crosses the epoch boundary (4 batches per epoch)
    first = _loader(source)
    _take(first, 3)
    state = first.loader_state()
    assert state["next_batch"] == 3
    resumed = _loader(source, start_batch=0)
    resumed.load_loader_state(state)
    for a, b in zip(reference[3:], _take(resumed, 3)):
        _assert_same(a, b)
    for a, b in zip(reference[2:], _take(_loader(source, start_batch=2), 4)):
        _assert_same(a, b)
    other_seed = _take(_loader(source, seed=8), 1)[0]
    assert not torch.equal(other_seed["collated_global_crops"], reference[0]["collated_global_crops"])
    with pytest.raises(ValueError, match="world_size"):
        _loader(source).load_loader_state({**state, "world_size": 2})


def test_corrupt_images_are_skipped_and_counted(image_dir):
    good = _encoded(99)
    (image_dir / "bad").mkdir()
    (image_dir / "bad" / "empty.jpg").write_bytes(b"")
    (image_dir / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (image_dir / "bad" / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    bad_keys = {"bad/empty.jpg", "bad/truncated.jpg", "bad/page.jpg"}
    source = ImageFolderSource(image_dir)
    assert len(source) == 15
    totals, used_keys, reason_of = {}, set(), {}
    # Two workers: a corrupt file must not kill one. 10 batches of 3 = two epochs, so every bad file is drawn twice
    # by the stream (its random replacements may draw bad files again, each costing one more counted skip).
    for batch in _take(_loader(source, num_workers=2), 10):
        assert batch["collated_global_crops"].shape[0] == 6 and torch.isfinite(batch["collated_global_crops"]).all()
        for reason, count in batch["skipped"].items():
            totals[reason] = totals.get(reason, 0) + count
        assert len(batch["skipped_samples"]) == sum(batch["skipped"].values())
        for key, reason, detail in batch["skipped_samples"]:
            assert reason_of.setdefault(key, reason) == reason and detail
        used_keys.update(batch["sample_keys"])
    assert not used_keys & bad_keys
    assert set(reason_of) == bad_keys
    assert reason_of["bad/empty.jpg"] == "empty_file" and reason_of["bad/page.jpg"] == "unsupported_format"
    assert reason_of["bad/truncated.jpg"] == "truncated"
    assert all(count >= 2 for count in totals.values()) and sum(totals.values()) >= 6


def test_decode_image_reasons_and_bounds():
    rgb = decode_image(_encoded(1, fmt="PNG"))
    assert rgb.mode == "RGB" and rgb.size == (72, 64)
    with pytest.raises(DecodeError) as info:
        decode_image(b"")
    assert info.value.reason == "empty_file"
    with pytest.raises(DecodeError) as info:
        decode_image(b"<html>not an image</html>")
    assert info.value.reason == "unsupported_format"
    with pytest.raises(DecodeError) as info:
        decode_image(_encoded(2), max_pixels=1000)
    assert info.value.reason == "decompression_bomb"
    # 16-bit grayscale is scaled, not clipped to white by convert("RGB").
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    decoded = np.asarray(decode_image(buffer.getvalue()))
    assert len(np.unique(decoded[..., 0])) > 200 and decoded.min() == 0 and decoded.max() == 255


def test_build_train_loader_from_config_sections(image_dir):
    train = TrainSection(dataset_path=str(image_dir), batch_size_per_gpu=2, num_workers=0)
    crops = CropsConfig(global_crops_size=32, local_crops_size=16, local_crops_number=0)
    loader = build_train_loader(train, crops, IbotConfig(), patch_size=8, rank=1, world_size=2, start_batch=4)
    batch = next(iter(loader))
    assert batch["batch_index"] == 4 and batch["collated_global_crops"].shape == (4, 3, 32, 32)
    assert batch["collated_local_crops"].shape == (0, 3, 16, 16)
    assert batch["collated_masks"].shape == (4, 4 * 4)  # the mask grid follows patch_size
    assert loader.loader_state() == {
        "next_batch": 5,
        "seed": train.seed,
        "rank": 1,
        "world_size": 2,
        "batch_size": 2,
        "num_samples": 12,
    }


def test_decode_image_applies_exif_orientation():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white, landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image(buf.getvalue())
    assert upright.size == (20, 40)  # portrait once turned
    top = np.asarray(upright)[:10].mean()
    bottom = np.asarray(upright)[-10:].mean()
    assert top > 200 and bottom < 50  # the white left half is on top after a 90-degree clockwise turn
