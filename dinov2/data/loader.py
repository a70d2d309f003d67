"""The training stream: a deterministic, exactly-resumable, corruption-tolerant loader of collated multi-crop batches.

Why resume is bitwise exact, with any number of workers:

- Batch ``b`` of rank ``r`` is a pure function of (source, seed, rank, world size, batch size, ``b``) and the
  augmentation/masking settings. It is built from sample numbers ``[b*B, (b+1)*B)`` of the rank's stream; sample
  number ``s`` maps to a dataset index through per-epoch permutations seeded from ``(seed, epoch)``; its crops use a
  generator seeded from ``(seed, rank, s)`` and the batch's masks a ``random.Random`` seeded from ``(seed, rank, b)``.
  Nothing reads the global ``random`` / ``numpy`` / ``torch`` RNGs, and no state carries over between batches.
- A torch ``DataLoader`` runs over a map-style dataset whose items are whole batches, with a sampler that counts
  ``start_batch, start_batch + 1, ...``. Each batch number goes to exactly one worker and the DataLoader returns
  results in sampler order, so ``num_workers`` changes the speed, never the batches.
- Hence the whole data-stream state is one integer, the next batch number (:meth:`TrainLoader.loader_state`).

Corrupt images never kill a worker: a decode failure replaces the image by another index drawn from a generator
seeded with ``(seed, rank, s, attempt)`` (deterministic), and the batch reports ``skipped`` (reason -> count) and
``skipped_samples`` ((key, reason, detail) per replaced image).
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov2.data.augment import MultiCropAugmentation
from dinov2.data.collate import SAMPLE_INDEX_KEY, SAMPLE_KEY_KEY, SKIPS_KEY, collate_crops
from dinov2.data.masking import MaskingGenerator, official_max_num_patches
from dinov2.data.remote import is_remote, open_remote_source
from dinov2.data.sources import ImageSource, open_source
from dinov2.io.files import UnsafeFile
from dinov2.io.images import DEFAULT_MAX_PIXELS, DecodeLimits, ImageRejected, decode_rgb

DEFAULT_MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
# Kept under its old name: the loader's decode errors are the shared decoder's rejects.
DecodeError = ImageRejected


def derive_seed(tag: str, *values: int) -> int:
    """A 63-bit seed from a tag and integers (stable across processes and Python versions, unlike ``hash``)."""
    payload = tag.encode() + b"".join(struct.pack("<q", int(v)) for v in values)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def _torch_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image with the shared safe decoder (:mod:`dinov2.io.images`).

    Unlike the official loader (``Image.open`` + ``convert("RGB")``), EXIF orientation is applied (phone photos
    would otherwise train sideways; curated shards keep original bytes, EXIF included), transparency is composited
    onto white, and 16-bit, 32-bit integer and float images are mapped to 8 bits by their depth or range (``convert``
    alone clips them to black or white). The curation pipeline decodes with the same function, so what it embeds and
    what the trainer sees are the same pixels.

    Args:
        data: the encoded file.
        max_pixels: images with more pixels are rejected from their header, before decoding (decompression
            bombs). Pillow's global ``Image.MAX_IMAGE_PIXELS`` still applies too: its warning is an error here.

    Returns:
        A loaded RGB image.

    Raises:
        DecodeError: with reason ``empty_file``, ``unsupported_format``, ``decompression_bomb``, ``truncated``,
            ``decode_error`` or ``out_of_memory``.
    """
    return decode_rgb(data, DecodeLimits(max_pixels=max_pixels)).to_pil()


class RankSampleStream:
    """Sample number -> dataset index for one rank: ``index(s)``.

    Epoch ``e`` draws ``perm_e = torch.randperm(n, generator seeded with (seed, e))``; rank ``r`` of ``W`` takes
    positions ``r, r + W, r + 2W, ...`` of it. Ranks never overlap within an epoch, together they cover every image
    once per epoch, and each rank sees different images in every epoch (unlike the official sharded sampler, which
    pins a fixed subset to each rank). Ranks ``r < n % W`` get one more sample per epoch than the others.

    Args:
        num_samples: dataset size n.
        rank: this rank r.
        world_size: number of ranks W.
        seed: base seed.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_samples < world_size:
            raise ValueError(f"the dataset has {num_samples} images, fewer than world_size={world_size}")
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.samples_per_epoch = (num_samples - rank + world_size - 1) // world_size
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global permutation of ``epoch``.

        Only the latest epoch is cached, as int32 when it fits (4 bytes per image per worker): batches are built
        in increasing order, so one spanning an epoch boundary computes each of its two permutations once.
        """
        perm = self._perms.get(epoch)
        if perm is None:
            perm = torch.randperm(self.num_samples, generator=_torch_generator(derive_seed("perm", self.seed, epoch)))
            if self.num_samples < 2**31:
                perm = perm.to(torch.int32)
            self._perms = {epoch: perm}
        return perm

    def index(self, sample_number: int) -> int:
        """Dataset index of this rank's sample number ``s`` (s >= 0)."""
        epoch, position = divmod(sample_number, self.samples_per_epoch)
        return int(self.permutation(epoch)[self.rank + self.world_size * position])


class TrainBatchDataset(Dataset):
    """Map-style dataset whose item ``b`` is the whole collated batch ``b`` of one rank (see the module docstring).

    Args:
        source: the images.
        batch_size: images per batch on this rank, B.
        augmentation: the multi-crop augmentation.
        mask_generator: the iBOT mask generator for the global-crop patch grid.
        rank: this rank.
        world_size: number of ranks.
        seed: base seed of the whole stream.
        mask_ratio_min_max: range of the per-image mask ratios.
        mask_probability: fraction of global crops that are masked.
        dtype: dtype of the collated crops.
        max_image_pixels: decompression-bomb bound passed to :func:`decode_image`.
        max_replacements: attempts to find a decodable replacement before giving up on a sample.
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        augmentation: MultiCropAugmentation,
        mask_generator: MaskingGenerator,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype = torch.float32,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_replacements: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.mask_generator = mask_generator
        self.n_tokens = mask_generator.num_patches
        self.stream = RankSampleStream(len(source), rank, world_size, seed)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_probability = mask_probability
        self.dtype = dtype
        self.max_image_pixels = max_image_pixels
        self.max_replacements = max_replacements

    def _load(self, index: int) -> Image.Image:
        try:
            data = self.source.read_bytes(index)
        except UnsafeFile as exc:  # e.g. a file swapped for a FIFO after the listing, or one too large
            raise DecodeError(exc.reason, str(exc)) from exc
        except OSError as exc:
            raise DecodeError("read_error", f"{type(exc).__name__}: {exc}") from exc
        return decode_image(data, self.max_image_pixels)

    def make_sample(self, sample_number: int) -> dict[str, Any]:
        """Decode and augment this rank's sample ``s``, replacing undecodable images deterministically."""
        index = self.stream.index(sample_number)
        skips = []
        for attempt in range(self.max_replacements + 1):
            try:
                image = self._load(index)
                break
            except DecodeError as exc:
                skips.append((self.source.key(index), exc.reason, exc.detail))
            # A pseudo-random replacement (not index + 1) so a run of bad files in sorted order costs one try each.
            replace = _torch_generator(derive_seed("replace", self.seed, self.rank, sample_number, attempt))
            index = int(torch.randint(len(self.source), (), generator=replace))
        else:
            raise RuntimeError(
                f"rank {self.rank} sample {sample_number}: {self.max_replacements + 1} images in a row failed to "
                f"decode (last: {skips[-1]}); is the dataset readable?"
            )
        generator = _torch_generator(derive_seed("augment", self.seed, self.rank, sample_number))
        sample: dict[str, Any] = self.augmentation(image, generator)
        sample[SAMPLE_INDEX_KEY] = index
        sample[SAMPLE_KEY_KEY] = self.source.key(index)
        sample[SKIPS_KEY] = skips
        return sample

    def __getitem__(self, batch_number: int) -> dict[str, Any]:
        """Batch ``b``: collated samples ``[b*B, (b+1)*B)`` (keys of :func:`collate_crops`, plus ``batch_index``)."""
        first = batch_number * self.batch_size
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None:  # remote shards: fetch the batch's images concurrently (same bytes, sooner)
            prefetch([self.stream.index(s) for s in range(first, first + self.batch_size)])
        samples = [self.make_sample(s) for s in range(first, first + self.batch_size)]
        batch = collate_crops(
            samples,
            self.mask_ratio_min_max,
            self.mask_probability,
            n_tokens=self.n_tokens,
            mask_generator=self.mask_generator,
            rng=random.Random(derive_seed("mask", self.seed, self.rank, batch_number)),
            dtype=self.dtype,
            local_crops_size=self.augmentation.local_crops_size,
        )
        batch["batch_index"] = batch_number
        return batch


class _CountFrom(Sampler[int]):
    """Infinite sampler ``start, start + 1, ...``; ``start`` is re-read at each ``iter`` (persistent workers)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        batch = self.start
        while True:
            yield batch
            batch += 1


def _no_collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class TrainLoader:
    """Infinite iterable of collated batches with a one-integer, exactly-resumable state.

    Iterating yields batches ``next_batch, next_batch + 1, ...``; after the consumer receives batch ``b``,
    :meth:`loader_state` reports ``next_batch = b + 1``. Save that with the checkpoint and pass it back through
    :meth:`load_loader_state` (or ``make_train_loader(start_batch=...)``) to continue bit for bit.

    Args:
        dataset: the batch dataset.
        start_batch: first batch number to produce.
        num_workers: DataLoader worker processes (0: in this process). Does not change the batches.
        pin_memory: pin batch tensors (for CUDA training).
        persistent_workers: keep workers alive between iterations.
        prefetch_factor: batches prefetched per worker.
    """

    def __init__(
        self,
        dataset: TrainBatchDataset,
        start_batch: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch: must be >= 0, got {start_batch}")
        self.dataset = dataset
        self.next_batch = start_batch
        self._sampler = _CountFrom(start_batch)
        workers = num_workers > 0
        self._loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_no_collate,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and workers,
            prefetch_factor=prefetch_factor if workers else None,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._sampler.start = self.next_batch
        for batch in self._loader:
            self.next_batch = batch["batch_index"] + 1
            yield batch

    def loader_state(self) -> dict[str, int]:
        """The data-stream position plus what it is only valid with (checked by :meth:`load_loader_state`)."""
        d = self.dataset
        return {
            "next_batch": self.next_batch,
            "seed": d.seed,
            "rank": d.rank,
            "world_size": d.world_size,
            "batch_size": d.batch_size,
            "num_samples": len(d.source),
        }

    def load_loader_state(self, state: dict[str, int]) -> None:
        """Continue from a saved :meth:`loader_state`.

        Raises:
            ValueError: if the state belongs to a different stream (seed, rank, world size, batch size or dataset
                size differ), since its batch number would then not continue the same sequence.
        """
        current = self.loader_state()
        for key in ("seed", "rank", "world_size", "batch_size", "num_samples"):
            if key in state and state[key] != current[key]:
                raise ValueError(f"loader state: saved {key}={state[key]} but this loader has {key}={current[key]}")
        self.next_batch = int(state["next_batch"])


def make_train_loader(
    source: ImageSource | str,
    batch_size: int,
    *,
    augmentation: MultiCropAugmentation,
    patch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    max_num_patches: float | None = None,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_replacements: int = 50,
) -> TrainLoader:
    """Build the training stream of one rank.

    Args:
        source: an :class:`ImageSource`, a spec string for :func:`open_source`, or an fsspec URL spec of ``.tar``
            shards (``s3://``, ``gs://``, ``https://`` ..., see :mod:`dinov2.data.remote`).
        batch_size: images per batch on this rank.
        augmentation: the multi-crop augmentation (its global crop size sets the mask grid).
        patch_size: ViT patch size; the mask grid is ``global_crops_size // patch_size`` square.
        rank: this rank.
        world_size: number of ranks.
        seed: base seed of the stream (the config's ``train.seed``).
        start_batch: first batch number (the saved ``next_batch`` when resuming).
        num_workers: DataLoader workers; any value gives the same batches.
        mask_ratio_min_max: range of the per-image mask ratios.
        mask_probability: fraction of global crops that are masked.
        max_num_patches: cap on one masking block; None uses :func:`official_max_num_patches` (128 at 224/14).
        dtype: dtype of the collated crops.
        pin_memory: pin batch tensors (for CUDA training).
        persistent_workers: keep DataLoader workers alive between iterations.
        max_image_pixels: decompression-bomb bound.
        max_replacements: decode attempts per sample before raising.

    Returns:
        The :class:`TrainLoader`.
    """
    if isinstance(source, str):
        source = open_remote_source(source) if is_remote(source) else open_source(source)
    global_size = augmentation.global_crops_size
    if global_size % patch_size:
        raise ValueError(f"global_crops_size={global_size} is not a multiple of patch_size={patch_size}")
    grid = global_size // patch_size
    if max_num_patches is None:
        max_num_patches = official_max_num_patches(global_size, patch_size)
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=max_num_patches)
    dataset = TrainBatchDataset(
        source,
        batch_size,
        augmentation,
        mask_generator,
        rank=rank,
        world_size=world_size,
        seed=seed,
        mask_ratio_min_max=mask_ratio_min_max,
        mask_probability=mask_probability,
        dtype=dtype,
        max_image_pixels=max_image_pixels,
        max_replacements=max_replacements,
    )
    return TrainLoader(dataset, start_batch, num_workers, pin_memory, persistent_workers)
