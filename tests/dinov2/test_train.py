"""The trainer end to end on a tiny ViT: gradients everywhere, EMA teacher, exact resume, corrupt inputs, CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.config import load_config
from dinov2.data import build_train_loader
from dinov2.distributed.env import DistEnv
from dinov2.models.student_teacher import StudentTeacher
from dinov2.train.train import NonFiniteLossError, build_student_teacher, train

REPO = Path(__file__).resolve().parents[2]


def test_every_student_parameter_gets_a_gradient(image_folder, tmp_path, tiny_train):
    cfg = load_config(None, tiny_train(image_folder, 1, tmp_path) + ["ibot.separate_head=true"])
    model = build_student_teacher(cfg)
    model.train()
    loader = build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)
    batch = next(iter(loader))
    losses = model(batch, teacher_temp=0.04)
    assert {"dino_global_crops_loss", "dino_local_crops_loss", "koleo_loss", "ibot_loss"} <= set(losses)
    losses["total_loss"].backward()
    missing = [n for n, p in model.student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in model.teacher.parameters())


def test_three_steps_move_teacher_by_ema_and_export(image_folder, tmp_path, tiny_train):
    cfg = load_config(None, tiny_train(image_folder, 3, tmp_path))
    summary = train(cfg, DistEnv.from_environment())
    assert summary["iteration"] == 2 and len(summary["losses"]) == 3
    assert all(np.isfinite(summary["losses"]))
    state = torch.load(tmp_path / "checkpoints" / "iter_0000002" / "state.pth", weights_only=True)["model"]
    student = state["student.backbone.cls_token"]
    teacher = state["teacher.backbone.cls_token"]
    assert not torch.equal(student, teacher)  # the teacher lags: EMA, not a copy
    hub = torch.load(tmp_path / "eval" / "training_2" / "teacher_backbone_hub.pth", weights_only=True)
    assert torch.equal(hub["cls_token"], teacher)
    lines = (tmp_path / "training_metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]


def test_resume_is_bitwise_identical(image_folder, tmp_path, tiny_train):
    straight, split = tmp_path / "straight", tmp_path / "split"
    full = train(load_config(None, tiny_train(image_folder, 12, straight)), DistEnv.from_environment())
    first = train(load_config(None, tiny_train(image_folder, 6, split)), DistEnv.from_environment())
    second = train(load_config(None, tiny_train(image_folder, 12, split)), DistEnv.from_environment())
    assert first["losses"] + second["losses"] == full["losses"]
    a = torch.load(straight / "checkpoints" / "iter_0000011" / "state.pth", weights_only=True)["model"]
    b = torch.load(split / "checkpoints" / "iter_0000011" / "state.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_images_are_skipped_and_counted(image_folder, tmp_path, tiny_train):
    data = tmp_path / "data"
    data.mkdir()
    for i, path in enumerate(sorted(image_folder.rglob("*.jpg"))[:8]):
        (data / f"ok{i}.jpg").write_bytes(path.read_bytes())
    (data / "empty.jpg").write_bytes(b"")
    (data / "page.jpg").write_text("<html>not an image</html>")
    cfg = load_config(None, tiny_train(data, 6, tmp_path / "out"))
    summary = train(cfg, DistEnv.from_environment())
    assert summary["iteration"] == 5
    assert sum(summary["images_skipped"].values()) >= 2


def test_cli_bad_key_is_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dinov2.train", "--output-dir", str(tmp_path), "student.archx=vit_small"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "student.archx" in result.stderr and "Traceback" not in result.stderr


def test_cli_resumes_in_the_same_output_dir(image_folder, tmp_path, tiny_train):
    # The CLI runs train.py as __main__: everything main() calls must be defined before it runs.
    overrides = tiny_train(image_folder, 2)  # the output dir comes from --output-dir
    cmd = [sys.executable, "-m", "dinov2.train", "--output-dir", str(tmp_path), *overrides]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr
    longer = [*cmd, "train.max_iter=3"]  # later overrides win
    second = subprocess.run(longer, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert second.returncode == 0, second.stderr
    lines = (tmp_path / "training_metrics.json").read_text().splitlines()
    iterations = [json.loads(line)["iteration"] for line in lines]
    assert iterations == [0, 1, 2]  # the second call ran only the new iteration


def _inject(monkeypatch, faults: dict[int, float], snapshots: list | None = None) -> None:
    """Multiply the loss terms of the given forward calls (0-based, one per iteration) by a factor (nan, inf, 50)."""
    original = StudentTeacher.forward
    calls = []

    def forward(self, batch, teacher_temp):
        if snapshots is not None:
            snapshots.append({k: v.clone() for k, v in self.state_dict().items()})
        losses = original(self, batch, teacher_temp)
        factor = faults.get(len(calls))
        calls.append(1)
        if factor is None:
            return losses
        losses = dict(losses)
        losses["dino_global_crops_loss"] = losses["dino_global_crops_loss"] * factor
        losses["total_loss"] = losses["total_loss"] * factor
        return losses

    monkeypatch.setattr(StudentTeacher, "forward", forward)


def _anomalies(out: Path) -> list[dict]:
    path = out / "logs" / "anomalies.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_nonfinite_step_is_skipped_leaving_weights_ema_and_centers(image_folder, tmp_path, monkeypatch, tiny_train):
    snapshots: list[dict] = []
    _inject(monkeypatch, {2: float("nan")}, snapshots)
    cfg = load_config(None, tiny_train(image_folder, 5, tmp_path))
    summary = train(cfg, DistEnv.from_environment())
    assert summary["iteration"] == 4 and all(np.isfinite(summary["losses"]))
    # state at the start of iteration 3 == state at the start of iteration 2: params, teacher, centers, pending
    assert snapshots[3].keys() == snapshots[2].keys()
    assert all(torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2])
    assert not all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])  # a normal step changes it
    lines = [json.loads(line) for line in (tmp_path / "training_metrics.json").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 3, 4]
    [record] = _anomalies(tmp_path)
    assert record["kind"] == "nonfinite" and record["iteration"] == 2 and math.isnan(record["total_loss"])
    assert len(record["sample_keys"]) == 4 and all(record["sample_keys"])


def test_consecutive_nonfinite_steps_abort_and_never_reach_a_checkpoint(image_folder, tmp_path, monkeypatch,
                                                                        tiny_train):
    _inject(monkeypatch, {i: float("inf") for i in range(2, 10)})
    cfg = load_config(None, tiny_train(image_folder, 10, tmp_path) + ["train.checkpoint_period=1"])
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        train(cfg, DistEnv.from_environment())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000000", "iter_0000001"]
    assert [r["iteration"] for r in _anomalies(tmp_path)] == [2, 3, 4]


def test_abort_policy_stops_at_the_first_nonfinite_step(image_folder, tmp_path, monkeypatch, tiny_train):
    _inject(monkeypatch, {1: float("nan")})
    cfg = load_config(None, tiny_train(image_folder, 4, tmp_path) + ["train.nonfinite_policy=abort"])
    with pytest.raises(NonFiniteLossError, match="iteration 1 "):
        train(cfg, DistEnv.from_environment())


def test_loss_spike_is_logged_with_its_batch_keys(image_folder, tmp_path, monkeypatch, tiny_train):
    _inject(monkeypatch, {6: 50.0})
    overrides = ["train.loss_spike_window=4", "train.checkpoint_period=100"]
    cfg = load_config(None, tiny_train(image_folder, 8, tmp_path) + overrides)
    summary = train(cfg, DistEnv.from_environment())
    assert summary["iteration"] == 7  # a spike is only logged
    spikes = [r for r in _anomalies(tmp_path) if r["kind"] == "spike"]
    assert 6 in [r["iteration"] for r in spikes]
    assert len(spikes[-1]["sample_keys"]) == 4
