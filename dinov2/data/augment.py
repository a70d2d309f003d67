"""DINOv2 multi-crop augmentation (2 global + N local crops) driven by an explicit random generator.

Official pipeline (``DataAugmentationDINO`` in ``dinov2/data/augmentations.py``), per crop: ``RandomResizedCrop``
(bicubic, ratio 3/4..4/3) + horizontal flip 0.5; colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8; grayscale
0.2; Gaussian blur (kernel 9, sigma U(0.1, 2)); solarize (threshold 128, p=0.2) on global crop 2 only; ``ToTensor`` +
ImageNet normalisation.

The randomness is split from the pixel work: :meth:`MultiCropAugmentation.sample_params` draws every random
decision of one image from a ``torch.Generator`` into plain :class:`CropParams` records, and :func:`apply_crop` turns
one record into a tensor with ``torchvision.transforms.v2.functional``. A sample's crops are therefore a pure
function of (image, generator seed), whatever process or worker computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Blur application probabilities for (global crop 1, global crop 2, local crops).
# "intended": what the official code and paper document. "official": what the official code actually does (its
# GaussianBlur wraps RandomApply with probability 1 - p, inverting it), i.e. what the released weights were trained
# with (facebookresearch/dinov3 PR #342 fixes the inversion there).
BLUR_PROBABILITIES = {"intended": (1.0, 0.1, 0.5), "official": (0.0, 0.9, 0.5)}

JITTER_PROBABILITY = 0.8
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAYSCALE_PROBABILITY = 0.2
SOLARIZE_PROBABILITY = 0.2
SOLARIZE_THRESHOLD = 128
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
FLIP_PROBABILITY = 0.5
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class CropParams:
    """Every random decision for one crop.

    Attributes:
        size: output side length in pixels (square crops).
        box: (top, left, height, width) of the source region, in input pixels.
        flip: whether the crop is mirrored horizontally.
        jitter_order: order of the colour-jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue); empty when
            colour jitter is not applied.
        jitter_factors: (brightness, contrast, saturation, hue) factors; meaningful only when ``jitter_order``.
        grayscale: whether the crop is converted to 3-channel grayscale.
        blur_sigma: Gaussian blur sigma, or None when blur is not applied.
        solarize: whether pixels >= 128 are inverted.
    """

    size: int
    box: tuple[int, int, int, int]
    flip: bool
    jitter_order: tuple[int, ...]
    jitter_factors: tuple[float, float, float, float]
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _bernoulli(generator: torch.Generator, p: float) -> bool:
    # Always draw, so the stream position never depends on p (both blur modes consume the same numbers).
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < p


def _randint(generator: torch.Generator, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


def sample_crop_box(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` semantics with an explicit generator.

    Args:
        height: input image height.
        width: input image width.
        scale: (min, max) fraction of the image area to crop.
        generator: source of randomness.

    Returns:
        (top, left, crop_height, crop_width). After 10 failed attempts, the largest centred crop whose aspect ratio
        is clamped to ``CROP_RATIO``, as torchvision does.
    """
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_crop(image: Image.Image | torch.Tensor, params: CropParams) -> torch.Tensor:
    """Apply one crop's recorded decisions.

    Args:
        image: an RGB PIL image, or a uint8 tensor (3, H, W).
        params: the decisions from :meth:`MultiCropAugmentation.sample_params`.

    Returns:
        float32 tensor (3, size, size), normalised with the ImageNet mean and std.
    """
    top, left, h, w = params.box
    # Geometry and colour on the PIL image when given one, as the official pipeline does (PIL bicubic resize, PIL
    # colour ops); blur and solarize then run on the uint8 tensor (torchvision blurs PIL images through a tensor).
    x = F.resized_crop(image, top, left, h, w, [params.size, params.size], InterpolationMode.BICUBIC, antialias=True)
    if params.flip:
        x = F.horizontal_flip(x)
    if params.jitter_order:
        brightness, contrast, saturation, hue = params.jitter_factors
        for op in params.jitter_order:
            if op == 0:
                x = F.adjust_brightness(x, brightness)
            elif op == 1:
                x = F.adjust_contrast(x, contrast)
            elif op == 2:
                x = F.adjust_saturation(x, saturation)
            else:
                x = F.adjust_hue(x, hue)
    if params.grayscale:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if isinstance(x, Image.Image):
        x = F.pil_to_tensor(x)  # uint8 (3, S, S)
    if params.blur_sigma is not None:
        x = F.gaussian_blur(x, [BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE], [params.blur_sigma, params.blur_sigma])
    if params.solarize:
        x = F.solarize(x, SOLARIZE_THRESHOLD)
    x = x.to(torch.float32).div_(255.0)
    return F.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


class MultiCropAugmentation:
    """DINOv2 multi-crop augmentation: ``{"global_crops": [g1, g2], "local_crops": [l1..ln]}``.

    Blur modes:

    - ``"intended"`` (default): blur is applied with probability 1.0 / 0.1 / 0.5 to global crop 1 / global crop 2 /
      each local crop, which is what the official code and the paper describe.
    - ``"official"``: 0.0 / 0.9 / 0.5. The official ``GaussianBlur(p)`` subclasses ``RandomApply`` with probability
      ``1 - p``, so the written values are inverted; the released DINOv2 weights were trained with these effective
      values. Choose this to reproduce them.

    Both modes draw the same random numbers in the same order; only the thresholds differ.

    Args:
        global_crops_scale: (min, max) area fraction of the global crops.
        local_crops_scale: (min, max) area fraction of the local crops.
        local_crops_number: number of local crops (0 allowed).
        global_crops_size: side of the global crops in pixels.
        local_crops_size: side of the local crops in pixels.
        blur_mode: ``"intended"`` or ``"official"``.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_mode: str = "intended",
    ) -> None:
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ValueError(f"{name}: expected 0 < min <= max <= 1, got {tuple(scale)}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number: must be >= 0, got {local_crops_number}")
        if global_crops_size <= 0 or local_crops_size <= 0:
            raise ValueError(f"crop sizes must be positive, got {global_crops_size} and {local_crops_size}")
        if blur_mode not in BLUR_PROBABILITIES:
            raise ValueError(f"blur_mode: expected one of {sorted(BLUR_PROBABILITIES)}, got {blur_mode!r}")
        self.global_crops_scale = (float(global_crops_scale[0]), float(global_crops_scale[1]))
        self.local_crops_scale = (float(local_crops_scale[0]), float(local_crops_scale[1]))
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_mode = blur_mode
        self.blur_probabilities = BLUR_PROBABILITIES[blur_mode]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size}, "
            f"blur_mode={self.blur_mode!r})"
        )

    def _sample_one(
        self,
        height: int,
        width: int,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        generator: torch.Generator,
    ) -> CropParams:
        # Draw order is part of the contract (changing it changes every crop of a run): box, flip, jitter, gray,
        # blur, solarize. Every Bernoulli draw happens even when its probability is 0 or 1.
        box = sample_crop_box(height, width, scale, generator)
        flip = _bernoulli(generator, FLIP_PROBABILITY)
        jitter = _bernoulli(generator, JITTER_PROBABILITY)
        order = tuple(int(i) for i in torch.randperm(4, generator=generator))
        b, c, s, h = JITTER_STRENGTH
        factors = (
            _uniform(generator, 1.0 - b, 1.0 + b),
            _uniform(generator, 1.0 - c, 1.0 + c),
            _uniform(generator, 1.0 - s, 1.0 + s),
            _uniform(generator, -h, h),
        )
        grayscale = _bernoulli(generator, GRAYSCALE_PROBABILITY)
        blur = _bernoulli(generator, blur_p)
        sigma = _uniform(generator, *BLUR_SIGMA)
        solarize = _bernoulli(generator, solarize_p)
        return CropParams(
            size=size,
            box=box,
            flip=flip,
            jitter_order=order if jitter else (),
            jitter_factors=factors,
            grayscale=grayscale,
            blur_sigma=sigma if blur else None,
            solarize=solarize,
        )

    def sample_params(self, height: int, width: int, generator: torch.Generator) -> list[CropParams]:
        """Draw every random decision for one image.

        Args:
            height: input image height.
            width: input image width.
            generator: source of randomness; consumed in a fixed order.

        Returns:
            ``2 + local_crops_number`` records: global crop 1, global crop 2, then the local crops.
        """
        p_g1, p_g2, p_local = self.blur_probabilities
        g, gs = self.global_crops_size, self.global_crops_scale
        params = [
            self._sample_one(height, width, g, gs, p_g1, 0.0, generator),
            self._sample_one(height, width, g, gs, p_g2, SOLARIZE_PROBABILITY, generator),
        ]
        for _ in range(self.local_crops_number):
            params.append(
                self._sample_one(height, width, self.local_crops_size, self.local_crops_scale, p_local, 0.0, generator)
            )
        return params

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """Crop and augment one image.

        Args:
            image: an RGB PIL image, or a uint8 tensor (3, H, W).
            generator: a ``torch.Generator`` seeded for this sample; the output is a pure function of the image and
                the generator's state.

        Returns:
            ``{"global_crops": [g1, g2], "local_crops": [l1..ln]}``; globals are float32 (3, G, G), locals
            (3, L, L), normalised with the ImageNet mean and std.
        """
        height, width = F.get_size(image)
        params = self.sample_params(height, width, generator)
        crops = [apply_crop(image, p) for p in params]
        return {"global_crops": crops[:2], "local_crops": crops[2:]}
