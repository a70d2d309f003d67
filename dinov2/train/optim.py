"""AdamW with the official DINOv2 parameter groups: layer-wise lr decay, patch-embed lr multiplier, no weight decay
on biases/norms/LayerScale, and a separately scheduled (initially frozen) last layer of the heads."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


@dataclass(frozen=True)
class ParamGroupKey:
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def layer_id(name: str, n_blocks: int, chunked: bool) -> int:
    """0 for embeddings, i+1 for block i (the global index, also with chunked names), n_blocks+1 otherwise."""
    if any(token in name for token in _EMBEDDING_NAMES):
        return 0
    if chunked:
        match = re.search(r"(?:^|\.)blocks\.\d+\.(\d+)\.", name)
    else:
        match = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return n_blocks + 1


def param_group_key(
    name: str, n_blocks: int | None, chunked: bool, lr_decay_rate: float, patch_embed_lr_mult: float
) -> ParamGroupKey:
    """The official multipliers of one parameter (names without wrapper prefixes).

    ``n_blocks`` is None for modules without blocks (the heads), whose lr multiplier is 1.
    """
    if n_blocks is None:
        lr_multiplier = 1.0
    else:
        lr_multiplier = lr_decay_rate ** (n_blocks + 1 - layer_id(name, n_blocks, chunked))
    if "patch_embed" in name:
        lr_multiplier *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return ParamGroupKey(lr_multiplier, 0.0 if no_decay else 1.0, "last_layer" in name)


def _clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(wrapper, "")
    return name


def build_param_groups(
    modules: dict[str, nn.Module], lr_decay_rate: float, patch_embed_lr_mult: float
) -> list[dict]:
    """Param groups for AdamW, fused by identical (lr multiplier, wd multiplier, is_last_layer).

    Args:
        modules: the student's submodules by name (``backbone``, ``dino_head``, ``ibot_head``). Layer-wise decay
            applies to modules with an ``n_blocks`` attribute (the backbone).
    """
    fused: dict[ParamGroupKey, list[nn.Parameter]] = {}
    for module in modules.values():
        n_blocks = getattr(module, "n_blocks", None)
        chunked = bool(getattr(module, "chunked_blocks", False))
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            key = param_group_key(_clean_name(name), n_blocks, chunked, lr_decay_rate, patch_embed_lr_mult)
            fused.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "lr_multiplier": key.lr_multiplier,
            "wd_multiplier": key.wd_multiplier,
            "is_last_layer": key.is_last_layer,
        }
        for key, params in fused.items()
    ]


def build_optimizer(param_groups: list[dict], beta1: float, beta2: float) -> torch.optim.AdamW:
    """AdamW (eps 1e-8); lr and weight decay are set per step by :func:`apply_schedules`."""
    return torch.optim.AdamW(param_groups, lr=0.0, betas=(beta1, beta2), foreach=True)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay from the schedules and its multipliers."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
