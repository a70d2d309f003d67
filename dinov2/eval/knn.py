"""kNN evaluation with the official DINOv2 protocol: L2-normalised CLS features, cosine similarity, the top-k
neighbours vote with weights softmax(sim / T), k in {10, 20, 100, 200}, T = 0.07.

CLI: ``python -m dinov2.eval.knn --weights W --train-dataset D --val-dataset D [--image-size 224]``. A labelled
dataset is a folder with one sub-folder per class (any depth below it) or WebDataset shards whose samples carry a
``.cls`` label (see :mod:`dinov2.eval.datasets`). ``--weights`` takes an official release, an official
``teacher_checkpoint.pth``, one of our checkpoints or exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.data.sources import ImageFileSource, ImageSource
from dinov2.eval.datasets import LabelledImages, open_labelled
from dinov2.eval.features import extract_features
from dinov2.io.atomic import write_text_atomic
from dinov2.io.cli import add_image_arguments, add_model_arguments, run_cli, tool_parser

logger = logging.getLogger("dinov2")

DEFAULT_KS = (10, 20, 100, 200)


def extract_cls_features(
    model: nn.Module,
    data: list[Path] | LabelledImages | ImageSource,
    image_size: int,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features (n, D) in fp32 and a validity mask (n,) (False for unreadable images).

    ``data`` is a list of image paths, a labelled dataset or any image source.
    """
    if isinstance(data, list):
        data = ImageFileSource([str(p) for p in data])
    feats, valid = extract_features(model, data, image_size, ("cls",), batch_size=batch_size, num_workers=num_workers)
    return F.normalize(feats["cls"], dim=-1), valid


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    n_classes: int | None = None,
) -> dict[int, torch.Tensor]:
    """Weighted-kNN class predictions (n_test,) int64 for each k (capped at the number of training samples).

    Each of the k nearest training samples (cosine) votes for its class with weight exp(sim / T), as the official
    protocol (normalised over the neighbours, which does not change the argmax).

    Args:
        train_features: (n_train, D), L2-normalised.
        train_labels: (n_train,) int64.
        test_features: (n_test, D), L2-normalised.
        n_classes: number of classes (default: max train label + 1).
    """
    n_classes = n_classes or int(train_labels.max()) + 1
    max_k = min(max(ks), train_features.shape[0])
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        sims = test_features[start : start + chunk_size] @ train_features.T  # (c, n_train)
        top_sims, top_idx = sims.topk(max_k, dim=1)  # (c, max_k), sorted descending
        weights = (top_sims / temperature).softmax(dim=1)
        onehot = F.one_hot(train_labels[top_idx], n_classes).float()  # (c, max_k, C)
        for k in ks:
            kk = min(k, max_k)
            votes = (weights[:, :kk, None] * onehot[:, :kk]).sum(dim=1)  # (c, C)
            predictions[k].append(votes.argmax(dim=1))
    empty = torch.zeros(0, dtype=torch.int64)
    return {k: torch.cat(v) if v else empty for k, v in predictions.items()}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (in %) of weighted kNN for each k (see ``knn_predict``); test_labels (n_test,) int64."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predictions = knn_predict(train_features, train_labels, test_features, ks, temperature, chunk_size, n_classes)
    return {k: 100.0 * float((p == test_labels).sum()) / test_features.shape[0] for k, p in predictions.items()}


def evaluate_knn(
    model: nn.Module,
    train_dataset: str | Path,
    val_dataset: str | Path,
    image_size: int = 224,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    batch_size: int = 64,
    num_workers: int = 0,
    per_image: bool = False,
) -> dict:
    """kNN top-1 of ``model`` (a backbone) on two labelled datasets (class folders or ``.cls`` shards).

    With ``per_image``, the result also holds ``correct``: per k, a (n_val,) bool array over the readable val
    images, for paired comparisons of two models.
    """
    train = open_labelled(train_dataset)
    val = open_labelled(val_dataset, classes=train.classes)
    train_feats, train_ok = extract_cls_features(model, train, image_size, batch_size, num_workers)
    val_feats, val_ok = extract_cls_features(model, val, image_size, batch_size, num_workers)
    val_labels = val.labels[val_ok]
    n_classes = int(max(train.labels.max(), val.labels.max())) + 1
    predictions = knn_predict(train_feats[train_ok], train.labels[train_ok], val_feats[val_ok], ks, temperature,
                              n_classes=n_classes)
    correct = {str(k): (p == val_labels).numpy() for k, p in predictions.items()}
    results = {
        "top1": {k: 100.0 * float(c.sum()) / len(c) for k, c in correct.items()},
        "n_train": int(train_ok.sum()),
        "n_val": int(val_ok.sum()),
        "skipped_unreadable": int((~train_ok).sum() + (~val_ok).sum()),
        "temperature": temperature,
        "image_size": image_size,
    }
    if per_image:
        results["correct"] = correct
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m dinov2.eval.knn", __doc__)
    add_model_arguments(parser, device=False)
    parser.add_argument("--train-dataset", required=True)
    parser.add_argument("--val-dataset", required=True)
    parser.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--output-dir", default=None, help="write results_eval_knn.json here")
    add_image_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    from dinov2.weights import load_backbone

    model = load_backbone(args.weights, num_heads=args.num_heads)
    results = evaluate_knn(model, args.train_dataset, args.val_dataset, args.image_size, tuple(args.nb_knn),
                           args.temperature, args.batch_size, args.num_workers)
    print(json.dumps(results, indent=2))
    if args.output_dir:
        write_text_atomic(Path(args.output_dir) / "results_eval_knn.json", json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
