"""Linear probe with the official DINOv2 grid, trained on cached frozen features; the best head is chosen on val.

Grid (official): n_last_blocks in {1, 4} x avgpool in {False, True} x 13 learning rates (1e-5 .. 0.1), each lr
scaled by batch/256. Input: the class tokens of the last n blocks concatenated, plus (avgpool) the mean of the last
block's patch tokens. Heads ``Linear(in, C)`` (weight N(0, 0.01), bias 0) are trained jointly on the sum of their
cross-entropies with SGD (momentum 0.9, no weight decay) and a cosine lr to 0.

Train features, two modes:

- default: extracted once with the eval transform (resize 256, centre crop 224) and reused for ``--epochs`` passes.
  Cheapest (one pass over the train split); usually within a few tenths of a point of the official protocol on
  ImageNet, slightly lower on small training sets where augmentation matters more.
- ``--augment`` (the official protocol's augmentation): every epoch re-encodes the train split under a fresh
  random-resized crop (bicubic, scale 0.08-1) + horizontal flip, so each image is seen in ``--epochs`` different
  views, as in the official run (which re-encodes every step). It costs one backbone pass per epoch; views are
  seeded per (seed, epoch, image), so results do not depend on the number of loader workers.

Memory: the cached features take n x 5 x D x 4 bytes (about 26 GB for ImageNet-1k train with ViT-L) and live on the
training device (CUDA when available).

Selection is done on the validation split only (``--val-dataset``, or a seeded ``--val-fraction`` of train). The
test split is opened only after the chosen head and ``results.json`` are written, and only that head is evaluated.

CLI: ``python -m dinov2.eval.linear --weights W --train-dataset A [--val-dataset B | --val-fraction 0.1]
[--test-dataset C] --output-dir D``. Datasets are class folders or ``.cls`` shards (:mod:`dinov2.eval.datasets`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.eval.datasets import LabelledImages, open_labelled
from dinov2.eval.features import extract_features, pick_device
from dinov2.io.atomic import write_text_atomic
from dinov2.io.cli import add_image_arguments, add_model_arguments, run_cli, tool_parser

logger = logging.getLogger("dinov2")

DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_BLOCKS = (1, 4)


@dataclass(frozen=True)
class HeadConfig:
    """One linear classifier of the grid; ``lr`` is the base rate before the batch/256 scaling."""

    n_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        """The official classifier name, e.g. ``classifier_4_blocks_avgpool_True_lr_0_00100``."""
        return f"classifier_{self.n_blocks}_blocks_avgpool_{self.avgpool}_lr_{self.lr:.5f}".replace(".", "_")


def make_grid(lrs: tuple[float, ...], block_choices: tuple[int, ...], depth: int) -> list[HeadConfig]:
    """Every (n_blocks, avgpool, lr); n_blocks above the backbone depth is capped (and deduplicated)."""
    blocks = sorted({min(n, depth) for n in block_choices})
    return [HeadConfig(n, avgpool, lr) for n in blocks for avgpool in (False, True) for lr in lrs]


def linear_input(feats: dict[str, torch.Tensor], n_blocks: int, avgpool: bool) -> torch.Tensor:
    """Head input ``(n, n_blocks*D [+ D])`` from cached ``layers`` (n, L, D) and ``patch_mean`` (n, D)."""
    x = feats["layers"][:, -n_blocks:].flatten(1)
    return torch.cat([x, feats["patch_mean"]], dim=1) if avgpool else x


def _new_head(in_dim: int, n_classes: int) -> nn.Linear:
    head = nn.Linear(in_dim, n_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def train_heads(
    feats: dict[str, torch.Tensor],
    labels: torch.Tensor,
    grid: list[HeadConfig],
    n_classes: int,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    epoch_features: Callable[[int], dict[str, torch.Tensor]] | None = None,
) -> dict[str, nn.Linear]:
    """Train every head of ``grid`` jointly on cached features (sum of cross-entropies, SGD, cosine lr).

    Heads that share an input (same n_blocks and avgpool) are rows of one wide ``Linear(in, n_heads * C)``; each
    head's gradient rows are multiplied by its own scaled lr and the optimizer runs at lr 1 x cosine. For SGD with
    momentum and no weight decay this is exactly per-head learning rates (the momentum buffer is linear in the
    gradient), at the cost of 4 matmuls per step instead of 52 small ones.

    Args:
        feats: ``layers`` (n, L, D) and ``patch_mean`` (n, D), on the device to train on.
        labels: (n,) int64, same device.
        epoch_features: if given, ``epoch_features(e)`` replaces ``feats`` for epochs e >= 1 (same rows, e.g. a new
            augmented view of every image); ``feats`` is epoch 0.

    Returns:
        The trained heads by :attr:`HeadConfig.name`.
    """
    device = labels.device
    by_input: dict[tuple[int, bool], list[HeadConfig]] = {}
    for c in grid:
        by_input.setdefault((c.n_blocks, c.avgpool), []).append(c)
    wide, row_lrs = {}, {}
    for key, configs in by_input.items():
        in_dim = linear_input({k: v[:1] for k, v in feats.items()}, *key).shape[1]
        wide[key] = _new_head(in_dim, n_classes * len(configs)).to(device)
        lrs = torch.tensor([c.lr * batch_size / 256 for c in configs], device=device)
        row_lrs[key] = lrs.repeat_interleave(n_classes)  # (n_heads * C,) one lr per output row
    params = [p for head in wide.values() for p in head.parameters()]
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.9, weight_decay=0.0)
    n = labels.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch, eta_min=0)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if epoch > 0 and epoch_features is not None:
            feats = epoch_features(epoch)
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = 0.0
            for key, head in wide.items():
                logits = head(linear_input({k: v[idx] for k, v in feats.items()}, *key))  # (b, n_heads * C)
                logits = logits.view(len(idx) * len(by_input[key]), n_classes)  # row-major: sample, then head
                targets = labels[idx].repeat_interleave(len(by_input[key]))
                # Mean over (sample, head) pairs times n_heads = sum over heads of each head's mean cross-entropy.
                loss = loss + F.cross_entropy(logits, targets) * len(by_input[key])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for key, head in wide.items():
                head.weight.grad.mul_(row_lrs[key][:, None])
                head.bias.grad.mul_(row_lrs[key])
            optimizer.step()
            scheduler.step()
    heads = {}
    for key, configs in by_input.items():
        for j, c in enumerate(configs):
            rows = slice(j * n_classes, (j + 1) * n_classes)
            head = nn.Linear(wide[key].in_features, n_classes).to(device)
            with torch.no_grad():
                head.weight.copy_(wide[key].weight[rows])
                head.bias.copy_(wide[key].bias[rows])
            heads[c.name] = head
    return heads


@torch.no_grad()
def head_accuracy(head: nn.Linear, feats: dict[str, torch.Tensor], labels: torch.Tensor, config: HeadConfig) -> float:
    """Top-1 accuracy in % of one head on cached features."""
    predictions = head(linear_input(feats, config.n_blocks, config.avgpool)).argmax(dim=1)
    return 100.0 * float((predictions == labels).float().mean())


def select_head(
    heads: dict[str, nn.Linear], grid: list[HeadConfig], val_feats: dict[str, torch.Tensor], val_labels: torch.Tensor
) -> tuple[HeadConfig, dict[str, float]]:
    """The head with the best val accuracy (ties: first in grid order) and every head's val accuracy."""
    accuracies = {c.name: head_accuracy(heads[c.name], val_feats, val_labels, c) for c in grid}
    best = max(grid, key=lambda c: accuracies[c.name])  # max() keeps the first of equal values
    return best, accuracies


def split_train_val(train: LabelledImages, val_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """A seeded random split of ``train`` into (train, val) with ``round(val_fraction * n)`` val samples (>= 1)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


def _features(model: nn.Module, data: LabelledImages, image_size: int, n_blocks: int, batch: int, workers: int,
              augment_seed: int | None = None):
    kinds = ("layers", "patch_mean")
    feats, ok = extract_features(model, data, image_size, kinds, n_blocks, batch, workers, augment_seed)
    if not ok.all():
        logger.warning("skipping %d unreadable images", int((~ok).sum()))
    device = next(model.parameters()).device
    return {k: v[ok].to(device) for k, v in feats.items()}, data.labels[ok].to(device)


def run_linear_eval(
    model: nn.Module,
    train_dataset: str | Path,
    output_dir: str | Path,
    val_dataset: str | Path | None = None,
    test_dataset: str | Path | None = None,
    val_fraction: float = 0.1,
    image_size: int = 224,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    block_choices: tuple[int, ...] = DEFAULT_BLOCKS,
    epochs: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    feature_batch_size: int = 64,
    num_workers: int = 0,
    augment: bool = False,
) -> dict:
    """Extract features, train the grid, select on val, write ``results.json`` + ``linear_head.pth``, then test.

    Returns:
        The results dict (also in ``output_dir/results.json``): ``grid`` (val accuracy per head), ``chosen``,
        ``val_accuracy`` and ``test_accuracy`` (None without a test set).
    """
    _check_exists(test_dataset)  # fail before the expensive part on a typo; this neither opens nor reads it
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train = open_labelled(train_dataset)
    if val_dataset is not None:
        val = open_labelled(val_dataset, classes=train.classes)
    else:
        train, val = split_train_val(train, val_fraction, seed)
    depth = len(model.real_blocks())
    grid = make_grid(tuple(lrs), tuple(block_choices), depth)
    n_feature_blocks = max(c.n_blocks for c in grid)
    feature_args = (image_size, n_feature_blocks, feature_batch_size, num_workers)

    def view_seed(epoch: int) -> int:
        return seed * 100_003 + epoch

    def augmented_view(epoch: int) -> dict[str, torch.Tensor]:
        return _features(model, train, *feature_args, augment_seed=view_seed(epoch))[0]

    train_feats, train_labels = _features(model, train, *feature_args, augment_seed=view_seed(0) if augment else None)
    val_feats, val_labels = _features(model, val, *feature_args)
    n_classes = max(len(train.classes), int(train.labels.max()) + 1)
    logger.info("training %d linear heads on %d cached train features", len(grid), len(train_labels))
    torch.manual_seed(seed)
    heads = train_heads(train_feats, train_labels, grid, n_classes, epochs, batch_size, seed,
                        augmented_view if augment else None)
    chosen, val_accuracies = select_head(heads, grid, val_feats, val_labels)
    logger.info("chosen on val: %s (%.2f%%)", chosen.name, val_accuracies[chosen.name])
    head = heads[chosen.name].cpu()
    torch.save(
        {"weight": head.weight.detach(), "bias": head.bias.detach(), **asdict(chosen),
         "classes": list(train.classes), "image_size": image_size},
        output_dir / "linear_head.pth",
    )  # fmt: skip
    results = {
        "grid": [{**asdict(c), "name": c.name, "val_accuracy": val_accuracies[c.name]} for c in grid],
        "chosen": {**asdict(chosen), "name": chosen.name},
        "val_accuracy": val_accuracies[chosen.name],
        "test_accuracy": None,
        "n_train": int(train_labels.shape[0]),
        "n_val": int(val_labels.shape[0]),
        "val_source": "val-dataset" if val_dataset is not None else f"seeded {val_fraction:g} split of train",
        "epochs": epochs,
        "train_augment": augment,
        "batch_size": batch_size,
        "image_size": image_size,
    }
    _write_json(output_dir / "results.json", results)
    # Selection is final and on disk; only now is the test split opened, for the single chosen head.
    if test_dataset is not None:
        test = open_labelled(test_dataset, classes=train.classes)
        test_feats, test_labels = _features(model, test, *feature_args)
        device = test_labels.device
        results["test_accuracy"] = head_accuracy(head.to(device), test_feats, test_labels, chosen)
        results["n_test"] = int(test_labels.shape[0])
        _write_json(output_dir / "results.json", results)
    return results


def _check_exists(spec: str | Path | None) -> None:
    """Raise if ``spec`` is a plain path (no glob, braces or ``Name:root=`` string) that does not exist."""
    text = str(spec) if spec is not None else ""
    if text and not any(ch in text for ch in "*?[{:") and not Path(text).exists():
        raise ValueError(f"dataset {text} does not exist")


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m dinov2.eval.linear", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--train-dataset", required=True)
    parser.add_argument("--val-dataset", default=None, help="selection split; default: --val-fraction of train")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-dataset", default=None, help="evaluated once, with the val-selected head only")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=10, help="passes over the cached train features")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    parser.add_argument("--n-last-blocks", type=int, nargs="+", default=list(DEFAULT_BLOCKS))
    parser.add_argument("--batch-size", type=int, default=256, help="head training batch; lrs are scaled by it/256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action="store_true",
                        help="re-encode the train split every epoch under random-resized crop + flip (official)")
    add_image_arguments(parser, batch_flag="--feature-batch-size")
    return parser


def _run(args: argparse.Namespace) -> None:
    from dinov2.weights import load_backbone

    model = load_backbone(args.weights, num_heads=args.num_heads).to(pick_device(args.device))
    results = run_linear_eval(
        model, args.train_dataset, args.output_dir, args.val_dataset, args.test_dataset, args.val_fraction,
        args.image_size, tuple(args.lrs), tuple(args.n_last_blocks), args.epochs, args.batch_size, args.seed,
        args.feature_batch_size, args.num_workers, args.augment,
    )  # fmt: skip
    summary = {k: results[k] for k in ("chosen", "val_accuracy", "test_accuracy", "n_train", "n_val")}
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
