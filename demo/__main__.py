"""``make demo``: a short CPU run of the trainer on real photographs, kNN before/after, export and hub reload.

Classes are the scikit-image / scikit-learn sample photographs; each image is a random crop of one of them, so kNN
top-1 measures whether features tell the photos apart. Outputs go to ``demo_out/``; re-running reuses the finished
training run (checkpoints are resumed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinov2.config import load_config
from dinov2.distributed import DistEnv
from dinov2.eval.knn import evaluate_knn
from dinov2.hub import dinov2_vits14
from dinov2.metrics import setup_logging
from dinov2.models.student_teacher import StudentTeacher
from dinov2.train import train
from dinov2.weights import export_backbone, load_backbone

OUT = Path("demo_out")
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "moon")


def sample_photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: np.asarray(getattr(skimage.data, name)()) for name in PHOTOS}
    for name, image in zip(("china", "flower"), load_sample_images().images):
        photos[name] = image
    return {k: np.stack([v] * 3, -1) if v.ndim == 2 else v[..., :3] for k, v in photos.items()}


def write_split(photos: dict[str, np.ndarray], root: Path, per_class: int, seed: int, labelled: bool) -> None:
    if (root / "_DONE").exists():
        return
    rng = np.random.default_rng(seed)
    for name, image in photos.items():
        h, w = image.shape[:2]
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            top, left = rng.integers(0, h - size), rng.integers(0, w - size)
            crop = Image.fromarray(image[top : top + size, left : left + size]).resize((64, 64), Image.BICUBIC)
            crop.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    (root / "_DONE").write_text("ok\n")


def main() -> int:
    start = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    photos = sample_photos()
    write_split(photos, OUT / "data" / "unlabelled", 40, 0, labelled=False)
    write_split(photos, OUT / "data" / "knn_train", 20, 1, labelled=True)
    write_split(photos, OUT / "data" / "knn_val", 10, 2, labelled=True)
    print(f"[demo] {len(photos)} photographs -> crops in {OUT / 'data'}")

    overrides = [
        f"train.dataset_path={OUT / 'data' / 'unlabelled'}", f"train.output_dir={(OUT / 'train').resolve()}",
        "student.arch=vit_custom", "student.embed_dim=96", "student.depth=4", "student.num_heads=3",
        "student.patch_size=8", "student.drop_path_rate=0.1", "crops.global_crops_size=64", "crops.local_crops_size=32",
        "crops.local_crops_number=4", "dino.head_n_prototypes=512", "dino.head_hidden_dim=256",
        "dino.head_bottleneck_dim=128", "ibot.head_n_prototypes=512", "train.batch_size_per_gpu=24",
        "train.num_workers=2", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=8", "optim.warmup_epochs=2",
        "optim.base_lr=0.002", "teacher.warmup_teacher_temp_epochs=3", "teacher.momentum_teacher=0.99",
        "train.device=cpu", "train.autocast_dtype=fp32", "train.log_period=10", "train.checkpoint_period=50",
        "evaluation.eval_period_iterations=1000",
    ]
    cfg = load_config(None, overrides)
    env = DistEnv.from_environment()
    setup_logging(OUT / "train", True, 0)
    torch.manual_seed(cfg.train.seed)
    random_init = StudentTeacher(cfg).teacher["backbone"]
    knn_args = (OUT / "data" / "knn_train", OUT / "data" / "knn_val", 64, (10, 20))
    before = evaluate_knn(random_init, *knn_args)["top1"]
    print(f"[demo] training a ViT ({cfg.max_iter} iterations, fp32 on CPU) in {OUT / 'train'}")
    summary = train(cfg, env)
    trained = StudentTeacher(cfg)
    state = torch.load(sorted((OUT / "train" / "checkpoints").glob("iter_*"))[-1] / "state.pth", weights_only=True)
    trained.load_state_dict(state["model"])
    after = evaluate_knn(trained.teacher["backbone"], *knn_args)["top1"]

    hub_path = export_backbone(trained.teacher["backbone"], OUT / "teacher_hub.pth", layout="hub")
    hf_path = export_backbone(trained.teacher["backbone"], OUT / "teacher_hf", layout="hf")
    reloaded = load_backbone(hub_path, num_heads=cfg.student.num_heads)
    x = torch.randn(2, 3, 64, 64)
    same = torch.allclose(reloaded.forward_features(x)["x_norm_clstoken"],
                          trained.teacher["backbone"].eval().forward_features(x)["x_norm_clstoken"], atol=1e-5)
    official_shape = dinov2_vits14().pos_embed.shape

    print("\n[demo] results")
    classes = len(photos)
    print(f"  kNN top-1 (k=20), {classes} classes:  random init {before['20']:.1f}%  ->  trained {after['20']:.1f}%")
    print(f"  last training loss {summary['losses'][-1]:.3f}" if summary["losses"] else "  training already done")
    print(f"  exports: {hub_path} (official hub layout), {hf_path} (Hugging Face layout); reload identical: {same}")
    print(f"  official ViT-S/14 hub model builds offline (pos_embed {tuple(official_shape)})")
    print(f"  outputs in {OUT.resolve()}  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
