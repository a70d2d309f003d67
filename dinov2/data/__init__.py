"""Training data: sources, multi-crop augmentation, iBOT masking, collate and the exactly-resumable loader."""

from __future__ import annotations

from dinov2.config import CropsConfig, IbotConfig, TrainSection
from dinov2.data.augment import BLUR_PROBABILITIES, CropParams, MultiCropAugmentation, apply_crop
from dinov2.data.collate import collate_crops, split_micro_batches
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
    "split_micro_batches",
]


def build_train_loader(train: TrainSection, crops: CropsConfig, ibot: IbotConfig, patch_size: int, *, rank: int,
                       world_size: int, start_batch: int = 0, pin_memory: bool = False) -> TrainLoader:
    """The training loader from the config sections it reads (the only config-aware entry point).

    Args:
        train: ``dataset_path``, ``batch_size_per_gpu``, ``grad_accum_steps``, ``seed`` and ``num_workers``.
        crops: the multi-crop augmentation.
        ibot: ``mask_ratio_min_max`` and ``mask_sample_probability`` of the iBOT masks.
        patch_size: the backbone's patch size (``student.patch_size``), which sets the mask grid.
        rank: this process's rank; ``world_size``: the number of ranks sharing the data stream.
        start_batch: first batch number (the checkpoint's ``loader.next_batch`` when resuming).
        pin_memory: pin host batches (for a CUDA device).

    Returns:
        The rank's :class:`TrainLoader`.
    """
    augmentation = MultiCropAugmentation(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        blur_mode=crops.blur_mode,
    )
    return make_train_loader(
        train.dataset_path,
        # one optimizer step's images of this rank; the trainer splits them into grad_accum_steps micro-batches
        train.batch_size_per_gpu * train.grad_accum_steps,
        augmentation=augmentation,
        patch_size=patch_size,
        rank=rank,
        world_size=world_size,
        seed=train.seed,
        start_batch=start_batch,
        num_workers=train.num_workers,
        mask_ratio_min_max=tuple(ibot.mask_ratio_min_max),
        mask_probability=ibot.mask_sample_probability,
        pin_memory=pin_memory,
        persistent_workers=train.num_workers > 0,
    )
