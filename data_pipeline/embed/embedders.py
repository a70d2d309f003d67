"""Pluggable image embedders: a TorchScript copy-detection model (SSCD contract) and a DINOv2-style ViT.

An embedder is split in two so that preprocessing can run in loader worker processes without the model:
a picklable `transform` (RGB uint8 [H, W, 3] -> float32 [3, h, w], ImageNet-normalised) and the model call
`embed` ([B, 3, h, w] -> L2-normalised float32 [B, d] on the CPU).

Precision: on CUDA the model runs under bf16 autocast; on the CPU it runs in fp32 on purpose, because bf16 is several
times slower than fp32 on CPUs without AMX (ViT-S/14 at 224 px on the 2-core development machine: 2.2 img/s fp32 vs
0.5 img/s under bf16 autocast).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.core.config import EmbedConfig

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ROLES = {"copy": ("embed.copy_model", "embed.copy_kind"), "ssl": ("embed.ssl_model", "embed.ssl_kind")}


def _to_normalised_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] with ImageNet mean/std (numpy, so loader workers never touch torch's threads)."""
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass(frozen=True)
class ShortEdgeResize:
    """SSCD release preprocessing: `Resize(size)` (short edge to `size`, aspect kept, bilinear), ImageNet norm.

    The long edge follows torchvision's rule, `int(size * long / short)`, so outputs match the SSCD reference
    transform on PIL images. Output sizes differ between images of different aspect ratios; `embed.py` batches
    images of equal size together (SSCD's GeM pooling accepts any size, so no padding or cropping is applied).
    """

    size: int

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing."""
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if width <= height else (new_long, self.size)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> float32 [3, h, w], min(h, w) = size."""
        img = Image.fromarray(rgb)
        size = self.output_size(*img.size)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        return _to_normalised_tensor(img)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """DINOv2 evaluation preprocessing: bicubic resize of the short edge to `resize`, center crop `crop` x `crop`."""

    resize: int
    crop: int

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> float32 [3, crop, crop]."""
        img = Image.fromarray(rgb)
        w, h = img.size
        size = ShortEdgeResize(self.resize).output_size(w, h)
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC)
        w, h = img.size
        # torchvision CenterCrop offsets: round((side - crop) / 2).
        left, top = int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))
        return _to_normalised_tensor(img.crop((left, top, left + self.crop, top + self.crop)))


def model_digest(path: str, key: str) -> str:
    """sha256 of a model file (or of every file of a model directory, in name order).

    Args:
        path: the configured model path.
        key: the config key it came from, named in errors (e.g. "embed.copy_model").

    Raises:
        ValueError: one line naming `key` when the path is empty or does not exist.
    """
    if not path:
        raise ValueError(f"{key} is empty: set it to a model file (see configs/curate/default.yaml)")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{key}: model file not found: {path}")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("embed.device=cuda but no CUDA device is available")
    return torch.device(device)


class Embedder:
    """A model plus its preprocessing.

    Attributes:
        name: "torchscript" or "dinov2".
        dim: descriptor size d.
        fingerprint: sha256 of the model file (part of the stage fingerprint).
        device: where the model runs.
        transform: picklable RGB uint8 [H, W, 3] -> float32 [3, h, w] preprocessing.
    """

    name = "embedder"

    def __init__(self, model: torch.nn.Module, transform, fingerprint: str, device: torch.device) -> None:
        self.model = model
        self.transform = transform
        self.fingerprint = fingerprint
        self.device = device
        self.dim = 0

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> float32 [3, h, w]."""
        return self.transform(rgb)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 [B, 3, h, w] -> L2-normalised float32 [B, d] on the CPU."""
        x = batch.to(self.device, non_blocking=True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with amp:
            y = self._forward(x)
        return F.normalize(y.float(), dim=1).cpu()

    def _probe_dim(self, side: int) -> int:
        probe = torch.zeros(1, 3, side, side)
        return int(self.embed(probe).shape[1])


class TorchScriptEmbedder(Embedder):
    """Any TorchScript file with the SSCD contract: [B, 3, H, W] ImageNet-normalised -> [B, d] descriptors."""

    name = "torchscript"

    def __init__(self, path: str, transform, fingerprint: str, device: torch.device, probe_side: int) -> None:
        model = torch.jit.load(path, map_location=device).eval()
        super().__init__(model, transform, fingerprint, device)
        self.dim = self._probe_dim(probe_side)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DinoV2Embedder(Embedder):
    """A DINOv2-style ViT from an official or our own checkpoint: CLS token, or concat(CLS, mean patch token)."""

    name = "dinov2"

    def __init__(self, path: str, fingerprint: str, device: torch.device, resolution: int, patch_mean: bool) -> None:
        # Imported here only: data_pipeline otherwise never depends on the training package.
        from dinov2.weights import load_backbone

        model = load_backbone(path).to(device).eval()
        patch = int(model.patch_size)
        if resolution % patch:
            raise ValueError(f"embed.ssl_resolution={resolution} must be a multiple of the model's patch size {patch}")
        super().__init__(model, ResizeCenterCrop(round(resolution * 256 / 224), resolution), fingerprint, device)
        self.patch_mean = patch_mean
        self.dim = int(model.embed_dim) * (2 if patch_mean else 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        cls = out["x_norm_clstoken"]  # [B, D]
        if not self.patch_mean:
            return cls
        return torch.cat([cls, out["x_norm_patchtokens"].mean(dim=1)], dim=1)  # [B, 2D]


def build_embedder(kind: str, path: str, cfg: EmbedConfig, role: str) -> Embedder:
    """Load the embedder of `kind` ("torchscript" | "dinov2") from `path` for `role` ("copy" | "ssl").

    The role picks the config key named in errors. A TorchScript model as the copy embedder gets the SSCD
    short-edge resize (`copy_resize`); as the SSL embedder, the DINOv2 resize + center crop (`ssl_resolution`).
    The ViT always uses `ssl_resolution` and `ssl_patch_mean`.

    Raises:
        ValueError: one line naming the key for an empty or missing model path, an unknown kind or role.
    """
    if role not in ROLES:
        raise ValueError(f"unknown embedder role {role!r}; expected one of {list(ROLES)}")
    path_key, kind_key = ROLES[role]
    fingerprint = model_digest(path, path_key)
    device = resolve_device(cfg.device)
    if kind == "torchscript":
        if role == "copy":
            return TorchScriptEmbedder(path, ShortEdgeResize(cfg.copy_resize), fingerprint, device, cfg.copy_resize)
        crop = ResizeCenterCrop(round(cfg.ssl_resolution * 256 / 224), cfg.ssl_resolution)
        return TorchScriptEmbedder(path, crop, fingerprint, device, cfg.ssl_resolution)
    if kind == "dinov2":
        return DinoV2Embedder(path, fingerprint, device, cfg.ssl_resolution, cfg.ssl_patch_mean)
    raise ValueError(f"{kind_key} must be one of ['torchscript', 'dinov2'], got {kind!r}")
