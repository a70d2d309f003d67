"""Frozen-backbone features of a dataset, shared by the linear probe, kNN and ``python -m dinov2.eval.extract``.

Kinds (all from the final LayerNorm, as ``forward_features`` / ``get_intermediate_layers(norm=True)``):
  - ``cls``: (n, D) class token of the last block (``x_norm_clstoken``);
  - ``patch_mean``: (n, D) mean of the last block's patch tokens (the linear probe's "avgpool");
  - ``registers``: (n, R, D) register tokens of the last block (R may be 0);
  - ``layers``: (n, L, D) class tokens of the last L blocks, oldest first (so ``layers[:, -1] == cls``); the
    linear probe's input is ``layers[:, -n:]`` flattened.

Batched, under ``torch.inference_mode``, on the model's device; bf16 autocast on CUDA, fp32 on CPU. Outputs are
float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dinov2.data.sources import ImageSource
from dinov2.eval.datasets import DecodedImages, LabelledImages

FEATURE_KINDS = ("cls", "patch_mean", "registers", "layers")


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def last_block_tokens(model: nn.Module, images: torch.Tensor, n_last_blocks: int) -> list[torch.Tensor]:
    """Normed tokens ``(B, 1+R+N, D)`` of the last ``n_last_blocks`` blocks, oldest first, in one forward pass.

    Forward hooks catch the blocks' outputs because ``get_intermediate_layers`` drops the register tokens.
    """
    blocks = model.real_blocks()
    if not 1 <= n_last_blocks <= len(blocks):
        raise ValueError(f"n_last_blocks={n_last_blocks} but the backbone has {len(blocks)} blocks")
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in blocks[-n_last_blocks:]]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return [model.norm(tokens) for tokens in captured]


def compute_features(
    model: nn.Module, images: torch.Tensor, kinds: Sequence[str], n_last_blocks: int = 1
) -> dict[str, torch.Tensor]:
    """Features of one batch ``(B, 3, H, W)`` (already on the model's device); see the module docstring."""
    unknown = set(kinds) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"unknown feature kinds {sorted(unknown)}; valid: {', '.join(FEATURE_KINDS)}")
    if "layers" in kinds:
        tokens = last_block_tokens(model, images, n_last_blocks)
        R = model.num_register_tokens
        last = {"x_norm_clstoken": tokens[-1][:, 0], "x_norm_regtokens": tokens[-1][:, 1 : 1 + R],
                "x_norm_patchtokens": tokens[-1][:, 1 + R :]}  # fmt: skip
    else:  # any backbone with forward_features will do
        last = model.forward_features(images)
    out = {}
    if "cls" in kinds:
        out["cls"] = last["x_norm_clstoken"]
    if "patch_mean" in kinds:
        out["patch_mean"] = last["x_norm_patchtokens"].mean(dim=1)
    if "registers" in kinds:
        out["registers"] = last["x_norm_regtokens"]
    if "layers" in kinds:
        out["layers"] = torch.stack([t[:, 0] for t in tokens], dim=1)  # (B, L, D)
    return {k: v.float().cpu() for k, v in out.items()}


def iter_features(
    model: nn.Module,
    data: LabelledImages | ImageSource,
    image_size: int,
    kinds: Sequence[str] = ("cls",),
    n_last_blocks: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    augment_seed: int | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """Yield ``(start index, {kind: (b, ...)}, ok (b,) bool)`` batch by batch, in dataset order.

    Unreadable images give zero features and ``ok=False`` (counted by the caller, not fatal). ``augment_seed``
    switches from the eval transform to the seeded training augmentation (see ``DecodedImages``).
    """
    source = data.source if isinstance(data, LabelledImages) else data
    loader = torch.utils.data.DataLoader(
        DecodedImages(source, image_size, augment_seed), batch_size=batch_size, num_workers=num_workers,
        shuffle=False,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = 0
    try:
        for images, ok in loader:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                feats = compute_features(model, images.to(device, non_blocking=True), kinds, n_last_blocks)
            feats = {k: torch.where(ok.view(-1, *[1] * (v.dim() - 1)), v, 0.0) for k, v in feats.items()}
            yield start, feats, ok
            start += len(ok)
    finally:
        model.train(was_training)


def extract_features(
    model: nn.Module,
    data: LabelledImages | ImageSource,
    image_size: int,
    kinds: Sequence[str] = ("cls",),
    n_last_blocks: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    augment_seed: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All features in memory: ``{kind: (n, ...)}`` float32 and the validity mask ``(n,)`` bool."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    valid = []
    batches = iter_features(model, data, image_size, kinds, n_last_blocks, batch_size, num_workers, augment_seed)
    for _, feats, ok in batches:
        for k, v in feats.items():
            parts[k].append(v)
        valid.append(ok)
    if not valid:
        raise ValueError("the dataset is empty")
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(valid)
