"""Benchmark: a small ViT distilled from the project's own trained teacher vs the same ViT trained by SSL from
scratch for the same wall time (kNN top-1, paired exact McNemar test), plus the teacher's own score.

Usage:
    python bench/distill.py                       # ~35 minutes on 2 cores (teacher 19, distillation 2 x 3, scratch 4)
    python bench/distill.py --workdir /tmp/d      # keep data and runs; a rerun reuses the finished runs
    python bench/distill.py --teacher-iters 60 --distill-iters 40   # a smoke run

Data: ``bench/learning.py``'s photos set by default (12 scenes, 480 unlabelled 64 px crops for training), here with
1200 labelled val crops (100 per scene, ``--val-per-class``; that bench scores 240): near photos' ceiling (~95% at
k = 20) a gap of two points is 5 images in 240, too few for a paired test to tell apart from noise, and 24 in 1200.
``--data tux`` or ``emoji`` for its harder sets (their val sets are fixed by the data). Teacher: that bench's ViT
(128-d x 6 blocks, patch 8), trained by ``python -m dinov2.train``'s SSL loop. Student: a 64-d x 4-block ViT with the
same patch grid (about a sixth of the teacher's compute per image).

1. the teacher: SSL, ``--teacher-iters`` iterations;
2. distillation (``distillation.enabled``, the teacher's run dir as ``distillation.checkpoint_path``), two arms of
   ``--distill-iters`` iterations each: the paper's objective (``distillation.feature_loss_weight=0``, the default)
   and with the feature term (``--feature-weight``, 10); the longer of their training wall times is W;
3. SSL from scratch: the same student, DINO + iBOT + KoLeo with its own EMA teacher, for as many iterations as fit
   in W (its seconds per iteration measured on a short calibration run first), with the same recipe otherwise.

Each model's EMA backbone is scored by the official kNN (T = 0.07, k = 10 and 20), and for reference each distilled
student's live weights (not its EMA), the student's random initialisation, and the teacher's DINO targets themselves
(a kNN on the teacher head's softmax at the final teacher temperature: what matching the targets can transfer).
Results are printed, never asserted. Everything runs fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import IMAGE_PX, WRITERS, mcnemar_p, training_overrides, write_photos  # noqa: E402
from dinov2.config import load_config, save_config  # noqa: E402
from dinov2.distributed.env import DistEnv  # noqa: E402
from dinov2.eval.datasets import open_labelled  # noqa: E402
from dinov2.eval.features import extract_features  # noqa: E402
from dinov2.eval.knn import evaluate_knn, knn_predict  # noqa: E402
from dinov2.train.distill import build_distillation, plan_distillation  # noqa: E402
from dinov2.train.metrics import setup_logging  # noqa: E402
from dinov2.train.regime import resolve_regime  # noqa: E402
from dinov2.train.train import train  # noqa: E402
from dinov2.weights import load_backbone  # noqa: E402

STUDENT = ["student.embed_dim=64", "student.depth=4", "student.num_heads=2"]


def run(overrides: list[str], out: Path) -> float:
    """Train and return the training wall time in seconds (a finished run in ``--workdir`` is reused with the time
    it took, kept in ``wall_s``, when it ran with the same overrides, kept in ``overrides.json``)."""
    recorded = out / "overrides.json"
    if (out / "wall_s").is_file():
        if recorded.is_file() and json.loads(recorded.read_text()) != overrides:
            raise SystemExit(f"{out} holds a run with other settings: remove it or use another --workdir")
        return float((out / "wall_s").read_text())
    cfg = load_config(None, overrides)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")  # what python -m dinov2.train writes; distillation reads the teacher's
    start = time.perf_counter()
    train(cfg, DistEnv())
    seconds = time.perf_counter() - start
    recorded.write_text(json.dumps(overrides))
    (out / "wall_s").write_text(f"{seconds:.1f}\n")
    return seconds


def newest_export(folder: Path) -> Path:
    newest = max((folder / "eval").glob("training_*"), key=lambda p: int(p.name.split("_")[1]))
    return newest / "teacher_backbone_hub.pth"


def knn(weights: Path, root: Path, num_heads: int) -> dict[str, np.ndarray]:
    return knn_of(load_backbone(weights, num_heads=num_heads), root)  # not the hub's 64-d heads: custom ViTs


def distilled_student_knn(overrides: list[str], out: Path, root: Path,
                          references: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """kNN of the distilled student's live (trained, not averaged) weights, and with ``references`` of its random
    initialisation and of the frozen teacher's DINO targets (see :func:`target_knn`)."""
    cfg, _ = resolve_regime(load_config(None, overrides), 1)  # the run's model: its regime's queue buffers too
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=False))
    backbone = model.student["student__backbone"]
    scores = {}
    if references:
        scores = {"init": knn_of(backbone, root), "targets": target_knn(model, cfg.teacher.teacher_temp, root)}
    newest = max((out / "checkpoints").glob("iter_*"), key=lambda p: int(p.name.split("_")[1]))
    model.load_state_dict(torch.load(newest / "state.pth", weights_only=True)["model"])
    scores["live"] = knn_of(backbone, root)
    return scores


@torch.no_grad()
def target_knn(model: torch.nn.Module, teacher_temp: float, root: Path) -> dict[str, np.ndarray]:
    """kNN on what a distilled student is taught: the frozen teacher's DINO-head distribution softmax(logits / τ_t)
    of each (centre-cropped) image at the run's final teacher temperature, compared by the Hellinger affinity
    (kNN cosine on sqrt p). Where it scores below the teacher's CLS token, the targets hold less than the features.
    Centering / Sinkhorn-Knopp are left out: they depend on the batch, and only flatten these targets further."""
    teacher = model.frozen_teacher.eval()
    targets = {}
    for split in ("knn_train", "knn_val"):
        data = open_labelled(root / split)
        # the kNN's own decode path; unreadable images left out, as evaluate_knn does
        cls, ok = extract_features(teacher["backbone"], data, IMAGE_PX, ("cls",))
        logits = teacher["dino_head"](cls["cls"][ok]).float()
        targets[split] = (data.labels[ok], F.normalize((logits / teacher_temp).softmax(dim=-1).sqrt(), dim=-1))
    (train_labels, train_feats), (val_labels, val_feats) = targets["knn_train"], targets["knn_val"]
    predictions = knn_predict(train_feats, train_labels, val_feats, (10, 20))
    return {str(k): (p == val_labels).numpy() for k, p in predictions.items()}


def knn_of(backbone: torch.nn.Module, root: Path) -> dict[str, np.ndarray]:
    return evaluate_knn(backbone.eval(), root / "knn_train", root / "knn_val", IMAGE_PX, (10, 20),
                        per_image=True)["correct"]


def iterations_per_second(root: Path, calibration_iters: int) -> float:
    overrides = training_overrides(root / "ssl", root / "calibration", calibration_iters) + STUDENT
    seconds = run(overrides + ["train.log_period=1"], root / "calibration")
    rows = [json.loads(line) for line in (root / "calibration" / "training_metrics.json").read_text().splitlines()]
    steps = [r["iter_time"] for r in rows if "iter_time" in r]  # not the event rows (e.g. a collapse warning)
    steady = steps[2:] or [seconds / calibration_iters]  # the first steps warm up
    return 1.0 / (sum(steady) / len(steady))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-iters", type=int, default=1200)
    parser.add_argument("--distill-iters", type=int, default=300)
    parser.add_argument("--ssl-iters", type=int, default=0, help="from-scratch iterations (default: as many as fit "
                        "in the distillation's wall time, measured)")
    parser.add_argument("--feature-weight", type=float, default=10.0, help="distillation.feature_loss_weight of the "
                        "second arm (default 10; the first arm runs the paper's objective, 0)")
    parser.add_argument("--data", choices=tuple(WRITERS), default="photos", help="bench/learning.py's data set")
    parser.add_argument("--val-per-class", type=int, default=100, help="photos only: labelled val crops per scene "
                        "(default 100; bench/learning.py uses 20)")
    parser.add_argument("--workdir", default="", help="keep data and runs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra training key=value overrides of both distillation arms, "
                        "e.g. teacher.teacher_temp=0.04")
    args = parser.parse_args(argv)
    if args.feature_weight <= 0:
        parser.error("--feature-weight must be > 0 (the first arm already runs without the feature term)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not (root / "knn_val").is_dir():
            n_classes = (write_photos(root, args.val_per_class) if args.data == "photos" else WRITERS[args.data](root))
        else:
            n_classes = sum(1 for path in (root / "knn_val").iterdir() if path.is_dir())
        n_val = sum(1 for _ in (root / "knn_val").rglob("*.png"))
        setup_logging(root, True, 0)
        teacher_dir = root / "teacher"
        teacher_s = run(training_overrides(root / "ssl", teacher_dir, args.teacher_iters), teacher_dir)

        arms = {"paper objective": (root / "distilled", []),
                f"+ feature term (w {args.feature_weight:g})": (
                    root / f"distilled_feature_w{args.feature_weight:g}",
                    [f"distillation.feature_loss_weight={args.feature_weight}"])}
        arm_overrides, arm_seconds = {}, {}
        for arm, (folder, extra) in arms.items():
            arm_overrides[arm] = training_overrides(root / "ssl", folder, args.distill_iters) + STUDENT + [
                "distillation.enabled=true", f"distillation.checkpoint_path={teacher_dir}", *extra, *args.overrides,
            ]
            arm_seconds[arm] = run(arm_overrides[arm], folder)
        distill_s = max(arm_seconds.values())  # the slower arm: scratch gets at least the time of either

        rate = iterations_per_second(root, 12)
        ssl_iters = args.ssl_iters or max(20, round(distill_s * rate))
        ssl_dir = root / "scratch"
        ssl_s = run(training_overrides(root / "ssl", ssl_dir, ssl_iters) + STUDENT, ssl_dir)

        correct = {"teacher (SSL, 128-d x 6)": knn(newest_export(teacher_dir), root, 4)}
        references = {}
        for i, (arm, (folder, _)) in enumerate(arms.items()):
            correct[f"distilled, {arm}"] = knn(newest_export(folder / "students" / "student"), root, 2)
            # the same teacher and student seed in both arms: init and targets are scored once, with the first
            references[arm] = distilled_student_knn(arm_overrides[arm], folder, root, references=i == 0)
        correct["student SSL from scratch"] = knn(newest_export(ssl_dir), root, 2)
        for arm in arms:
            correct[f"(live weights, {arm})"] = references[arm]["live"]
        first = references["paper objective"]
        correct["(teacher's DINO targets)"] = first["targets"]
        correct["(student at random init)"] = first["init"]
        total_s = time.perf_counter() - start

    print(f"\nDistillation check: {args.data}, {n_classes} classes, {n_val} val images, 64 px; teacher 128-d x 6 "
          f"({args.teacher_iters} iterations, {teacher_s / 60:.1f} min); student 64-d x 4, patch 8; fp32 CPU, "
          f"{torch.get_num_threads()} threads")
    timings = ", ".join(f"{arm} in {seconds / 60:.1f} min" for arm, seconds in arm_seconds.items())
    print(f"student training time: distilled {args.distill_iters} iterations ({timings}), from scratch {ssl_iters} "
          f"iterations in {ssl_s / 60:.1f} min (matched at {rate:.2f} it/s)")
    width = max(len(name) for name in correct) + 2
    print(f"{'model':<{width}} {'kNN top-1 k=10':>15} {'kNN top-1 k=20':>15}")
    for name, values in correct.items():
        print(f"{name:<{width}} {100 * values['10'].mean():>14.1f}% {100 * values['20'].mean():>14.1f}%")
    scratch = correct["student SSL from scratch"]
    for arm in arms:
        distilled = correct[f"distilled, {arm}"]
        for k in ("10", "20"):
            wins, losses = int((distilled[k] & ~scratch[k]).sum()), int((scratch[k] & ~distilled[k]).sum())
            print(f"{arm}, paired at k={k}: {wins} val images right only when distilled, {losses} only from "
                  f"scratch; exact McNemar p = {mcnemar_p(wins, losses):.3g}")
    print(f"whole benchmark {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
