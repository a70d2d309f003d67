"""Benchmark: does a short CPU run learn? kNN top-1 of the trained teacher vs the same ViT at random init.

Usage:
    python bench/learning.py                  # ~10 minutes on 2 cores (photos)
    python bench/learning.py --iters 60       # a smoke run
    python bench/learning.py --data tux       # drawings (needs tuxpaint-stamps-default)
    python bench/learning.py --data emoji     # emoji drawings in 14 semantic classes (Debian packages, see below)
    python bench/learning.py ibot.loss_weight=0 dino.koleo_loss_weight=0   # ablations: any training overrides

Data (real images, nothing downloaded at run time):
- ``photos`` (default): the 12 bundled scikit-image / scikit-learn sample photographs; each class is one photograph,
  its images are random crops of 1/4 to 1/2 of its short side at 64 px (40 kNN-train and 20 kNN-val per class,
  independent draws that may overlap). Telling crops of one scene from crops of another is what multi-crop
  self-distillation learns, so this is where a working trainer must show a clear gain.
- ``tux``: Debian's ``tuxpaint-stamps-default`` (``apt-get install tuxpaint-stamps-default``): drawings and photos of
  objects under ``/usr/share/tuxpaint/stamps/<category>/``. Classes are the top-level categories with at least 30
  images (animals, food, household, plants, seasonal, symbols, town, vehicles), at most 80 images per class,
  composited onto white at 64 px. Per class a seeded 60/40 split gives the kNN train and val sets. The classes are
  semantic and there are 287 training drawings: over five seeds the official recipe moves kNN (k = 20) by +6.0
  points on average, the small-batch regime by +10.4.
- ``emoji``: colour emoji, two independent artworks of each: Google's Noto Color Emoji and EmojiOne 3 (``apt-get
  install unicode-data fonts-noto-color-emoji ruby-gemojione``; EmojiOne's 64 px PNGs come with the Ruby gem). Classes
  are 14 concepts made of Unicode's emoji subgroups (``/usr/share/unicode/emoji/emoji-test.txt``): mammal, bird,
  bug/sea/reptile, plant, fruit/vegetable, dish, drink, vehicle, building, sky/weather, clothing, sport, tool, music;
  single-code-point emoji only, at most 40 per class. A seeded 60/40 split of the emoji gives kNN train (471 images)
  and val (313): both drawings of an emoji go to its split, so val holds animals, dishes, vehicles... never seen in
  training. Each drawing is placed at a random size (40-80% of the side), tilt and position on a random light
  gradient, 64 px. The classes are semantic, not visual: random-init kNN (k = 20) is 14.7-17.3% (by seed), about
  twice chance (7.1%); over five seeds 600 iterations of the official recipe gain +3.5 points with the teacher's
  targets at 1.00 ln K, the small-batch regime +8.6 with them at 0.69 ln K.

In all three, the SSL run sees the kNN-train images only, without labels. A paired exact McNemar test on the val images
says whether the trained model's gain over random init is more than noise.

Protocol: official kNN (cosine on L2-normalised CLS features, T = 0.07, weighted voting) at k = 10 and 20, on the
teacher backbone after training, against the identical architecture and seed at random initialisation. Training is
``python -m dinov2.train``'s loop (DINO + iBOT + KoLeo, multi-crop, EMA teacher), fp32 on the CPU (bf16 is slower
than fp32 on CPUs without AMX, see bench/train_step.py). At the bench's total batch of 32 the trainer runs its
small-batch regime by default (README, "Small batches"); ``small_batch.mode=never`` runs the official recipe for
comparison. Results are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.config import load_config  # noqa: E402
from dinov2.distributed.env import DistEnv  # noqa: E402
from dinov2.eval.knn import evaluate_knn  # noqa: E402
from dinov2.train.metrics import setup_logging  # noqa: E402
from dinov2.train.regime import resolve_regime  # noqa: E402
from dinov2.train.train import build_student_teacher, train  # noqa: E402

TUX_ROOT = Path("/usr/share/tuxpaint/stamps")
IMAGE_PX = 64
MIN_PER_CLASS, MAX_PER_CLASS = 30, 80


def on_white(path: Path, side: int) -> Image.Image:
    """A stamp (often RGBA) composited onto white and fitted into a ``side`` x ``side`` square."""
    im = Image.open(path).convert("RGBA")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
    return canvas.convert("RGB")


def tux_classes() -> dict[str, list[Path]]:
    """Top-level stamp categories with enough PNGs, each capped at MAX_PER_CLASS (seeded choice)."""
    rng = np.random.default_rng(0)
    out = {}
    for category in sorted(p for p in TUX_ROOT.iterdir() if p.is_dir()):
        files = sorted(category.rglob("*.png"))
        if len(files) >= MIN_PER_CLASS:
            pick = rng.choice(len(files), size=min(len(files), MAX_PER_CLASS), replace=False)
            out[category.name] = [files[i] for i in sorted(pick)]
    return out


def save_sample(root: Path, split: str, name: str, i: int, image: Image.Image) -> None:
    """``<split>/<name>/<i>.png``; kNN-train images also go, unlabelled, into ``ssl/`` (what the SSL run sees)."""
    (root / split / name).mkdir(parents=True, exist_ok=True)
    image.save(root / split / name / f"{i:03d}.png")
    if split == "knn_train":
        (root / "ssl").mkdir(parents=True, exist_ok=True)
        image.save(root / "ssl" / f"{name}_{i:03d}.png")


def write_tux(root: Path) -> int:
    """Write train (labelled + unlabelled copy) and val folders; returns the number of classes."""
    rng = np.random.default_rng(1)
    classes = tux_classes()
    for name, files in classes.items():
        order = rng.permutation(len(files))
        n_train = int(round(0.6 * len(files)))
        for rank, i in enumerate(order):
            split = "knn_train" if rank < n_train else "knn_val"
            save_sample(root, split, name, i, on_white(files[i], IMAGE_PX))
    return len(classes)


def write_photos(root: Path, val_per_class: int = 20) -> int:
    """Crops of the bundled sample photographs, one class per photograph (train and val: independent draws). The
    train crops are drawn first, so ``val_per_class`` changes the val set only."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "moon")
    photos = {n: np.asarray(getattr(skimage.data, n)()) for n in names}
    photos.update(zip(("china", "flower"), load_sample_images().images))
    rng = np.random.default_rng(0)
    for split, per_class in (("knn_train", 40), ("knn_val", val_per_class)):
        for name, image in photos.items():
            image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
            h, w = image.shape[:2]
            for i in range(per_class):
                size = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
                top, left = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
                crop = Image.fromarray(image[top : top + size, left : left + size]).resize((IMAGE_PX, IMAGE_PX))
                save_sample(root, split, name, i, crop)
    return len(photos)


EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")  # unicode-data: every emoji's CLDR subgroup
NOTO_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # fonts-noto-color-emoji
EMOJIONE_GEMS = Path("/usr/share/rubygems-integration/all/gems")  # ruby-gemojione: gemojione-*/assets/png/<CODE>.png
# One class per concept; a concept that Unicode spreads over several subgroups of emoji-test.txt merges them.
EMOJI_CLASSES = {
    "mammal": ("animal-mammal",),
    "bird": ("animal-bird",),
    "bug_sea_reptile": ("animal-bug", "animal-marine", "animal-reptile", "animal-amphibian"),
    "plant": ("plant-flower", "plant-other"),
    "fruit_vegetable": ("food-fruit", "food-vegetable"),
    "dish": ("food-prepared", "food-asian", "food-marine", "food-sweet"),
    "drink": ("drink", "dishware"),
    "vehicle": ("transport-ground", "transport-air", "transport-water"),
    "building": ("place-building", "place-religious"),
    "sky_weather": ("sky & weather",),
    "clothing": ("clothing",),
    "sport": ("sport",),
    "tool": ("tool",),
    "music": ("musical-instrument", "music"),
}
MAX_EMOJI_PER_CLASS = 40


def emoji_split() -> dict[str, tuple[list[int], list[int]]]:
    """Per class, (kNN-train, kNN-val) code points: the single-code-point emoji of its subgroups (skin-tone, ZWJ and
    flag sequences left out), at most MAX_EMOJI_PER_CLASS in a seeded choice, split 60/40 by emoji."""
    subgroups: dict[str, list[int]] = {}
    subgroup = ""
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):  # "1F98A ; fully-qualified # 🦊 E3.0 fox"
            codes, status = line.split("#", 1)[0].split(";")
            points = [int(c, 16) for c in codes.split() if c != "FE0F"]  # FE0F only asks for the colour form
            if status.strip() == "fully-qualified" and len(points) == 1:
                subgroups.setdefault(subgroup, []).append(points[0])
    rng = np.random.default_rng(3)
    out = {}
    for name, parts in EMOJI_CLASSES.items():
        unknown = [part for part in parts if part not in subgroups]
        if unknown:
            raise ValueError(f"{EMOJI_TEST} has no emoji subgroup {unknown[0]!r}")
        points = [p for part in parts for p in subgroups[part]]
        pick = sorted(rng.choice(len(points), size=min(len(points), MAX_EMOJI_PER_CLASS), replace=False))
        chosen = [points[i] for i in rng.permutation(pick)]
        n_train = int(round(0.6 * len(chosen)))
        out[name] = (chosen[:n_train], chosen[n_train:])
    return out


def emoji_drawings(point: int, font: ImageFont.FreeTypeFont, emojione: Path) -> list[Image.Image]:
    """The emoji as drawn by Noto Color Emoji and by EmojiOne (where each has it), RGBA cropped to the drawing."""
    drawings = []
    noto = Image.new("RGBA", (160, 160))  # the font's one bitmap size is 136 x 128
    ImageDraw.Draw(noto).text((0, 0), chr(point), font=font, embedded_color=True)
    drawings.append(noto)
    png = emojione / f"{point:04X}.png"
    if png.is_file():
        drawings.append(Image.open(png).convert("RGBA"))
    boxes = [d.getchannel("A").getbbox() for d in drawings]
    return [d.crop(box) for d, box in zip(drawings, boxes) if box]  # a glyph the font lacks draws nothing


def emoji_scene(drawing: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The drawing at a random size (40-80% of the side), tilt (+-15 degrees) and position on a random two-colour
    gradient, so that neither the background nor the framing tells the class."""
    ramp = np.linspace(0.0, 1.0, IMAGE_PX)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (ramp[None, :] - 0.5) * math.cos(angle) + (ramp[:, None] - 0.5) * math.sin(angle), 0, 1)
    # light colours: on saturated ones the random-init ViT sees only the background (kNN at chance, measured)
    low, high = rng.integers(200, 256, (2, 3))
    canvas = Image.fromarray((low + t[..., None] * (high - low)).astype(np.uint8)).convert("RGBA")
    size = int(IMAGE_PX * rng.uniform(0.4, 0.8))
    drawing = drawing.copy()
    drawing.thumbnail((size, size), Image.Resampling.LANCZOS)
    drawing = drawing.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, expand=True)
    x, y = (int(rng.integers(0, IMAGE_PX - extent + 1)) for extent in drawing.size)
    canvas.alpha_composite(drawing, (x, y))
    return canvas.convert("RGB")


def emojione_dir() -> Path | None:
    """EmojiOne's 64 px PNGs where ruby-gemojione installs them (the gem's version is part of the path)."""
    found = sorted(EMOJIONE_GEMS.glob("gemojione-*/assets/png"))
    return found[-1] if found else None


def missing_emoji_packages() -> list[str]:
    """The Debian packages of the emoji set whose files are not here."""
    present = {
        "unicode-data": EMOJI_TEST.is_file(),
        "fonts-noto-color-emoji": NOTO_EMOJI.is_file(),
        "ruby-gemojione": emojione_dir() is not None,
    }
    return [package for package, found in present.items() if not found]


def write_emoji(root: Path) -> int:
    """Each emoji of a class gives one scene per artwork that draws it; an emoji's scenes all go to its split, so kNN
    val holds emoji never seen in training, in either style."""
    emojione, missing = emojione_dir(), missing_emoji_packages()
    if emojione is None or missing:
        raise FileNotFoundError(f"emoji data set: apt-get install {' '.join(missing)}")
    font = ImageFont.truetype(str(NOTO_EMOJI), 109)  # 109 px: the size of the font's colour bitmaps
    rng = np.random.default_rng(4)
    for name, splits in emoji_split().items():
        i = 0
        for split, points in zip(("knn_train", "knn_val"), splits):
            for point in points:
                for drawing in emoji_drawings(point, font, emojione):
                    save_sample(root, split, name, i, emoji_scene(drawing, rng))
                    i += 1
    return len(EMOJI_CLASSES)


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar p-value: the chance of a split at least this uneven of the wins + losses images
    that only one of the two models gets right, if both models were equally good."""
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def training_overrides(data: Path, out: Path, iters: int) -> list[str]:
    """A ViT small enough for 2 cores: 128-d, 6 blocks, patch 8 at 64 px (8 x 8 tokens), 4 local crops of 32 px."""
    epoch = max(1, iters // 20)  # 20 'epochs' whatever the length, so warm-ups keep their share
    return [
        f"train.dataset_path={data}", f"train.output_dir={out}",
        "student.arch=vit_custom", "student.embed_dim=128", "student.depth=6", "student.num_heads=4",
        # LayerScale from 1.0, not 1e-5: with 1e-5 every image's CLS token is identical at init and a short run
        # never leaves that state (see configs/train/demo_cpu.yaml).
        "student.patch_size=8", "student.drop_path_rate=0.1", "student.layerscale=1.0",
        f"crops.global_crops_size={IMAGE_PX}",
        "crops.local_crops_size=32", "crops.local_crops_number=4", "dino.head_n_prototypes=1024",
        "dino.head_hidden_dim=512", "dino.head_bottleneck_dim=128", "ibot.head_n_prototypes=1024",
        "train.batch_size_per_gpu=32", "train.num_workers=2", f"train.OFFICIAL_EPOCH_LENGTH={epoch}",
        f"optim.epochs={max(1, -(-iters // epoch))}", f"train.max_iter={iters}", "optim.warmup_epochs=2",
        "optim.base_lr=0.002", "teacher.warmup_teacher_temp_epochs=3", "teacher.momentum_teacher=0.99",
        "train.device=cpu", "train.autocast_dtype=fp32", "train.log_period=20", f"train.checkpoint_period={iters}",
        f"evaluation.eval_period_iterations={iters}",
    ]


WRITERS = {"photos": write_photos, "tux": write_tux, "emoji": write_emoji}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600, help="training iterations (default 600)")
    parser.add_argument("--data", choices=tuple(WRITERS), default="photos")
    parser.add_argument("--workdir", default="", help="keep data and run here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra training key=value overrides, e.g. ibot.loss_weight=0")
    args = parser.parse_args(argv)
    if args.iters < 20:
        parser.error("--iters must be >= 20")
    data_kind = args.data
    if data_kind == "tux" and not TUX_ROOT.is_dir():
        print("tuxpaint-stamps-default is not installed: apt-get install tuxpaint-stamps-default", file=sys.stderr)
        return 2
    if data_kind == "emoji" and missing_emoji_packages():
        print(f"emoji data set: apt-get install {' '.join(missing_emoji_packages())}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        n_classes = WRITERS[data_kind](root)
        n_train = sum(1 for _ in (root / "knn_train").rglob("*.png"))
        n_val = sum(1 for _ in (root / "knn_val").rglob("*.png"))
        cfg = load_config(None, training_overrides(root / "ssl", root / "run", args.iters) + args.overrides)
        setup_logging(root / "run", True, 0)
        torch.manual_seed(cfg.train.seed)
        random_backbone = build_student_teacher(cfg).teacher["backbone"]
        knn = (root / "knn_train", root / "knn_val", IMAGE_PX, (10, 20))
        correct_before = evaluate_knn(random_backbone, *knn, per_image=True)["correct"]
        t_train = time.perf_counter()
        summary = train(cfg, DistEnv(), resume=False)
        train_s = time.perf_counter() - t_train
        state = torch.load(sorted((root / "run" / "checkpoints").glob("iter_*"))[-1] / "state.pth",
                           weights_only=True)
        trained = build_student_teacher(resolve_regime(cfg, 1)[0])  # the regime's config (e.g. its queue buffers)
        trained.load_state_dict(state["model"])
        correct_after = evaluate_knn(trained.teacher["backbone"], *knn, per_image=True)["correct"]
        # the student too: a teacher that lags its student (EMA momentum near 1 in a short run) shows up as a gap
        student_correct = evaluate_knn(trained.student["backbone"], *knn, per_image=True)["correct"]
        records = [json.loads(line) for line in (root / "run" / "training_metrics.json").read_text().splitlines()]
        entropies = [r["dino_teacher_entropy"] for r in records if "dino_teacher_entropy" in r]
        dino = [r["dino_global_crops_loss"] + r.get("dino_local_crops_loss", 0.0) for r in records
                if "dino_global_crops_loss" in r]
        marginals = [r["dino_teacher_marginal_entropy"] for r in records if "dino_teacher_marginal_entropy" in r]
        warnings = [r for r in records if r.get("event") == "collapse_warning"]
        total_s = time.perf_counter() - start

    before = {k: 100.0 * v.mean() for k, v in correct_before.items()}
    after = {k: 100.0 * v.mean() for k, v in correct_after.items()}
    paired = {
        k: (int((correct_after[k] & ~correct_before[k]).sum()), int((correct_before[k] & ~correct_after[k]).sum()))
        for k in ("10", "20")
    }
    losses = summary["losses"]
    print(f"\nLearning check: {data_kind} data, {n_classes} classes, {n_train} kNN-train / {n_val} kNN-val images "
          f"at {IMAGE_PX} px; ViT 128-d x 6 blocks, patch 8; {summary['iteration'] + 1} iterations x "
          f"{cfg.train.batch_size_per_gpu} images, fp32 CPU, {torch.get_num_threads()} threads")
    print(resolve_regime(cfg, 1)[1].describe())
    if args.overrides:
        print("overrides: " + " ".join(args.overrides))
    print(f"{'model':<14} {'kNN top-1 k=10':>15} {'kNN top-1 k=20':>15}")
    print(f"{'random init':<14} {before['10']:>14.1f}% {before['20']:>14.1f}%")
    print(f"{'trained':<14} {after['10']:>14.1f}% {after['20']:>14.1f}%")
    print(f"{'gain':<14} {after['10'] - before['10']:>+14.1f}  {after['20'] - before['20']:>+14.1f}")
    student = {k: 100.0 * v.mean() for k, v in student_correct.items()}
    print(f"{'student':<14} {student['10']:>14.1f}% {student['20']:>14.1f}%  (the trained student, not the teacher)")
    print(f"chance {100 / n_classes:.1f}%; loss {losses[0]:.3f} -> {losses[-1]:.3f}; training {train_s / 60:.1f} min, "
          f"whole benchmark {total_s / 60:.1f} min (target: clear gain within 15 min on 2 cores)")
    for k, (wins, regressions) in paired.items():
        print(f"paired at k={k}: {wins} val images right only after training, {regressions} right only at random "
              f"init; exact McNemar p = {mcnemar_p(wins, regressions):.3g}")
    wins, regressions = (int((student_correct["20"] & ~correct_before["20"]).sum()),
                         int((correct_before["20"] & ~student_correct["20"]).sum()))
    print(f"student, paired at k=20: {wins} right only after training, {regressions} right only at random init; "
          f"exact McNemar p = {mcnemar_p(wins, regressions):.3g}")
    if entropies:
        ln_k = math.log(cfg.dino.head_n_prototypes)
        print(f"DINO teacher-target entropy {entropies[0]:.2f} -> {entropies[-1]:.2f} nats = "
              f"{entropies[0] / ln_k:.2f} -> {entropies[-1] / ln_k:.2f} ln K (ln K = {ln_k:.2f} is uniform targets); "
              f"DINO loss (global + local) {dino[0]:.3f} -> {dino[-1]:.3f} (first -> last log period)")
        print("per log period, in ln K: target entropy " + " ".join(f"{e / ln_k:.2f}" for e in entropies)
              + "; batch-mean target entropy " + " ".join(f"{e / ln_k:.2f}" for e in marginals)
              + "; DINO loss " + " ".join(f"{d:.2f}" for d in dino))
    for warning in warnings:
        print(f"collapse warning at iteration {warning['iteration']}: {warning['kind']} targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
