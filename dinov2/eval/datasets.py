"""Datasets for the evaluation tools: labelled image folders and WebDataset shards whose samples carry a ``.cls``.

A dataset string is either
  - a folder with one sub-folder per class (``root/<class>/**/*.jpg``, as torchvision's ImageFolder), or
  - ``.tar`` shards (a path, glob, brace pattern, a ``.txt`` list of shards, or a folder holding only ``*.tar``);
    each sample's ``.cls`` member is its integer label. Class names come from ``classes.txt`` next to the (first)
    shard (line i names class i), else from a ``"class"`` string field in the samples' ``.json``, else ``str(i)``;
  - the official ``ImageNet:root=R:split=VAL`` string (the class folders ``R/val``).

Images are read through :mod:`dinov2.data.sources` (random access, picklable), so the same object feeds a DataLoader.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dinov2.data.sources import ImageFileSource, ImageFolderSource, ImageSource, TarShardSource, open_source
from dinov2.io.images import ImageRejected, decode_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNLABELLED = -1


@dataclass(frozen=True)
class LabelledImages:
    """Images with integer labels, in a fixed (sorted / tar) order.

    Attributes:
        source: random-access images (``len``, ``read_bytes(i)``, ``key(i)``).
        labels: (n,) int64; ``UNLABELLED`` (-1) where a sample has no label.
        classes: class names; ``classes[label]`` names a label.
    """

    source: ImageSource
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.source)

    @property
    def paths(self) -> list[Path]:
        """Image file paths (folder datasets only)."""
        if not isinstance(self.source, ImageFileSource):
            raise AttributeError("paths exist only for image-folder datasets; use source.key(i) for shards")
        return [Path(p) for p in self.source.paths]

    def location(self, i: int) -> str:
        """Where image i lives: its file path, or ``shard.tar`` for a shard sample."""
        if hasattr(self.source, "shard_ids"):  # TarShardSource or a subset of one
            return self.source.shards[int(self.source.shard_ids[i])]
        return self.source.paths[i]

    def subset(self, indices: torch.Tensor) -> LabelledImages:
        """The samples at ``indices`` (n_sub,) int64, same classes (used for the seeded train/val split)."""
        if isinstance(self.source, TarShardSource):
            return LabelledImages(_TarSubset(self.source, indices.tolist()), self.labels[indices], self.classes)
        paths = [self.source.paths[int(i)] for i in indices]
        return LabelledImages(ImageFileSource(paths, root=self.source.root), self.labels[indices], self.classes)


class _TarSubset:
    """A view of some samples of a :class:`TarShardSource` (same interface)."""

    def __init__(self, source: TarShardSource, indices: list[int]) -> None:
        self.base, self.indices = source, indices
        self.shards, self.shard_ids = source.shards, source.shard_ids[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        return self.base.key(self.indices[i])

    def read_bytes(self, i: int) -> bytes:
        return self.base.read_bytes(self.indices[i])


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
                paths.append(str(path))
                labels.append(index[name])
    if not paths:
        raise ValueError(f"no images found under {root} (expected one sub-folder per class)")
    labels_t = torch.tensor(labels, dtype=torch.int64)
    return LabelledImages(ImageFileSource(paths, root=str(root)), labels_t, list(classes))


def _read_shard_labels(path: str) -> dict[str, tuple[int | None, str | None]]:
    """key -> (``.cls`` label, ``.json`` "class" name) for one tar; keys follow :class:`TarShardSource`'s rule."""
    out: dict[str, tuple[int | None, str | None]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            directory, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            ext = ext.lower()
            if not member.isfile() or not dot or not stem or ext not in ("cls", "json"):
                continue
            key = f"{directory}/{stem}" if directory else stem
            raw = tar.extractfile(member).read()
            label, class_name = out.get(key, (None, None))
            if ext == "cls":
                text = raw.decode("utf-8", errors="replace").strip()
                if not text.isdigit():
                    raise ValueError(f"{path}: {member.name} holds {text[:20]!r}, not a non-negative integer label")
                label = int(text)
            else:
                try:
                    meta = json.loads(raw)
                except ValueError:
                    meta = None  # metadata is optional here: a bad .json only loses the class name
                if isinstance(meta, dict) and isinstance(meta.get("class"), str):
                    class_name = meta["class"]
            out[key] = (label, class_name)
    return out


def open_labelled_shards(spec: str | TarShardSource, require_labels: bool = True) -> LabelledImages:
    """WebDataset shards with ``.cls`` labels (see the module docstring for the spec and class names).

    Args:
        spec: a shard spec for :func:`dinov2.data.sources.open_source`, or shards already opened.
        require_labels: raise when a sample has no ``.cls``; otherwise its label is ``UNLABELLED``.

    Raises:
        ValueError: if ``spec`` matches no shards, or (with ``require_labels``) a sample has no ``.cls``.
    """
    source = spec if isinstance(spec, TarShardSource) else open_source(spec)
    if not isinstance(source, TarShardSource):
        raise ValueError(f"{spec!r} is not a set of .tar shards")
    per_shard = [_read_shard_labels(shard) for shard in source.shards]
    labels, names = [], {}
    for i in range(len(source)):
        label, class_name = per_shard[int(source.shard_ids[i])].get(source.key(i), (None, None))
        if label is None:
            if require_labels:
                raise ValueError(f"sample {source.key(i)!r} in {source.shards[source.shard_ids[i]]} has no .cls label")
            label = UNLABELLED
        elif class_name is not None:
            names.setdefault(label, class_name)
        labels.append(label)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    n_classes = int(labels_t.max()) + 1 if len(labels) else 0
    classes_txt = Path(source.shards[0]).parent / "classes.txt"
    if classes_txt.is_file():
        classes = [line.strip() for line in classes_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(classes) < n_classes:
            raise ValueError(f"{classes_txt} names {len(classes)} classes but a .cls label is {n_classes - 1}")
    else:
        classes = [names.get(c, str(c)) for c in range(n_classes)]
    return LabelledImages(source, labels_t, classes)


def _is_shard_folder(path: Path) -> bool:
    entries = list(path.iterdir())
    return any(p.suffix == ".tar" for p in entries) and not any(p.is_dir() for p in entries)


def open_labelled(spec: str | Path, classes: list[str] | None = None) -> LabelledImages:
    """A labelled dataset from a class-folder root or ``.cls``-labelled shards.

    Args:
        spec: dataset string (module docstring).
        classes: the training split's classes; for folders it fixes the label order, for shards (whose labels are
            already integers) it is returned as the class list when given.
    """
    path = Path(spec)
    if path.is_dir() and not _is_shard_folder(path):
        return list_labelled_images(path, classes)
    source = open_source(os.path.join(spec, "*.tar") if path.is_dir() else str(spec))
    if isinstance(source, ImageFolderSource):  # e.g. the official "ImageNet:root=R:split=VAL" string
        return list_labelled_images(source.root, classes)
    if not isinstance(source, TarShardSource):
        raise ValueError(f"{spec}: expected a class-folder root or .tar shards with .cls labels")
    data = open_labelled_shards(source)
    if classes is not None:
        if len(data.labels) and int(data.labels.max()) >= len(classes):
            raise ValueError(f"{spec}: label {int(data.labels.max())} is out of range for {len(classes)} classes")
        data = LabelledImages(data.source, data.labels, list(classes))
    return data


def open_images(spec: str | Path) -> LabelledImages:
    """Any image source for feature extraction, with labels where the data carries them.

    A folder whose images all sit in first-level sub-folders is read as class folders; any other folder is
    unlabelled (labels -1). Shards use their ``.cls`` when present. Other specs go to
    :func:`dinov2.data.sources.open_source` (file lists, globs).
    """
    path = Path(spec)
    if path.is_dir() and not _is_shard_folder(path):
        loose = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not loose and any(p.is_dir() for p in path.iterdir()):
            try:
                return list_labelled_images(path)
            except ValueError:
                pass  # no images inside the sub-folders: fall through to the generic error below
    source = open_source(os.path.join(spec, "*.tar") if path.is_dir() and _is_shard_folder(path) else str(spec))
    if isinstance(source, TarShardSource):
        return open_labelled_shards(source, require_labels=False)
    return LabelledImages(source, torch.full((len(source),), UNLABELLED, dtype=torch.int64), [])


def eval_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize the short side to image_size/0.875 (256 for 224, bicubic), centre-crop, normalise -> (3, S, S)."""
    from torchvision.transforms.v2 import functional as TF

    resize = int(round(image_size / 0.875))
    image = TF.resize(image, resize, interpolation=TF.InterpolationMode.BICUBIC)
    image = TF.center_crop(image, [image_size, image_size])
    tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def train_transform(image: Image.Image, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """The official linear-probe training augmentation: random-resized crop (scale 0.08-1, bicubic), horizontal flip
    with probability 0.5, normalise -> (3, S, S); every random draw comes from ``generator``."""
    from torchvision.transforms.v2 import functional as TF

    from dinov2.data.augment import sample_crop_box

    top, left, h, w = sample_crop_box(image.height, image.width, (0.08, 1.0), generator)
    image = TF.resized_crop(image, top, left, h, w, [image_size, image_size],
                            interpolation=TF.InterpolationMode.BICUBIC)
    if float(torch.rand((), generator=generator)) < 0.5:
        image = TF.horizontal_flip(image)
    tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


class DecodedImages(torch.utils.data.Dataset):
    """Decoded images of a source; an unreadable image gives zeros and ``ok=False``.

    With ``augment_seed`` None the eval transform is applied; otherwise ``train_transform`` with a generator seeded
    by (augment_seed, index), so one seed gives the same augmented view of every image whatever the workers.
    """

    def __init__(self, source: ImageSource, image_size: int, augment_seed: int | None = None) -> None:
        self.source = source
        self.image_size = image_size
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            # The shared safe decoder: the same pixels the trainer and the curation embedder see.
            rgb = decode_rgb(self.source.read_bytes(i)).to_pil()
        except (ImageRejected, OSError):
            return torch.zeros(3, self.image_size, self.image_size), False
        if self.augment_seed is None:
            return eval_transform(rgb, self.image_size), True
        generator = torch.Generator().manual_seed(self.augment_seed * 1_000_003 + i)
        return train_transform(rgb, self.image_size, generator), True
