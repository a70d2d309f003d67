"""Evaluation and user tools: labelled folders/shards, features, linear probe, extract and visualize CLIs.

Everything runs on a tiny random-init ViT (D=128, 2 heads, depth 4, patch 8, 2 registers) saved as a hub file, and
on small PIL-drawn datasets: class 0/1/2 = red/green/blue squares on grey, which even a random ViT separates.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dinov2.eval import knn, linear
from dinov2.eval.datasets import UNLABELLED, open_images, open_labelled
from dinov2.eval.features import compute_features, extract_features
from dinov2.models.registry import build_backbone
from dinov2.weights import export_backbone, load_backbone

IMAGE_SIZE = 32  # 4 x 4 patches of 8 pixels
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230)}
CLASSES = sorted(COLOURS)  # folder order: blue, green, red


def _draw(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A coloured square at a random place on a noisy grey background."""
    pixels = rng.integers(100, 140, size=(size, size, 3), dtype=np.uint8)
    side = int(rng.integers(14, 24))
    x, y = rng.integers(0, size - side, size=2)
    pixels[y : y + side, x : x + side] = np.clip(np.array(colour) + rng.integers(-20, 20, 3), 0, 255)
    return Image.fromarray(pixels)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _draw(colour, rng).save(root / name / f"{name}_{i:02d}.png")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, per_class: int, seed: int, label_of=None) -> Path:
    """One tar with ``.png``, ``.cls`` (folder-order label, or ``label_of(label)``) and ``.json`` per sample."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(per_class):
            for label, name in enumerate(CLASSES):
                key = f"{name}_{i:03d}"
                cls = label if label_of is None else label_of(label)
                _add(tar, f"{key}.png", _png_bytes(_draw(COLOURS[name], rng)))
                _add(tar, f"{key}.cls", str(cls).encode())
                _add(tar, f"{key}.json", json.dumps({"class": CLASSES[cls]}).encode())
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_data")
    return {
        "train": _write_folder(root / "train", per_class=10, seed=0),
        "val": _write_folder(root / "val", per_class=5, seed=1),
        "test_shard": _write_shard(root / "test_shards" / "test-000000.tar", per_class=4, seed=2),
        "train_shard": _write_shard(root / "train_shards" / "train-000000.tar", per_class=8, seed=3),
        # Same images as test_shard, labels rotated: a probe selected on this set would pick differently.
        "adversarial_test": _write_shard(
            root / "adv_shards" / "adv-000000.tar", per_class=4, seed=2, label_of=lambda c: (c + 1) % 3
        ),
        "root": root,
    }


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_backbone(
        "vit_custom", embed_dim=128, depth=4, num_heads=2, patch_size=8, img_size=IMAGE_SIZE, num_register_tokens=2,
        init_values=1.0, block_chunks=0,
    )  # fmt: skip
    return export_backbone(model, tmp_path_factory.mktemp("weights") / "tiny_hub.pth", layout="hub")


@pytest.fixture(scope="module")
def backbone(backbone_file):
    return load_backbone(backbone_file)


# ---------------------------------------------------------------- datasets


def test_folder_and_shard_datasets(data):
    folder = open_labelled(data["train"])
    assert folder.classes == CLASSES and len(folder) == 30
    assert folder.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    official = open_labelled(f"ImageNet:root={data['root']}:split=TRAIN")  # the official dataset string
    assert official.paths == folder.paths and official.classes == CLASSES
    shards = open_labelled(str(data["test_shard"]))
    assert len(shards) == 12
    assert shards.labels.tolist() == [0, 1, 2] * 4  # tar order, from the .cls members
    assert shards.classes == CLASSES  # names from the .json "class" fields
    assert shards.source.key(1) == "green_000"
    # A folder holding only .tar files is read as shards; classes.txt next to them overrides the names.
    (data["test_shard"].parent / "classes.txt").write_text("c0\nc1\nc2\n")
    try:
        assert open_labelled(data["test_shard"].parent).classes == ["c0", "c1", "c2"]
    finally:
        (data["test_shard"].parent / "classes.txt").unlink()


def test_shard_without_cls_is_rejected_for_eval_but_readable_unlabelled(tmp_path):
    shard = tmp_path / "nolabel.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.png", _png_bytes(_draw((1, 2, 3), np.random.default_rng(0))))
    with pytest.raises(ValueError, match="no .cls label"):
        open_labelled(str(shard))
    assert open_images(str(shard)).labels.tolist() == [UNLABELLED]


# ---------------------------------------------------------------- features and kNN


def test_features_match_forward_features(backbone, data):
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    feats = compute_features(backbone, x, ("cls", "patch_mean", "registers", "layers"), n_last_blocks=3)
    with torch.no_grad():
        ref = backbone.forward_features(x)
        inter = backbone.get_intermediate_layers(x, n=3, return_class_token=True)
    assert feats["layers"].shape == (2, 3, 128) and feats["registers"].shape == (2, 2, 128)
    torch.testing.assert_close(feats["cls"], ref["x_norm_clstoken"])
    torch.testing.assert_close(feats["patch_mean"], ref["x_norm_patchtokens"].mean(1))
    torch.testing.assert_close(feats["registers"], ref["x_norm_regtokens"])
    torch.testing.assert_close(feats["layers"], torch.stack([cls for _, cls in inter], dim=1))
    # Without "layers" the plain forward_features path is used; it must agree with the hooked one.
    plain = compute_features(backbone, x, ("cls", "registers"))
    torch.testing.assert_close(plain["cls"], feats["cls"])
    torch.testing.assert_close(plain["registers"], feats["registers"])


def test_knn_on_shards_equals_folder_protocol(backbone, data):
    # Train on shards, evaluate on a class folder: labels agree because both follow the sorted class order.
    results = knn.evaluate_knn(backbone, str(data["train_shard"]), data["val"], IMAGE_SIZE, ks=(1, 5))
    assert results["n_train"] == 24 and results["n_val"] == 15
    assert results["top1"]["1"] == 100.0
    # The knn_classify protocol itself: separable synthetic features give 100%.
    feats, valid = extract_features(backbone, open_labelled(data["train"]), IMAGE_SIZE, ("cls",))
    feats = torch.nn.functional.normalize(feats["cls"], dim=1)
    labels = open_labelled(data["train"]).labels
    assert valid.all() and knn.knn_classify(feats[::2], labels[::2], feats[1::2], labels[1::2], ks=(3,)) == {3: 100.0}


def test_knn_cli_on_shards(backbone_file, data, tmp_path):
    args = ["--weights", str(backbone_file), "--train-dataset", str(data["train_shard"]),
            "--val-dataset", str(data["test_shard"]), "--image-size", str(IMAGE_SIZE), "--nb-knn", "5",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert knn.main(args) == 0
    assert json.loads((tmp_path / "results_eval_knn.json").read_text())["top1"]["5"] == 100.0


# ---------------------------------------------------------------- linear probe


def _linear_args(backbone_file, data, out: Path, test: str | None) -> list[str]:
    args = ["--weights", str(backbone_file), "--train-dataset", str(data["train"]), "--val-dataset", str(data["val"]),
            "--output-dir", str(out), "--image-size", str(IMAGE_SIZE), "--epochs", "30", "--batch-size", "8",
            "--lrs", "0.01", "0.1", "1.0"]  # fmt: skip
    return args + (["--test-dataset", test] if test else [])


def test_linear_probe_cli_reaches_high_accuracy(backbone_file, data, tmp_path):
    assert linear.main(_linear_args(backbone_file, data, tmp_path, str(data["test_shard"]))) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["grid"]) == 3 * 2 * 2  # lrs x {1, 4} blocks x {cls, cls+avgpool}
    assert {(g["n_blocks"], g["avgpool"]) for g in results["grid"]} == {(1, False), (1, True), (4, False), (4, True)}
    best = max(g["val_accuracy"] for g in results["grid"])
    assert results["val_accuracy"] == best >= 90.0
    assert results["test_accuracy"] >= 90.0 and results["n_test"] == 12
    head = torch.load(tmp_path / "linear_head.pth", weights_only=True)
    in_dim = 128 * head["n_blocks"] + (128 if head["avgpool"] else 0)
    assert head["weight"].shape == (3, in_dim) and head["classes"] == CLASSES
    assert results["chosen"]["name"] == linear.HeadConfig(head["n_blocks"], head["avgpool"], head["lr"]).name


def test_linear_selection_never_reads_test(backbone, data, tmp_path):
    common = dict(image_size=IMAGE_SIZE, lrs=(0.01, 0.1, 1.0), epochs=5, batch_size=8)
    # 1. The test split is opened only after selection is final and on disk: a test folder that exists but holds
    #    no images fails the run only once results.json (with the chosen head) and linear_head.pth exist.
    (tmp_path / "empty_test").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        linear.run_linear_eval(backbone, data["train"], tmp_path / "a", data["val"], tmp_path / "empty_test", **common)
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["chosen"]["name"] and on_disk["test_accuracy"] is None
    assert (tmp_path / "a" / "linear_head.pth").is_file()
    # 2. The selection does not depend on the test split's content: a real and a label-rotated test set give the
    #    same grid and choice, while their test accuracies differ.
    real = linear.run_linear_eval(backbone, data["train"], tmp_path / "b", data["val"], str(data["test_shard"]),
                                  **common)  # fmt: skip
    adversarial = linear.run_linear_eval(backbone, data["train"], tmp_path / "c", data["val"],
                                         str(data["adversarial_test"]), **common)  # fmt: skip
    assert real["grid"] == adversarial["grid"] == on_disk["grid"]
    assert real["chosen"] == adversarial["chosen"] == on_disk["chosen"]
    assert real["test_accuracy"] > adversarial["test_accuracy"]


def test_official_grid():
    grid = linear.make_grid(linear.DEFAULT_LRS, linear.DEFAULT_BLOCKS, depth=12)
    assert len(grid) == 52 and len({c.name for c in grid}) == 52
    assert grid[-1].name == "classifier_4_blocks_avgpool_True_lr_0_10000"
    # A backbone shallower than 4 blocks caps n_blocks at its depth.
    assert {c.n_blocks for c in linear.make_grid((0.1,), (1, 4), depth=2)} == {1, 2}


def test_grouped_heads_equal_separately_trained_heads():
    # The wide-head trick (per-row lr on the gradient, optimizer at lr 1) must equal one SGD per head.
    g = torch.Generator().manual_seed(0)
    feats = {"layers": torch.randn(20, 4, 6, generator=g), "patch_mean": torch.randn(20, 6, generator=g)}
    labels = torch.randint(0, 3, (20,), generator=g)
    grid = [linear.HeadConfig(4, True, 0.05), linear.HeadConfig(4, True, 0.5)]
    torch.manual_seed(1)
    heads = linear.train_heads(feats, labels, grid, n_classes=3, epochs=3, batch_size=8, seed=0)
    torch.manual_seed(1)
    wide = torch.nn.Linear(30, 6)  # the wide head (2 heads x 3 classes) is built, then re-initialised
    init = torch.nn.init.normal_(wide.weight, std=0.01).detach()
    for j, config in enumerate(grid):
        ref = torch.nn.Linear(30, 3)
        with torch.no_grad():
            ref.weight.copy_(init[3 * j : 3 * j + 3])
            ref.bias.zero_()
        opt = torch.optim.SGD(ref.parameters(), lr=config.lr * 8 / 256, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * 3)
        order_gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            order = torch.randperm(20, generator=order_gen)
            for start in range(0, 20, 8):
                idx = order[start : start + 8]
                x = linear.linear_input({k: v[idx] for k, v in feats.items()}, 4, True)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ref(x), labels[idx]).backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(heads[config.name].weight, ref.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(heads[config.name].bias, ref.bias, rtol=1e-4, atol=1e-6)
    assert not torch.equal(heads[grid[0].name].weight, heads[grid[1].name].weight)


def test_linear_val_fraction_on_shards(backbone_file, data, tmp_path):
    args = ["--weights", str(backbone_file), "--train-dataset", str(data["train_shard"]), "--val-fraction", "0.25",
            "--output-dir", str(tmp_path), "--image-size", str(IMAGE_SIZE), "--epochs", "20", "--batch-size", "8",
            "--lrs", "0.1", "1.0", "--n-last-blocks", "1"]  # fmt: skip
    assert linear.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["n_train"], results["n_val"]) == (18, 6) and results["val_source"].startswith("seeded 0.25")
    assert len(results["grid"]) == 4 and results["val_accuracy"] >= 80.0 and results["test_accuracy"] is None


def test_missing_test_dataset_fails_fast(backbone, data, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        linear.run_linear_eval(backbone, data["train"], tmp_path, data["val"], tmp_path / "typo", image_size=IMAGE_SIZE)
    assert not (tmp_path / "results.json").exists()


def test_val_fraction_split_is_seeded_and_disjoint(data):
    train = open_labelled(data["train"])
    a_train, a_val = linear.split_train_val(train, 0.2, seed=0)
    b_train, b_val = linear.split_train_val(train, 0.2, seed=0)
    keys = lambda d: [d.source.key(i) for i in range(len(d))]  # noqa: E731
    assert len(a_val) == 6 and len(a_train) == 24
    assert keys(a_val) == keys(b_val) and not set(keys(a_val)) & set(keys(a_train))
    assert keys(linear.split_train_val(train, 0.2, seed=1)[1]) != keys(a_val)


# ---------------------------------------------------------------- extract


def test_extract_npy_shapes_ids_and_order(backbone_file, data, tmp_path):
    from dinov2.eval import extract

    folder = data["root"] / "extract_in"
    _write_folder(folder, per_class=2, seed=5)
    (folder / "red" / "broken.png").write_bytes(b"not a png")
    args = ["--weights", str(backbone_file), "--data", str(folder), "--output-dir", str(tmp_path),
            "--features", "cls,patch_mean,registers,layers", "--layers", "2",
            "--image-size", str(IMAGE_SIZE)]  # fmt: skip
    assert extract.main(args) == 0
    ids = pq.read_table(tmp_path / "ids.parquet").to_pydict()
    n = 7
    assert ids["id"] == list(range(n))
    assert ids["key"] == sorted(ids["key"]) and ids["key"][0] == "blue/blue_00.png" and "red/broken.png" in ids["key"]
    assert ids["label"] == [0, 0, 1, 1, 2, 2, 2]
    broken = ids["key"].index("red/broken.png")
    assert ids["valid"] == [i != broken for i in range(n)]
    shapes = {"cls": (n, 128), "patch_mean": (n, 128), "registers": (n, 2, 128), "layers": (n, 2, 128)}
    arrays = {k: np.load(tmp_path / f"{k}.npy") for k in shapes}
    assert {k: a.shape for k, a in arrays.items()} == shapes
    assert all(a.dtype == np.float32 for a in arrays.values())
    np.testing.assert_array_equal(arrays["layers"][:, -1], arrays["cls"])
    assert not arrays["cls"][broken].any() and np.abs(arrays["cls"][0]).sum() > 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file is left behind


def test_extract_parquet_shards_match_npy(backbone_file, data, tmp_path):
    from dinov2.eval import extract

    base = ["--weights", str(backbone_file), "--data", str(data["test_shard"]), "--features", "cls,registers",
            "--image-size", str(IMAGE_SIZE)]  # fmt: skip
    assert extract.main(base + ["--output-dir", str(tmp_path / "npy")]) == 0
    assert extract.main(base + ["--output-dir", str(tmp_path / "pq"), "--format", "parquet", "--dtype", "float16"]) == 0
    ids = pq.read_table(tmp_path / "pq" / "ids.parquet").to_pydict()
    assert ids["key"][:3] == ["blue_000", "green_000", "red_000"] and ids["label"][:3] == [0, 1, 2]
    assert ids["location"][0] == str(data["test_shard"])
    table = pq.read_table(tmp_path / "pq" / "features.parquet")
    assert json.loads(table.schema.metadata[b"shapes"]) == {"cls": [128], "registers": [2, 128]}
    cls16 = np.array(table.column("cls").to_pylist(), dtype=np.float32)
    cls32 = np.load(tmp_path / "npy" / "cls.npy")
    assert table.column("id").to_pylist() == list(range(12)) and cls16.shape == (12, 128)
    np.testing.assert_allclose(cls16, cls32, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- visualize


def test_visualize_writes_grids(backbone_file, data, tmp_path):
    from dinov2.eval import visualize

    images = [str(data["train"] / "red" / "red_00.png"), str(data["val"] / "blue" / "blue_01.png")]
    args = ["--weights", str(backbone_file), "--images", *images, "--output-dir", str(tmp_path),
            "--image-size", "48", "--threshold", "0.6"]  # fmt: skip
    assert visualize.main(args) == 0
    for name in ("red_00.png", "blue_01.png"):
        with Image.open(tmp_path / name) as grid:
            assert grid.size == ((1 + 2) * 48, 2 * 48)  # input + 2 heads wide, 2 rows
            pixels = np.asarray(grid.convert("RGB"), dtype=np.int64)
        tiles = [pixels[r * 48 : (r + 1) * 48, c * 48 : (c + 1) * 48] for r in range(2) for c in range(3)]
        # Every tile (input, attention per head, PCA, thresholded per head) shows structure.
        assert all(tile.std() > 1.0 for tile in tiles)


def test_visualize_rejects_size_not_multiple_of_patch(backbone_file, data, tmp_path, capsys):
    from dinov2.eval import visualize

    args = ["--weights", str(backbone_file), "--images", str(data["train"] / "red" / "red_00.png"),
            "--output-dir", str(tmp_path), "--image-size", "50"]  # fmt: skip
    assert visualize.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "multiple of the patch size 8" in err and "48" in err
    assert not list(tmp_path.glob("*.png"))


def test_threshold_mass_keeps_top_patches():
    from dinov2.eval.visualize import threshold_mass

    attention = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    kept = threshold_mass(attention, 0.6)
    assert kept[0].tolist() == [False, True, False, True]  # 0.5 + 0.3 hold >= 60% of the mass
    assert int(kept[1].sum()) == 3  # uniform: 3 of 4 patches needed to pass 60%


def test_pca_mask_separates_object_from_background():
    from dinov2.eval.visualize import pca_rgb

    g = torch.Generator().manual_seed(0)
    tokens = 0.05 * torch.randn(8, 8, 16, generator=g)
    tokens[2:6, 2:6] += torch.randn(16, generator=g) * 3  # an "object" in the middle
    rgb = pca_rgb(tokens.view(64, 16), grid=8, mask_background=True)
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    foreground = rgb.sum(-1) > 0
    assert foreground[2:6, 2:6].sum() >= 14 and foreground.sum() <= 18


def test_augmented_features_are_seeded_views(backbone, data):
    train = open_labelled(data["train"])
    plain, _ = extract_features(backbone, train, IMAGE_SIZE, ("cls",))
    view_a, _ = extract_features(backbone, train, IMAGE_SIZE, ("cls",), augment_seed=1)
    again, _ = extract_features(backbone, train, IMAGE_SIZE, ("cls",), batch_size=3, num_workers=2, augment_seed=1)
    view_b, _ = extract_features(backbone, train, IMAGE_SIZE, ("cls",), augment_seed=2)
    torch.testing.assert_close(view_a["cls"], again["cls"])  # batching and workers do not change a view
    assert not torch.allclose(view_a["cls"], view_b["cls"]) and not torch.allclose(view_a["cls"], plain["cls"])


def test_linear_probe_with_augmentation_reencodes_each_epoch(backbone, data, tmp_path, monkeypatch):
    seeds = []
    original = linear.extract_features

    def counting(*args, **kwargs):
        seeds.append(args[7] if len(args) > 7 else kwargs.get("augment_seed"))
        return original(*args, **kwargs)

    monkeypatch.setattr(linear, "extract_features", counting)
    results = linear.run_linear_eval(backbone, data["train"], tmp_path, data["val"], image_size=IMAGE_SIZE,
                                     lrs=(0.1, 1.0), epochs=4, batch_size=8, augment=True)
    assert results["train_augment"] is True and results["val_accuracy"] >= 80.0
    assert sorted(s for s in seeds if s is not None) == [0, 1, 2, 3]  # one fresh train view per epoch
    assert seeds.count(None) == 1  # val: the eval transform, once
