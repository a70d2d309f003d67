"""Recovery: a corrupt newest checkpoint falls back to the newest loadable one (kept, renamed), and a resumed run's
``training_metrics.json`` holds one line per iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinov2.config import load_config
from dinov2.distributed.env import DistEnv
from dinov2.train.metrics import drop_records_from
from dinov2.train.train import train


def _overrides(data: Path, out: Path, max_iter: int) -> list[str]:
    return [
        f"train.dataset_path={data}", f"train.output_dir={out}", "student.arch=vit_custom", "student.embed_dim=32",
        "student.depth=1", "student.num_heads=2", "student.patch_size=8", "crops.global_crops_size=16",
        "crops.local_crops_size=8", "crops.local_crops_number=1", "dino.head_n_prototypes=16",
        "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8", "ibot.head_n_prototypes=16",
        "train.batch_size_per_gpu=2", "train.num_workers=0", f"train.max_iter={max_iter}",
        "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=2", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
        "teacher.warmup_teacher_temp_epochs=1", "train.device=cpu", "train.log_period=1", "train.checkpoint_period=2",
        "train.autocast_dtype=fp32", "train.deterministic=true", "evaluation.eval_period_iterations=100",
    ]  # fmt: skip


def _run(data: Path, out: Path, max_iter: int) -> dict:
    return train(load_config(None, _overrides(data, out, max_iter)), DistEnv.from_environment())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_truncated_newest_checkpoint_falls_back_and_is_kept(image_folder, tmp_path):
    straight = _run(image_folder, tmp_path / "straight", 8)
    run = tmp_path / "run"
    _run(image_folder, run, 6)  # checkpoints after iterations 1, 3, 5
    newest = run / "checkpoints" / "iter_0000005" / "state.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # disk corruption under a committed marker
    resumed = _run(image_folder, run, 8)
    assert resumed["losses"] == straight["losses"][4:]  # continued exactly from iteration 3's checkpoint
    kept = run / "checkpoints" / "iter_0000005.corrupt" / "state.pth"
    assert kept.read_bytes() == data[: len(data) // 2]  # never deleted
    assert (run / "checkpoints" / "iter_0000007" / "COMMITTED").is_file()
    iterations = [json.loads(line)["iteration"] for line in (run / "training_metrics.json").read_text().splitlines()]
    assert iterations == list(range(8)), iterations  # 4 and 5 were redone: each appears once


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(image_folder, tmp_path):
    _run(image_folder, tmp_path, 2)  # one checkpoint, after iteration 1
    (tmp_path / "checkpoints" / "iter_0000001" / "state.pth").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"no checkpoint in .* loads \(iter_0000001 failed"):
        _run(image_folder, tmp_path, 4)
    assert (tmp_path / "checkpoints" / "iter_0000001.corrupt").is_dir()


def test_drop_records_from_rewrites_atomically(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(5)) + '{"iteration": 5, "lo')
    assert drop_records_from(path, 3) == 3  # 3, 4 and the torn line
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert drop_records_from(path, 3) == 0 and drop_records_from(tmp_path / "none.json", 0) == 0
    assert not list(tmp_path.glob("*.tmp"))
