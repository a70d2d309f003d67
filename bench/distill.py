"""Benchmark: a small ViT distilled from the project's own trained teacher vs the same ViT trained by SSL from
scratch for the same wall time (kNN top-1, paired exact McNemar test), plus the teacher's own score.

Usage:
    python bench/distill.py                       # ~30 minutes at one thread (teacher 14, distillation 8, scratch 7)
    python bench/distill.py --workdir /tmp/d      # keep data and runs; a rerun reuses the finished teacher
    python bench/distill.py --teacher-iters 60 --distill-iters 40   # a smoke run

Data: ``bench/learning.py``'s photos set by default (12 scenes, 480 unlabelled 64 px crops for training, 240
labelled val crops); ``--data tux`` or ``emoji`` for its harder ones. Teacher: that bench's ViT (128-d x 6
blocks, patch 8), trained by ``python -m dinov2.train``'s SSL loop.
Student: a 64-d x 4-block ViT with the same patch grid (about a sixth of the teacher's compute per image).

1. the teacher: SSL, ``--teacher-iters`` iterations;
2. distillation (``distillation.enabled``, the teacher's run dir as ``distillation.checkpoint_path``): the student
   for ``--distill-iters`` iterations; its training wall time W is measured;
3. SSL from scratch: the same student, DINO + iBOT + KoLeo with its own EMA teacher, for as many iterations as fit
   in W (its seconds per iteration measured on a short calibration run first), with the same recipe otherwise.

Each model's EMA backbone is scored by the official kNN (T = 0.07, k = 10 and 20), and for reference the distilled
student's live weights (not its EMA), its random initialisation, and the teacher's DINO targets themselves (a kNN
on the teacher head's softmax at the final teacher temperature: what matching the targets can transfer). Results
are printed, never asserted. Everything runs fp32 on the CPU.
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

from bench.learning import IMAGE_PX, WRITERS, mcnemar_p, training_overrides  # noqa: E402
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


def distilled_student_knn(overrides: list[str], out: Path, root: Path) -> dict[str, dict[str, np.ndarray]]:
    """kNN of the distilled student's random initialisation and of its live (trained, not averaged) weights, and of
    the frozen teacher's DINO targets (see :func:`target_knn`)."""
    cfg, _ = resolve_regime(load_config(None, overrides), 1)  # the run's model: its regime's queue buffers too
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=False))
    backbone = model.student["student__backbone"]
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
    parser.add_argument("--teacher-iters", type=int, default=300)
    parser.add_argument("--distill-iters", type=int, default=300)
    parser.add_argument("--ssl-iters", type=int, default=0, help="from-scratch iterations (default: as many as fit "
                        "in the distillation's wall time, measured)")
    parser.add_argument("--data", choices=tuple(WRITERS), default="photos", help="bench/learning.py's data set")
    parser.add_argument("--workdir", default="", help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--name", default="distilled", help="the distillation run's folder in the workdir, so that "
                        "runs with other overrides sit beside the first (default: distilled)")
    parser.add_argument("overrides", nargs="*", help="extra training key=value overrides of the distillation run, "
                        "e.g. teacher.teacher_temp=0.04")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not (root / "knn_val").is_dir():
            n_classes = WRITERS[args.data](root)
        else:
            n_classes = sum(1 for path in (root / "knn_val").iterdir() if path.is_dir())
        setup_logging(root, True, 0)
        teacher_dir = root / "teacher"
        teacher_s = run(training_overrides(root / "ssl", teacher_dir, args.teacher_iters), teacher_dir)

        distill_dir = root / args.name
        distill_overrides = training_overrides(root / "ssl", distill_dir, args.distill_iters) + STUDENT + [
            "distillation.enabled=true", f"distillation.checkpoint_path={teacher_dir}", *args.overrides,
        ]
        distill_s = run(distill_overrides, distill_dir)

        rate = iterations_per_second(root, 12)
        ssl_iters = args.ssl_iters or max(20, round(distill_s * rate))
        ssl_dir = root / "scratch"
        ssl_s = run(training_overrides(root / "ssl", ssl_dir, ssl_iters) + STUDENT, ssl_dir)

        reference = distilled_student_knn(distill_overrides, distill_dir, root)
        correct = {
            "teacher (SSL, 128-d x 6)": knn(newest_export(teacher_dir), root, 4),
            "student distilled": knn(newest_export(distill_dir / "students" / "student"), root, 2),
            "student SSL from scratch": knn(newest_export(ssl_dir), root, 2),
            "(distilled, live weights)": reference["live"],
            "(teacher's DINO targets)": reference["targets"],
            "(student at random init)": reference["init"],
        }
        total_s = time.perf_counter() - start

    print(f"\nDistillation check: {args.data}, {n_classes} classes, 64 px; teacher 128-d x 6 ({args.teacher_iters} "
          f"iterations, {teacher_s / 60:.1f} min); student 64-d x 4, patch 8; fp32 CPU, "
          f"{torch.get_num_threads()} threads")
    print(f"student training time: distilled {args.distill_iters} iterations in {distill_s / 60:.1f} min, from "
          f"scratch {ssl_iters} iterations in {ssl_s / 60:.1f} min (matched at {rate:.2f} it/s)")
    print(f"{'model':<28} {'kNN top-1 k=10':>15} {'kNN top-1 k=20':>15}")
    for name, values in correct.items():
        print(f"{name:<28} {100 * values['10'].mean():>14.1f}% {100 * values['20'].mean():>14.1f}%")
    distilled, scratch = correct["student distilled"], correct["student SSL from scratch"]
    for k in ("10", "20"):
        wins, losses = int((distilled[k] & ~scratch[k]).sum()), int((scratch[k] & ~distilled[k]).sum())
        print(f"paired at k={k}: {wins} val images right only when distilled, {losses} only from scratch; exact "
              f"McNemar p = {mcnemar_p(wins, losses):.3g}")
    print(f"whole benchmark {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
