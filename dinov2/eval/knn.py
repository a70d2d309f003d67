"""kNN evaluation with the official DINOv2 protocol: L2-normalised CLS features, cosine similarity, the top-k
neighbours vote with weights softmax(sim / T), k in {10, 20, 100, 200}, T = 0.07.

CLI: ``python -m dinov2.eval.knn --weights W --train-dataset DIR --val-dataset DIR [--image-size 224]``. A labelled
dataset is a folder with one sub-folder per class (any depth below it). ``--weights`` takes an official release, an
official ``teacher_checkpoint.pth``, one of our checkpoints or exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger("dinov2")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_KS = (10, 20, 100, 200)


@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]
    labels: torch.Tensor  # (n,) int64
    classes: list[str]


def list_labelled_images(root: str | Path, classes: list[str] | None = None) -> LabelledImages:
    """Images under ``root/<class>/**``, sorted; ``classes`` fixes the label order (e.g. the train split's)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"labelled dataset folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = classes if classes is not None else found
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in found:
        if name not in index:
            raise ValueError(f"class folder {root / name} is not among the training classes")
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                paths.append(path)
                labels.append(index[name])
    if not paths:
        raise ValueError(f"no images found under {root} (expected one sub-folder per class)")
    return LabelledImages(paths, torch.tensor(labels, dtype=torch.int64), list(classes))


def eval_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize the short side to image_size/0.875 (256 for 224, bicubic), centre-crop, normalise -> (3, S, S)."""
    from torchvision.transforms.v2 import functional as TF

    resize = int(round(image_size / 0.875))
    image = TF.resize(image, resize, interpolation=TF.InterpolationMode.BICUBIC)
    image = TF.center_crop(image, [image_size, image_size])
    tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths = paths
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            with Image.open(self.paths[i]) as image:
                return eval_transform(image.convert("RGB"), self.image_size), True
        except (OSError, ValueError, Image.DecompressionBombError):
            return torch.zeros(3, self.image_size, self.image_size), False


@torch.inference_mode()
def extract_cls_features(
    model: nn.Module, paths: list[Path], image_size: int, batch_size: int = 64, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features (n, D) in fp32 and a validity mask (n,) (False for unreadable images)."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(
        _ImageDataset(paths, image_size), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    features, valid = [], []
    was_training = model.training
    model.eval()
    for images, ok in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type in ("cpu", "cuda")):
            cls = model.forward_features(images.to(device))["x_norm_clstoken"]
        features.append(F.normalize(cls.float(), dim=-1).cpu())
        valid.append(ok)
    model.train(was_training)
    return torch.cat(features), torch.cat(valid)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (in %) of weighted kNN for each k (capped at the number of training samples).

    Args:
        train_features: (n_train, D), L2-normalised.
        train_labels: (n_train,) int64.
        test_features: (n_test, D), L2-normalised.
        test_labels: (n_test,) int64.
    """
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    max_k = min(max(ks), train_features.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        sims = test_features[start : start + chunk_size] @ train_features.T  # (c, n_train)
        top_sims, top_idx = sims.topk(max_k, dim=1)  # (c, max_k), sorted descending
        weights = (top_sims / temperature).softmax(dim=1)
        onehot = F.one_hot(train_labels[top_idx], n_classes).float()  # (c, max_k, C)
        targets = test_labels[start : start + chunk_size]
        for k in ks:
            kk = min(k, max_k)
            votes = (weights[:, :kk, None] * onehot[:, :kk]).sum(dim=1)  # (c, C)
            correct[k] += int((votes.argmax(dim=1) == targets).sum())
    return {k: 100.0 * correct[k] / test_features.shape[0] for k in ks}


def evaluate_knn(
    model: nn.Module,
    train_dataset: str | Path,
    val_dataset: str | Path,
    image_size: int = 224,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict:
    """kNN top-1 of ``model`` (anything with ``forward_features``) on two labelled folders."""
    train = list_labelled_images(train_dataset)
    val = list_labelled_images(val_dataset, classes=train.classes)
    train_feats, train_ok = extract_cls_features(model, train.paths, image_size, batch_size, num_workers)
    val_feats, val_ok = extract_cls_features(model, val.paths, image_size, batch_size, num_workers)
    top1 = knn_classify(
        train_feats[train_ok], train.labels[train_ok], val_feats[val_ok], val.labels[val_ok], ks, temperature
    )
    return {
        "top1": {str(k): v for k, v in top1.items()},
        "n_train": int(train_ok.sum()),
        "n_val": int(val_ok.sum()),
        "skipped_unreadable": int((~train_ok).sum() + (~val_ok).sum()),
        "temperature": temperature,
        "image_size": image_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint or weights file (any supported layout)")
    parser.add_argument("--train-dataset", required=True)
    parser.add_argument("--val-dataset", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="write results_eval_knn.json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dinov2.weights import load_backbone

    try:
        model = load_backbone(args.weights)
        results = evaluate_knn(
            model,
            args.train_dataset,
            args.val_dataset,
            args.image_size,
            tuple(args.nb_knn),
            args.temperature,
            args.batch_size,
            args.num_workers,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results_eval_knn.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
