"""Training data: sources, multi-crop augmentation, iBOT masking, collate and the exactly-resumable loader."""

from __future__ import annotations

from typing import Any

import torch

from dinov2.data.augment import BLUR_PROBABILITIES, CropParams, MultiCropAugmentation, apply_crop
from dinov2.data.collate import collate_crops
from dinov2.data.loader import (
    DecodeError,
    RankSampleStream,
    TrainBatchDataset,
    TrainLoader,
    decode_image,
    derive_seed,
    make_train_loader,
)
from dinov2.data.masking import MaskingGenerator, official_max_num_patches
from dinov2.data.sources import ImageFileSource, ImageFolderSource, ImageSource, TarShardSource, open_source

__all__ = [
    "BLUR_PROBABILITIES",
    "CropParams",
    "DecodeError",
    "ImageFileSource",
    "ImageFolderSource",
    "ImageSource",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "RankSampleStream",
    "TarShardSource",
    "TrainBatchDataset",
    "TrainLoader",
    "apply_crop",
    "build_train_loader",
    "collate_crops",
    "decode_image",
    "derive_seed",
    "make_train_loader",
    "official_max_num_patches",
    "open_source",
]


def build_train_loader(cfg: Any, env: Any, start_batch: int = 0) -> TrainLoader:
    """The training loader for a ``TrainConfig`` and a distributed environment (the only config-aware entry point).

    Reads ``train.dataset_path / batch_size_per_gpu / seed / num_workers``, ``crops.*``,
    ``ibot.mask_ratio_min_max / mask_sample_probability`` and ``student.patch_size``; ``env`` gives ``rank``,
    ``world_size`` and (optionally) ``device``, whose type ``cuda`` turns on pinned memory.

    Args:
        cfg: the training config.
        env: the distributed environment.
        start_batch: first batch number (the checkpoint's ``loader.next_batch`` when resuming).

    Returns:
        The rank's :class:`TrainLoader`.
    """
    crops = cfg.crops
    augmentation = MultiCropAugmentation(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        blur_mode=crops.blur_mode,
    )
    device = getattr(env, "device", None)
    return make_train_loader(
        cfg.train.dataset_path,
        cfg.train.batch_size_per_gpu,
        augmentation=augmentation,
        patch_size=cfg.student.patch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
        start_batch=start_batch,
        num_workers=cfg.train.num_workers,
        mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        pin_memory=device is not None and torch.device(device).type == "cuda",
        persistent_workers=cfg.train.num_workers > 0,
    )
