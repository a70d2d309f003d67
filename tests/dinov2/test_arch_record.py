"""A model trained with a non-official head size (head_dim 16) reloads with its own attention through every tool.

Every file the trainer and the exporter write records the architecture; every loader (kNN, linear probe, extract,
visualize, export, the curation embedder) rebuilds the model from it and gives the trained teacher's features exactly.
Files without a record (bare official keys) of a non-official width need the head count named.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.config import load_config
from dinov2.distributed.env import DistEnv
from dinov2.eval import extract, knn, linear, visualize
from dinov2.eval.datasets import open_images
from dinov2.eval.features import extract_features
from dinov2.train.regime import resolve_regime
from dinov2.train.train import build_student_teacher, train
from dinov2.weights import export_backbone, load_backbone
from dinov2.weights.export import main as export_main
from dinov2.weights.load import sidecar_path

HEADS = 4  # embed_dim 64 / 4 heads = head_dim 16; the old D/64 rule would have rebuilt it with one head
SIZE = 32  # training crop and tool resolution: 4x4 patches of 8 px
COLOURS = {"blue": (40, 50, 230), "green": (30, 200, 40), "red": (220, 30, 30)}


def _overrides(data: Path, out: Path) -> list[str]:
    return [
        f"train.dataset_path={data}", f"train.output_dir={out}", "student.arch=vit_custom", "student.embed_dim=64",
        "student.depth=2", f"student.num_heads={HEADS}", "student.patch_size=8", "student.num_register_tokens=2",
        f"crops.global_crops_size={SIZE}", "crops.local_crops_size=16", "crops.local_crops_number=2",
        "dino.head_n_prototypes=32", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=32", "train.batch_size_per_gpu=4", "train.num_workers=0", "train.max_iter=2",
        "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=2", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
        "teacher.warmup_teacher_temp_epochs=1", "train.device=cpu", "train.autocast_dtype=fp32",
        "evaluation.eval_period_iterations=2", "train.checkpoint_period=2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-iteration run on class folders of coloured squares, the reference teacher and the files it wrote."""
    root = tmp_path_factory.mktemp("arch_record")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(90, 150, size=(40, 40, 3), dtype=np.uint8)
            pixels[8:30, 6:28] = colour
            Image.fromarray(pixels).save(root / "data" / name / f"{name}{i}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(None, _overrides(root / "data", root / "run"))
    train(cfg, DistEnv.from_environment())
    state = torch.load(root / "run" / "checkpoints" / "iter_0000001" / "state.pth", weights_only=True)
    model = build_student_teacher(resolve_regime(cfg, 1)[0])  # the run's regime: its Sinkhorn-Knopp queue buffers
    model.load_state_dict(state["model"])
    yield {"root": root, "data": root / "data", "run": root / "run", "teacher": model.teacher["backbone"].eval()}
    torch.set_num_threads(threads)


def _features(model: torch.nn.Module, side: int = SIZE) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval().forward_features(x)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _assert_same_model(loaded: torch.nn.Module, teacher: torch.nn.Module, recorded: bool = True) -> None:
    assert loaded.num_heads == HEADS
    if recorded:  # the training config's interpolation, not the hub default of a register model (0.0, antialias)
        assert (loaded.interpolate_offset, loaded.interpolate_antialias) == (0.1, False)
    for side in (SIZE, 48) if recorded else (SIZE,):  # native grid, and an interpolated one
        ours, theirs = _features(loaded, side), _features(teacher, side)
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_every_written_file_reloads_the_trained_teacher(trained, tmp_path):
    export = trained["run"] / "eval" / "training_1"
    files = [
        trained["run"] / "checkpoints" / "iter_0000001" / "state.pth",
        export / "teacher_checkpoint.pth",
        export / "teacher_backbone_hub.pth",
        export / "teacher_backbone_hub.safetensors",
    ]
    for fmt, out in (("hf", "hf"), ("timm", "t.safetensors"), ("timm", "t.pth"), ("hub", "h.pth")):
        args = ["--weights", str(files[0]), "--format", fmt, "--out", str(tmp_path / out)]
        assert export_main(args) == 0
        files.append(tmp_path / out)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_attention_heads"] == HEADS
    for path in files:
        _assert_same_model(load_backbone(path), trained["teacher"])


def test_extract_knn_linear_visualize_give_the_teacher_results(trained, tmp_path):
    weights = trained["run"] / "eval" / "training_1" / "teacher_backbone_hub.pth"
    data, teacher = trained["data"], trained["teacher"]

    base = ["--weights", str(weights), "--image-size", str(SIZE)]
    assert extract.main([*base, "--data", str(data), "--output-dir", str(tmp_path / "x"), "--features", "cls"]) == 0
    expected, _ = extract_features(teacher, open_images(data), SIZE, ("cls",))
    assert np.array_equal(np.load(tmp_path / "x" / "cls.npy"), expected["cls"].numpy())

    args = [*base, "--train-dataset", str(data), "--val-dataset", str(data), "--nb-knn", "3"]
    assert knn.main([*args, "--output-dir", str(tmp_path / "k")]) == 0
    reference = knn.evaluate_knn(teacher, data, data, SIZE, ks=(3,))
    assert json.loads((tmp_path / "k" / "results_eval_knn.json").read_text()) == json.loads(json.dumps(reference))

    args = [*base, "--train-dataset", str(data), "--val-dataset", str(data), "--epochs", "2", "--lrs", "0.1",
            "--n-last-blocks", "1"]  # fmt: skip
    assert linear.main([*args, "--output-dir", str(tmp_path / "l")]) == 0
    linear.run_linear_eval(teacher, str(data), tmp_path / "l_ref", str(data), None, 0.1, SIZE, (0.1,), (1,), 2,
                           batch_size=256)
    ours, theirs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("l", "l_ref"))
    assert ours["grid"] == theirs["grid"]

    image = str(data / "red" / "red0.png")
    assert visualize.main(["--weights", str(weights), "--images", image, "--output-dir", str(tmp_path / "v"),
                           "--image-size", str(SIZE)]) == 0  # fmt: skip
    visualize.visualize_files(teacher, [image], tmp_path / "v_ref", SIZE)
    assert (tmp_path / "v" / "red0.png").read_bytes() == (tmp_path / "v_ref" / "red0.png").read_bytes()
    with Image.open(tmp_path / "v" / "red0.png") as grid:
        assert grid.size == ((1 + HEADS) * SIZE, 2 * SIZE)  # one attention map per trained head


def test_curation_embedder_uses_the_recorded_heads(trained):
    from data_pipeline.core.config import EmbedConfig
    from data_pipeline.embed.embedders import build_embedder

    weights = trained["run"] / "eval" / "training_1" / "teacher_backbone_hub.safetensors"
    embedder = build_embedder("dinov2", str(weights), EmbedConfig(ssl_resolution=SIZE, device="cpu"), "ssl")
    assert embedder.model.num_heads == HEADS
    batch = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trained["teacher"].forward_features(batch)["x_norm_clstoken"], dim=1)
    assert torch.equal(embedder.embed(batch), expected)


def test_bare_official_keys_need_the_head_count_named(trained, tmp_path, capsys):
    hub_file = trained["run"] / "eval" / "training_1" / "teacher_backbone_hub.pth"
    bare = tmp_path / "bare.pth"
    bare.write_bytes(hub_file.read_bytes())  # the tensors alone, without the .arch.json record beside them
    assert not sidecar_path(bare).exists()
    with pytest.raises(ValueError, match="--num-heads"):
        load_backbone(bare)
    _assert_same_model(load_backbone(bare, num_heads=HEADS), trained["teacher"], recorded=False)

    args = ["--weights", str(bare), "--data", str(trained["data"]), "--output-dir", str(tmp_path / "x")]
    assert extract.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num-heads" in err and "Traceback" not in err
    assert extract.main([*args, "--num-heads", str(HEADS), "--image-size", str(SIZE)]) == 0

    # Re-exporting with the count named records it for every later loader.
    assert export_main(["--weights", str(bare), "--num-heads", str(HEADS), "--format", "hub",
                        "--out", str(tmp_path / "recorded.pth")]) == 0  # fmt: skip
    assert load_backbone(tmp_path / "recorded.pth").num_heads == HEADS


def test_a_record_contradicting_the_weights_or_the_user_is_an_error(trained, tmp_path):
    export = trained["run"] / "eval" / "training_1"
    with pytest.raises(ValueError, match="records num_heads=4, but num_heads=2"):
        load_backbone(export / "teacher_backbone_hub.safetensors", num_heads=2)
    copy = tmp_path / "w.pth"
    copy.write_bytes((export / "teacher_backbone_hub.pth").read_bytes())
    record = json.loads(sidecar_path(export / "teacher_backbone_hub.pth").read_text())
    sidecar_path(copy).write_text(json.dumps({**record, "depth": 3}))
    with pytest.raises(ValueError, match="disagrees with the weights.*depth 3/2"):
        load_backbone(copy)
    sidecar_path(copy).write_text(json.dumps({**record, "num_heads": "four"}))
    with pytest.raises(ValueError, match="'num_heads' has a bad value"):
        load_backbone(copy)


def test_module_export_records_its_heads(tmp_path):
    from dinov2.models.registry import build_backbone

    model = build_backbone("vit_custom", embed_dim=64, depth=1, num_heads=8, patch_size=8, img_size=16,
                           init_values=1.0, block_chunks=0)  # fmt: skip
    for name in ("m.pth", "m.safetensors"):
        assert load_backbone(export_backbone(model, tmp_path / name)).num_heads == 8
