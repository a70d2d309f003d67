"""Collate multi-crop samples into one training batch with iBOT masks (official ``collate_data_and_cast``)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# Per-sample keys passed through by collate_crops (all optional in a sample dict).
SAMPLE_INDEX_KEY = "sample_index"  # int: dataset index actually used for this sample
SAMPLE_KEY_KEY = "sample_key"  # str: source key of that image
SKIPS_KEY = "skips"  # list of (key, reason, detail) for images replaced before this one decoded


def collate_crops(
    samples: Sequence[dict[str, Any]],
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    *,
    n_tokens: int,
    mask_generator: Callable[..., np.ndarray],
    rng: random.Random,
    dtype: torch.dtype = torch.float32,
    local_crops_size: int = 0,
) -> dict[str, Any]:
    """Stack crops crop-major and draw the iBOT masks for the global crops.

    With B samples: ``n_masked = int(2B * mask_probability)`` global crops get a mask (a deterministic count); slot i
    targets ``int(N * U(probs[i], probs[i+1]))`` patches with ``probs = linspace(r_min, r_max, n_masked + 1)``
    (stratified ratios); the other slots stay empty; then ``rng.shuffle`` mixes masked and unmasked slots across both
    global crops. Random calls happen in the official order (per slot: ratio, then the generator's calls; finally
    the shuffle), so ``rng = random.Random(s)`` reproduces the official masks under ``random.seed(s)``.

    Args:
        samples: B dicts with ``global_crops`` (2 tensors (3, G, G)) and ``local_crops`` (n tensors (3, L, L)), and
            optionally ``sample_index``, ``sample_key`` and ``skips`` (passed through).
        mask_ratio_min_max: (r_min, r_max) range of the per-image mask ratios.
        mask_probability: fraction of the 2B global crops that are masked.
        n_tokens: patch tokens per global crop, N (= H * W of the mask generator's grid).
        mask_generator: ``mask_generator(num_patches, rng=rng) -> bool array (H, W)``, e.g. a MaskingGenerator.
        rng: the only source of randomness used here.
        dtype: dtype of the collated crops.
        local_crops_size: L, used only to shape the empty local-crop tensor when there are no local crops.

    Returns:
        ``collated_global_crops`` (2B, 3, G, G): all images' crop 1, then all images' crop 2;
        ``collated_local_crops`` (n_local * B, 3, L, L), crop-major, or (0, 3, L, L) without local crops;
        ``collated_masks`` (2B, N) bool, rows aligned with the global crops;
        ``mask_indices_list`` (M,) long: flat indices of the True entries of ``collated_masks``;
        ``masks_weight`` (M,) float32: ``1 / #masked patches of its image`` per masked token (sums to the number of
        masked images); ``n_masked_patches`` (1,) long holding M; ``upperbound`` int, ``sum_i int(N * probs[i+1])``,
        a bound on M that depends only on B and N (static buffer shapes);
        ``sample_indices`` (B,) long (-1 when unknown); ``sample_keys`` list of B str;
        ``skipped`` dict reason -> count of images replaced while building this batch;
        ``skipped_samples`` list of (key, reason, detail) for those images.
    """
    if not samples:
        raise ValueError("collate_crops needs at least one sample")
    r_min, r_max = float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1])
    if not 0.0 <= r_min <= r_max <= 1.0:
        raise ValueError(f"mask_ratio_min_max: expected 0 <= min <= max <= 1, got {tuple(mask_ratio_min_max)}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability: expected a value in [0, 1], got {mask_probability}")
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])

    # Crop-major: index c * B + i is crop c of image i.
    global_crops = torch.stack([s["global_crops"][c] for c in range(n_global) for s in samples]).to(dtype)
    if n_local:
        local_crops = torch.stack([s["local_crops"][c] for c in range(n_local) for s in samples]).to(dtype)
    else:
        local_crops = torch.empty((0, 3, local_crops_size, local_crops_size), dtype=dtype)

    n_images = len(global_crops)
    n_masked = int(n_images * mask_probability)
    # float32 linspace and float32 arithmetic, as the official code: the int() truncations below (and so the
    # upperbound, e.g. 4941 at B=64, N=256) depend on it.
    probs = torch.linspace(r_min, r_max, n_masked + 1)
    masks = []
    upperbound = 0
    for i in range(n_masked):
        low, high = probs[i], probs[i + 1]
        ratio = low + (high - low) * rng.random()  # random.uniform(low, high), kept in float32
        masks.append(torch.from_numpy(np.asarray(mask_generator(int(n_tokens * ratio), rng=rng), dtype=bool)))
        upperbound += int(n_tokens * high)
    empty = torch.from_numpy(np.asarray(mask_generator(0, rng=rng), dtype=bool))
    masks.extend(empty.clone() for _ in range(n_images - n_masked))
    rng.shuffle(masks)

    collated_masks = torch.stack(masks).flatten(1)  # (2B, N)
    if collated_masks.shape[1] != n_tokens:
        raise ValueError(f"mask grid has {collated_masks.shape[1]} cells but n_tokens={n_tokens}")
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_image = collated_masks.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)  # (2B, 1)
    masks_weight = (1.0 / per_image).expand_as(collated_masks)[collated_masks]

    skipped_samples = [tuple(skip) for s in samples for skip in s.get(SKIPS_KEY, ())]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), len(mask_indices_list), dtype=torch.long),
        "upperbound": upperbound,
        "sample_indices": torch.tensor([int(s.get(SAMPLE_INDEX_KEY, -1)) for s in samples], dtype=torch.long),
        "sample_keys": [str(s.get(SAMPLE_KEY_KEY, "")) for s in samples],
        "skipped": dict(Counter(skip[1] for skip in skipped_samples)),
        "skipped_samples": skipped_samples,
    }


def split_micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Split a collated batch of n·B images into n batches of B images, as ``collate_crops`` would lay them out.

    Micro-batch i holds images ``[i·B, (i+1)·B)`` with their crops, masks and keys, so the n micro-batches together
    are exactly the large batch (same crops, same masks): gradient accumulation over them reproduces the large-batch
    step. ``mask_indices_list``, ``masks_weight`` and ``n_masked_patches`` are recomputed per micro-batch (the weights
    are per image, so they are the large batch's own); ``upperbound`` keeps the large batch's bound (still valid);
    ``skipped`` counts stay with micro-batch 0 so they are counted once. ``n = 1`` returns ``[batch]`` unchanged.

    Raises:
        ValueError: if the batch's image count is not a multiple of ``n``.
    """
    if n == 1:
        return [batch]
    n_images = len(batch["sample_keys"])
    if n < 1 or n_images % n:
        raise ValueError(f"cannot split a batch of {n_images} images into {n} equal micro-batches")
    size = n_images // n

    def rows(tensor: torch.Tensor, i: int) -> torch.Tensor:
        """Images [i·size, (i+1)·size) of every crop of a crop-major (n_crops · n_images, ...) tensor."""
        crops = tensor.shape[0] // n_images
        return tensor.view(crops, n_images, *tensor.shape[1:])[:, i * size : (i + 1) * size].flatten(0, 1)

    micro_batches = []
    for i in range(n):
        masks = rows(batch["collated_masks"], i)
        mask_indices_list = masks.flatten().nonzero().flatten()
        per_image = masks.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
        part = dict(batch)
        part.update(
            collated_global_crops=rows(batch["collated_global_crops"], i),
            collated_local_crops=rows(batch["collated_local_crops"], i) if len(batch["collated_local_crops"]) else
            batch["collated_local_crops"],
            collated_masks=masks,
            mask_indices_list=mask_indices_list,
            masks_weight=(1.0 / per_image).expand_as(masks)[masks],
            n_masked_patches=torch.full((1,), len(mask_indices_list), dtype=torch.long),
            sample_indices=batch["sample_indices"][i * size : (i + 1) * size],
            sample_keys=batch["sample_keys"][i * size : (i + 1) * size],
            skipped=batch["skipped"] if i == 0 else {},
            skipped_samples=batch["skipped_samples"] if i == 0 else [],
        )
        micro_batches.append(part)
    return micro_batches
