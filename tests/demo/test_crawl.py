"""The demo's crawl builder writes what its ground truth says, deterministically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.crawl import CLUSTER_SEED_PHOTOS, N_CAPTIONED, N_FLAGS, SAMPLE_SEED_PHOTOS, TRANSFORMS, build_crawl
from demo.dedup_eval import quality


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("crawl")
    return root, build_crawl(root, views_per_photo=4, n_distractors=6, seed=3)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truth_matches_files(crawl):
    root, records = crawl
    files = sorted(p.name for p in (root / "crawl").iterdir())
    assert files == sorted(r.file for r in records)
    by_file = {r.file: r for r in records}
    for r in records:
        with Image.open(root / "crawl" / r.file) as im:
            im.load()
        if r.transform in TRANSFORMS:
            original = by_file[r.duplicate_of]
            assert original.transform == "view" and original.view == r.view and original.photo == r.photo
        elif r.transform == "eval_copy":
            assert (root / r.duplicate_of).is_file() and r.duplicate_of.startswith("eval/")
        else:
            assert r.duplicate_of == ""
    assert sum(r.transform == "distractor" for r in records) == 6
    photo_views = [r for r in records if r.transform == "view" and r.family == "photo"]
    assert len(photo_views) == 4 * len({r.photo for r in records if r.photo})


def test_byte_copies_are_identical_and_others_differ(crawl):
    root, records = crawl
    by_file = {r.file: r for r in records}
    copies = [r for r in records if r.transform in TRANSFORMS]
    assert copies, "the seed should give some near-copies"
    for r in copies:
        same = _digest(root / "crawl" / r.file) == _digest(root / "crawl" / by_file[r.duplicate_of].file)
        assert same == (r.transform == "bytes"), r


def test_seed_eval_and_knn_folders(crawl):
    root, _ = crawl
    assert {p.name.split("_")[0] for p in (root / "seeds" / "sample_set").iterdir()} == set(SAMPLE_SEED_PHOTOS)
    assert {p.name.rsplit("_", 1)[0] for p in (root / "seeds" / "cluster_set").iterdir()} == set(CLUSTER_SEED_PHOTOS)
    eval_classes = sorted(p.name for p in (root / "eval").iterdir())
    assert eval_classes == sorted(p.name for p in (root / "knn_train").iterdir())
    assert all(len(list((root / "eval" / c).iterdir())) == 8 for c in eval_classes)
    truth = json.loads((root / "truth.json").read_text())
    assert [t["file"] for t in truth] == sorted(p.name for p in (root / "crawl").iterdir())


def test_deterministic_and_idempotent(crawl, tmp_path):
    root, records = crawl
    again = build_crawl(tmp_path, views_per_photo=4, n_distractors=6, seed=3)
    assert again == records
    for r in records:
        assert _digest(tmp_path / "crawl" / r.file) == _digest(root / "crawl" / r.file)
    mtime = (tmp_path / "truth.json").stat().st_mtime_ns
    assert build_crawl(tmp_path, views_per_photo=4, n_distractors=6, seed=3) == records
    assert (tmp_path / "truth.json").stat().st_mtime_ns == mtime


def test_templated_families_are_distinct_pictures(crawl):
    root, records = crawl
    originals = [r for r in records if r.transform == "view" and r.family != "photo"]
    count = {f: sum(r.family == f for r in originals) for f in ("card", "flag", "recolour", "caption")}
    assert count["card"] == 52 and count["flag"] == N_FLAGS and count["caption"] == N_CAPTIONED
    assert len({r.view for r in originals}) == len(originals)  # one picture per original
    pixels = set()
    for r in originals:
        with Image.open(root / "crawl" / r.file) as im:
            pixels.add(hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest())
    assert len(pixels) == len(originals)  # same template, different pictures
    copies = [r for r in records if r.family == "card" and r.transform != "view"]
    assert copies and all(r.transform in TRANSFORMS and r.transform != "flip" for r in copies)


def test_quality_counts_removals_against_the_kept_image():
    # a, b, c show one picture (2 true duplicates); d another. Removing b for a is right, d for a is wrong.
    group = {"a": "p", "b": "p", "c": "p", "d": "q"}
    names = ["a", "b", "c", "d"]
    ok = np.ones(4, dtype=bool)
    precision, recall, removed = quality(group, names, np.array([0, 0, 2, 0]), ok)
    assert (precision, recall, removed) == (0.5, 0.5, 2)
    assert quality(group, names, np.arange(4), ok) == (1.0, 0.0, 0)
