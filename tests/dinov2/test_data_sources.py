"""Tests for the image sources: folders, file lists and WebDataset tar shards with random access."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dinov2.data.sources import ImageFolderSource, TarShardSource, open_source


def _jpeg(seed, size=24, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    files = {
        "b/z/deep.JPG": _jpeg(0),
        "a/one.jpeg": _jpeg(1),
        "a/two.Png": _jpeg(2, fmt="PNG"),
        "top.webp": _jpeg(3, fmt="WEBP"),
        "c/three.jpg": _jpeg(4),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "c" / "meta.json").write_text("{}")
    return root, files


def test_folder_source_is_recursive_sorted_and_case_insensitive(folder):
    root, files = folder
    source = ImageFolderSource(root)
    assert len(source) == len(files)
    keys = [source.key(i) for i in range(len(source))]
    assert keys == sorted(files)
    for i, key in enumerate(keys):
        assert source.read_bytes(i) == files[key]
    assert [open_source(str(root)).key(i) for i in range(len(source))] == keys


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        open_source(str(tmp_path / "empty"))


def test_file_list(folder, tmp_path):
    root, files = folder
    listing = tmp_path / "list.txt"
    listing.write_text("# training images\nimages/c/three.jpg\n\n" + str(root / "a" / "one.jpeg") + "\n")
    source = open_source(str(listing))
    assert len(source) == 2
    assert source.read_bytes(0) == files["c/three.jpg"] and source.read_bytes(1) == files["a/one.jpeg"]
    listing.write_text("images/c/missing.jpg\n")
    with pytest.raises(ValueError, match="missing"):
        open_source(str(listing))


@pytest.fixture
def shards(tmp_path):
    """Three shards written with webdataset, plus expected (key, bytes) in order."""
    expected = []
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:06d}.tar")) as sink:
            for j in range(4):
                key = f"s{shard}_{j:03d}"
                fmt, ext = ("PNG", "png") if j == 3 else ("JPEG", "jpg")
                data = _jpeg(10 * shard + j, fmt=fmt)
                sink.write({"__key__": key, ext: data, "json": {"id": key}, "cls": j})
                expected.append((key, data))
    return tmp_path, expected


def test_tar_shards_random_access(shards):
    tmp_path, expected = shards
    source = open_source(str(tmp_path / "shard-{000000..000002}.tar"))
    assert isinstance(source, TarShardSource) and len(source) == len(expected)
    for i in [7, 0, 11, 3, 7]:  # random order, repeated
        assert source.key(i) == expected[i][0]
        assert source.read_bytes(i) == expected[i][1]
    globbed = open_source(str(tmp_path / "shard-*.tar"))
    assert [globbed.key(i) for i in range(len(globbed))] == [k for k, _ in expected]
    # Picklable (DataLoader workers): descriptors are dropped and reopened.
    clone = pickle.loads(pickle.dumps(source))
    assert clone.read_bytes(5) == expected[5][1]


def test_tar_grouping_by_key_with_nested_paths(tmp_path):
    path = tmp_path / "raw.tar"
    members = {
        "dir/x001.json": b"{}",
        "dir/x001.jpg": _jpeg(1),
        "dir/x002.cls": b"3",  # no image: ignored
        "dir/x003.seg.png": _jpeg(3, fmt="PNG"),
        "dir/x003.jpg": _jpeg(4),  # jpg preferred over png for the same key
        "n01_5.JPEG": _jpeg(5),  # ImageNet-22k style upper-case extension
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = TarShardSource([str(path)])
    assert [source.key(i) for i in range(len(source))] == ["dir/x001", "dir/x003", "n01_5"]
    assert source.read_bytes(0) == members["dir/x001.jpg"]
    assert source.read_bytes(1) == members["dir/x003.jpg"]
    assert source.read_bytes(2) == members["n01_5.JPEG"]


def test_compressed_tar_and_no_match_are_errors(tmp_path):
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("a.jpg")
        data = _jpeg(0)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "c.tar.gz").rename(tmp_path / "c.tar")
    with pytest.raises(ValueError, match="uncompressed"):
        open_source(str(tmp_path / "c.tar"))
    with pytest.raises(ValueError, match="no files match"):
        open_source(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(ValueError, match="expected an existing directory"):
        open_source(str(tmp_path / "not-there"))


def test_official_imagenet_string(tmp_path):
    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "train" / "n01" / "n01_1.JPEG").write_bytes(_jpeg(0))
    source = open_source(f"ImageNet:split=TRAIN:root={tmp_path}")
    assert len(source) == 1 and source.key(0) == "n01/n01_1.JPEG"
    with pytest.raises(ValueError, match="root"):
        open_source("ImageNet:split=TRAIN")
