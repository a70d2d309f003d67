"""The demo's embedded "crawl": real photographs from pip packages expanded into crawl-like images with ground truth.

Every image is a *view* (a random crop, resized) of one of the photographs that ship inside scikit-image and
scikit-learn, a templated clip-art image (`demo/templates.py`: playing cards, flags, recoloured drawings, different
pictures under one shared caption band: distinct images that differ in small but meaningful ways), or a distractor
(noise, gradients, shapes). Some images get near-copies the way a web crawl has them: byte copies, re-encodes,
rescales, small crops, flips (photographs only: a mirrored flag is another flag), colour shifts and text overlays.
A held-out evaluation folder (fresh views, labelled by photograph) gets a few planted copies in the crawl, which
decontamination must remove. Two curated seed sets (fresh views of a few photographs) drive sample- and
cluster-based retrieval.

Layout written under ``root``::

    crawl/<id>.<jpg|png|webp>        the uncurated pool
    seeds/sample_set/*.jpg           seeds for sample-based retrieval
    seeds/cluster_set/*.jpg          seeds for cluster-based retrieval
    eval/<photo>/*.jpg               held-out evaluation images (decontamination target and kNN val split)
    knn_train/<photo>/*.jpg          labelled kNN train split (fresh views)
    truth.json                       one record per crawl file: photo, view, transform, duplicate_of, family
    _DONE                            written last; a finished crawl is not rebuilt

Everything is a pure function of the seed.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from demo.templates import (
    PALETTE,
    RANKS,
    SUITS,
    drawing_shapes,
    flag,
    flag_designs,
    playing_card,
    recoloured,
    with_caption,
)

SAMPLE_SEED_PHOTOS = ("coffee", "rocket", "astronaut")
CLUSTER_SEED_PHOTOS = ("chelsea", "motorcycle")
TRANSFORMS = ("bytes", "reencode", "rescale", "crop", "flip", "color", "overlay")
TEMPLATE_TRANSFORMS = ("bytes", "reencode", "rescale", "crop", "overlay")
N_FLAGS, N_DRAWINGS, SCHEMES_PER_DRAWING, N_CAPTIONED = 36, 12, 3, 40


@dataclass(frozen=True)
class CrawlRecord:
    """Ground truth of one crawl file.

    Attributes:
        file: file name under ``crawl/``.
        photo: source photograph, or "" for a distractor or a templated image.
        view: the picture this image shows (``<photo>-<k>``, ``card-<rank>-<suit>``, ``flag-...``,
            ``drawing-<k>-<scheme>``, ``caption-<k>``); "" for a distractor. Images with equal views are duplicates.
        transform: "view" for an original view, one of TRANSFORMS for a near-copy, "eval_copy" for a planted copy of
            an evaluation image, "distractor".
        duplicate_of: the crawl file (or ``eval/...`` path) this is a copy of; "" for originals and distractors.
    """

    file: str
    photo: str
    view: str
    transform: str
    duplicate_of: str
    family: str = "photo"


def sample_photos() -> dict[str, np.ndarray]:
    """The bundled photographs as (H, W, 3) uint8 arrays, keyed by name."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
             "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")
    photos = {n: np.asarray(getattr(skimage.data, n)()) for n in names}
    photos["motorcycle"] = np.asarray(skimage.data.stereo_motorcycle()[0])
    photos.update(zip(("china", "flower"), load_sample_images().images))
    return {k: np.stack([v] * 3, -1) if v.ndim == 2 else np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}


def _encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        image.save(buf, "WEBP", quality=quality)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


class ViewSampler:
    """Random crops of one photograph whose boxes overlap little (IoU below ``max_iou`` when possible)."""

    def __init__(self, photo: np.ndarray, rng: np.random.Generator, max_iou: float = 0.35) -> None:
        self.photo, self.rng, self.max_iou = photo, rng, max_iou
        self.boxes: list[tuple[int, int, int]] = []

    def _iou(self, a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
        (ta, la, sa), (tb, lb, sb) = a, b
        h = max(0, min(ta + sa, tb + sb) - max(ta, tb))
        w = max(0, min(la + sa, lb + sb) - max(la, lb))
        inter = h * w
        return inter / (sa * sa + sb * sb - inter)

    def next(self, out_side: int) -> Image.Image:
        h, w = self.photo.shape[:2]
        best, best_iou = None, 2.0
        for _ in range(60):
            size = int(self.rng.integers(int(min(h, w) * 0.3), int(min(h, w) * 0.5)))
            box = (int(self.rng.integers(0, h - size)), int(self.rng.integers(0, w - size)), size)
            worst = max((self._iou(box, b) for b in self.boxes), default=0.0)
            if worst < best_iou:
                best, best_iou = box, worst
            if worst < self.max_iou:
                break
        assert best is not None
        self.boxes.append(best)
        top, left, size = best
        crop = Image.fromarray(self.photo[top : top + size, left : left + size])
        return crop.resize((out_side, out_side), Image.Resampling.BICUBIC)


def near_copy(image: Image.Image, data: bytes, transform: str, rng: np.random.Generator) -> bytes:
    """Encoded bytes of one near-copy of ``image`` (whose encoded form is ``data``)."""
    if transform == "bytes":
        return data
    if transform == "reencode":
        return _encode(image, "JPEG", int(rng.integers(35, 70)))
    if transform == "rescale":
        factor = float(rng.choice([0.6, 0.75, 1.4]))
        side = max(48, int(image.width * factor))
        return _encode(image.resize((side, side), Image.Resampling.LANCZOS), "JPEG", 88)
    if transform == "crop":
        cut = max(2, int(image.width * float(rng.uniform(0.03, 0.07))))
        return _encode(image.crop((cut, cut, image.width - cut, image.height - cut)), "PNG")
    if transform == "flip":
        return _encode(ImageOps.mirror(image), "JPEG", 90)
    if transform == "color":
        shifted = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2))))
        return _encode(shifted.enhance(float(rng.uniform(0.6, 1.4))), "JPEG", 90)
    if transform == "overlay":
        marked = image.copy()
        draw = ImageDraw.Draw(marked)
        y = int(rng.integers(0, max(1, image.height - 14)))
        draw.text((4, y), "sale 50%" if rng.random() < 0.5 else "(c) crawl", fill=(255, 255, 255), stroke_width=1,
                  stroke_fill=(0, 0, 0))  # outlined: visible on white clip-art too
        return _encode(marked, "JPEG", 90)
    raise ValueError(f"unknown transform {transform!r}")


def distractor(rng: np.random.Generator, side: int) -> Image.Image:
    """A non-photograph: noise, a colour gradient or random shapes."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    if kind == 1:
        ramp = np.linspace(0, 1, side, dtype=np.float32)
        colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        grid = ramp[:, None, None] * colours[0] + ramp[None, :, None] * (colours[1] - colours[0]) * 0.5
        return Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    image = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, side, 2))
        x1, y1 = x0 + int(rng.integers(8, side // 2)), y0 + int(rng.integers(8, side // 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def templated_images(rng: np.random.Generator,
                     samplers: dict[str, ViewSampler]) -> list[tuple[str, str, Image.Image]]:
    """(family, view, image) of every templated image: 52 cards, flags, recoloured drawings, captioned pictures."""
    out = [("card", f"card-{rank}-{suit}", playing_card(rank, suit, int(rng.integers(110, 150))))
           for suit in SUITS for rank in RANKS]
    out += [("flag", f"flag-{kind}-{'-'.join(colours)}", flag(kind, colours, int(rng.integers(100, 150))))
            for kind, colours in flag_designs(rng, N_FLAGS)]
    names = sorted(PALETTE)
    for d in range(N_DRAWINGS):
        shapes = drawing_shapes(rng)
        schemes: set[tuple[str, ...]] = set()
        while len(schemes) < SCHEMES_PER_DRAWING:
            schemes.add(tuple(str(c) for c in rng.choice(names, size=3, replace=False)))
        out += [("recolour", f"drawing-{d}-{k}", recoloured(shapes, scheme, int(rng.integers(100, 150))))
                for k, scheme in enumerate(sorted(schemes))]
    photos = sorted(samplers)
    for k in range(N_CAPTIONED):
        side = int(rng.integers(100, 150))
        base = distractor(rng, side) if k % 4 == 3 else samplers[photos[k % len(photos)]].next(side)
        out.append(("caption", f"caption-{k}", with_caption(base)))
    return out


def build_crawl(root: Path, views_per_photo: int = 40, n_distractors: int = 150, seed: int = 0) -> list[CrawlRecord]:
    """Write the crawl, seeds, evaluation and kNN folders plus ``truth.json`` under ``root``; idempotent.

    Returns:
        The ground-truth records of the crawl, in file order.
    """
    root = Path(root)
    if (root / "_DONE").is_file():
        return [CrawlRecord(**r) for r in json.loads((root / "truth.json").read_text())]
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    records: list[CrawlRecord] = []
    crawl = root / "crawl"
    crawl.mkdir(parents=True, exist_ok=True)
    formats = (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"))
    counter = 0

    def put(data: bytes, ext: str, photo: str, view: str, transform: str, duplicate_of: str,
            family: str = "photo") -> str:
        nonlocal counter
        name = f"{counter:05d}.{ext}"
        counter += 1
        (crawl / name).write_bytes(data)
        records.append(CrawlRecord(name, photo, view, transform, duplicate_of, family))
        return name

    def put_copies(image: Image.Image, data: bytes, ext: str, photo: str, view: str, original: str,
                   transforms: tuple[str, ...], family: str) -> None:
        for transform in rng.choice(transforms, size=int(rng.integers(1, 4)), replace=False):
            copy = near_copy(image, data, str(transform), rng)
            put(copy, ext if transform == "bytes" else ("png" if copy[:4] == b"\x89PNG" else "jpg"),
                photo, view, str(transform), original, family)

    samplers = {name: ViewSampler(photo, np.random.default_rng(rng.integers(2**32))) for name, photo in photos.items()}
    for photo in sorted(photos):
        for k in range(views_per_photo):
            image = samplers[photo].next(int(rng.integers(96, 145)))
            fmt, ext = formats[int(rng.choice(3, p=[0.7, 0.2, 0.1]))]
            data = _encode(image, fmt)
            view = f"{photo}-{k}"
            original = put(data, ext, photo, view, "view", "")
            if rng.random() < 0.6:
                put_copies(image, data, ext, photo, view, original, TRANSFORMS, "photo")
    for family, view, image in templated_images(rng, samplers):
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[int(rng.random() < 0.3)]
        data = _encode(image, fmt)
        original = put(data, ext, "", view, "view", "", family)
        if rng.random() < 0.6:
            put_copies(image, data, ext, "", view, original, TEMPLATE_TRANSFORMS, family)
    for _ in range(n_distractors):
        put(_encode(distractor(rng, int(rng.integers(96, 145))), "PNG"), "png", "", "", "distractor", "",
            "distractor")

    def labelled_views(folder: Path, names: tuple[str, ...], per_photo: int, flat: bool = False) -> list[Path]:
        written = []
        for photo in names:
            target = folder if flat else folder / photo
            target.mkdir(parents=True, exist_ok=True)
            for k in range(per_photo):
                path = target / f"{photo}_{k:03d}.jpg"
                path.write_bytes(_encode(samplers[photo].next(112), "JPEG"))
                written.append(path)
        return written

    labelled_views(root / "seeds" / "sample_set", SAMPLE_SEED_PHOTOS, 8, flat=True)
    labelled_views(root / "seeds" / "cluster_set", CLUSTER_SEED_PHOTOS, 8, flat=True)
    eval_files = labelled_views(root / "eval", tuple(sorted(photos)), 8)
    labelled_views(root / "knn_train", tuple(sorted(photos)), 16)
    # Planted contamination: re-encoded copies of some evaluation images inside the crawl.
    for path in [eval_files[i] for i in rng.choice(len(eval_files), size=12, replace=False)]:
        image = Image.open(path).convert("RGB")
        put(_encode(image, "JPEG", 60), "jpg", path.parent.name, "", "eval_copy", str(path.relative_to(root)),
            "eval_copy")

    (root / "truth.json").write_text(json.dumps([asdict(r) for r in records], indent=0))
    (root / "_DONE").write_text("ok\n")
    return records
