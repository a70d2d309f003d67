"""bench/learning.py's emoji data set: classes, a split by emoji, and a clear exit when its packages are missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# bench/learning.py is a script, not a package: loaded by path, as bench/target_entropy.py does
_spec = importlib.util.spec_from_file_location(
    "bench_learning", Path(__file__).resolve().parents[2] / "bench" / "learning.py"
)
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)

MISSING = learning.missing_emoji_packages()
needs_emoji = pytest.mark.skipif(bool(MISSING), reason=f"apt-get install {' '.join(MISSING)}")


@needs_emoji
def test_emoji_split_is_seeded_and_keeps_each_emoji_in_one_split():
    split = learning.emoji_split()
    assert split == learning.emoji_split()
    assert list(split) == list(learning.EMOJI_CLASSES)
    seen: set[int] = set()
    for name, (train, val) in split.items():
        assert len(train) >= 10 and len(val) >= 6, name
        assert len(train) + len(val) <= learning.MAX_EMOJI_PER_CLASS
        emoji = set(train) | set(val)
        assert len(emoji) == len(train) + len(val), f"{name}: an emoji in both splits"
        assert not emoji & seen, f"{name}: an emoji in two classes"
        seen |= emoji
    assert 300 <= len(seen) <= 600  # a few hundred emoji, up to two drawings each


@needs_emoji
def test_write_emoji_gives_every_class_in_both_splits_at_bench_size(tmp_path, monkeypatch):
    monkeypatch.setattr(learning, "MAX_EMOJI_PER_CLASS", 5)  # the whole set takes seconds to draw; the rule is the same
    assert learning.write_emoji(tmp_path) == len(learning.EMOJI_CLASSES)
    for split in ("knn_train", "knn_val"):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == sorted(learning.EMOJI_CLASSES)
    train = sorted((tmp_path / "knn_train").rglob("*.png"))
    val = sorted((tmp_path / "knn_val").rglob("*.png"))
    assert len(list((tmp_path / "ssl").glob("*.png"))) == len(train)  # SSL sees kNN-train only
    # both artworks are used: more images than emoji, at most two per emoji
    n_emoji = sum(len(t) + len(v) for t, v in learning.emoji_split().values())
    assert n_emoji < len(train) + len(val) <= 2 * n_emoji
    for path in val[::4]:
        image = Image.open(path)
        assert image.size == (learning.IMAGE_PX, learning.IMAGE_PX) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float32)
        corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners.min(1) >= 200).any(), f"{path}: no light background in any corner"
        assert pixels.std() > 10, f"{path}: nothing drawn"


def test_missing_emoji_package_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(learning, "EMOJI_TEST", tmp_path / "absent" / "emoji-test.txt")
    assert learning.main(["--data", "emoji", "--iters", "20", "--workdir", str(tmp_path / "run")]) == 2
    assert "apt-get install unicode-data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the check
    with pytest.raises(FileNotFoundError, match="unicode-data"):
        learning.write_emoji(tmp_path / "data")
