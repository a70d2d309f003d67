"""Read weight files safely, find the backbone in any supported layout, and load it strictly into a model."""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.weights.arch import BackboneSpec, build_from_spec, infer_spec
from dinov2.weights.formats import StateDict, _short_list, strip_wrappers, to_canonical, unchunk_key

logger = logging.getLogger("dinov2")

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
# Containers around a state dict, tried in this order after the requested teacher/student entry.
_CONTAINER_KEYS = ("model", "state_dict", "teacher", "student", "module")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def resolve_path(path: str | Path) -> Path:
    """The weight file behind ``path``; an HF ``save_pretrained`` directory resolves to its weights file.

    Raises:
        ValueError: for a URL (nothing is ever downloaded) or a directory without weights.
        FileNotFoundError: if the path does not exist.
    """
    if _URL.match(str(path)):
        raise ValueError(
            f"{path} is a URL; this code never downloads weights. Download the file first and pass its path"
        )
    path = Path(path)
    if path.is_dir():
        for name in _HF_FILES:
            if (path / name).is_file():
                return path / name
        raise ValueError(f"directory {path} holds none of {', '.join(_HF_FILES)}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def read_weights(path: str | Path) -> dict[str, Any]:
    """Load a ``.safetensors`` file, or a torch pickle with ``weights_only=True`` on CPU.

    Raises:
        ValueError: if the pickle holds anything other than tensors and plain containers (code, custom classes).
    """
    path = resolve_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a plain weights file: torch.load(weights_only=True) refused it ({first_line}). "
            "Only tensors and plain containers are accepted; re-save the state dict from trusted code"
        ) from err


def extract_backbone(obj: Any, which: str = "teacher") -> StateDict:
    """Find the backbone state dict in a loaded checkpoint of any supported kind and return it canonical.

    Handles flat hub/timm/HF files, official ``{"teacher": {"backbone.*", "dino_head.*", ...}}``, our training
    checkpoints ``{"model": {"student.backbone.*", "teacher.backbone.*", ...}, ...}``, and ``module.``,
    ``_orig_mod.``, ``backbone.``, ``dinov2.`` prefixes. Heads and loss buffers are dropped.

    Args:
        obj: what ``read_weights`` returned (or an in-memory state dict).
        which: "teacher" (default: the EMA weights) or "student", where the file holds both.

    Raises:
        ValueError: if no backbone is found or the requested ``which`` is absent.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = _find_state(obj, which)
    state = strip_wrappers(state)
    prefixes = [f"{which}.backbone.", "backbone."]
    other = "student" if which == "teacher" else "teacher"
    for prefix in prefixes:
        selected = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if selected:
            return to_canonical(selected)
    if any(k.startswith(f"{other}.backbone.") for k in state):
        raise ValueError(f"this checkpoint has no {which} backbone (it has a {other} backbone)")
    return to_canonical(state)


def _find_state(obj: Any, which: str) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        other = "student" if which == "teacher" else "teacher"
        if _is_state_dict(obj.get(which)):
            return obj[which]
        if which == "student" and _is_state_dict(obj.get(other)) and "model" not in obj:
            raise ValueError(f"this checkpoint has no {which} weights (only {other!r})")
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _find_state(obj[key], which)
        # A state dict with a few non-tensor extras (e.g. an "_metadata" entry or a step counter).
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) > 0:
            return tensors
    found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"no state dict of tensors found in the checkpoint (top level: {found})")


def load_state(path_or_state: str | Path | Mapping, which: str = "teacher") -> StateDict:
    """Canonical backbone state dict from a path (any layout, .pth/.safetensors/HF dir) or a loaded object."""
    obj = read_weights(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    return extract_backbone(obj, which)


def hf_num_heads(path: str | Path) -> int | None:
    """``num_attention_heads`` from an HF config.json next to (or in) ``path``, when there is one."""
    if _URL.match(str(path)):
        return None
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["num_attention_heads"])
    except (KeyError, ValueError, TypeError):
        return None


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a canonical backbone state dict into ``model`` strictly, adapting block-chunk names to the model.

    Raises:
        ValueError: naming every missing key, unexpected key and shape mismatch (nothing is loaded then).
    """
    target = model.state_dict()
    by_canonical = {unchunk_key(k): k for k in target}
    converted: StateDict = {}
    unexpected = []
    for key, value in state.items():
        if key in by_canonical:
            converted[by_canonical[key]] = value
        else:
            unexpected.append(key)
    missing = [unchunk_key(k) for k in target if k not in converted]
    mismatched = [
        f"{unchunk_key(k)} (checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)})"
        for k, v in converted.items()
        if v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_short_list(missing)}")
        if unexpected:
            problems.append(f"unexpected in the checkpoint: {_short_list(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch: {_short_list(mismatched)}")
        raise ValueError("weights do not match the model: " + _diagnosis(state, target) + "; ".join(problems))
    model.load_state_dict(converted, strict=True)


def _diagnosis(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """A one-clause summary of the likely cause (architecture or grid) to put before the key lists."""
    theirs = {unchunk_key(k): v for k, v in target.items()}
    try:
        ckpt, model = infer_spec(state), infer_spec(theirs)
    except ValueError:
        return ""
    for field in ("embed_dim", "depth", "num_register_tokens", "ffn_layer", "patch_size", "layerscale"):
        if getattr(ckpt, field) != getattr(model, field):
            return f"{field} differs (checkpoint {getattr(ckpt, field)}, model {getattr(model, field)}); "
    if ckpt.grid != model.grid:
        return (
            f"pos_embed grid differs (checkpoint {ckpt.grid}x{ckpt.grid}, model {model.grid}x{model.grid}); build the "
            "model with the checkpoint's img_size or call resize_pos_embed explicitly; "
        )
    return ""


def resize_pos_embed(
    state: Mapping[str, torch.Tensor],
    new_grid: int | tuple[int, int],
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
) -> StateDict:
    """Resample ``pos_embed`` of a canonical state dict to a new patch grid, explicitly (never done implicitly).

    Uses the official ``interpolate_pos_encoding`` call (dinov2/models/vision_transformer.py): bicubic in fp32, with
    ``scale_factor=((g+offset)/M, ...)`` when ``interpolate_offset`` is truthy, else ``size=(gh, gw)``; the CLS slot
    is kept as is. Pass the model's own offset/antialias (hub: 0.1/False, register models 0.0/True).

    Args:
        state: canonical state dict with ``pos_embed`` of shape (1, 1 + M², D).
        new_grid: target grid side, or (rows, cols).

    Returns:
        A new dict whose ``pos_embed`` is (1, 1 + rows·cols, D); other tensors are shared with ``state``.
    """
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    pos = state["pos_embed"]
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    dim = pos.shape[-1]
    grid = pos[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if interpolate_offset:
        scale = ((rows + interpolate_offset) / side, (cols + interpolate_offset) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=interpolate_antialias)
    else:
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=interpolate_antialias)
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise ValueError(f"interpolation produced a {tuple(grid.shape[-2:])} grid instead of {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos.dtype)
    out = dict(state)
    out["pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)
    return out


def load_backbone_weights(
    model: nn.Module,
    path_or_state: str | Path | Mapping,
    which: str = "teacher",
    resize_pos_embed_to_model: bool = False,
) -> None:
    """Load weights of any supported layout strictly into an existing backbone (e.g. a training student/teacher).

    Args:
        model: a DinoVisionTransformer (any block_chunks).
        path_or_state: file, HF directory or loaded checkpoint object.
        which: "teacher" or "student" of a training checkpoint.
        resize_pos_embed_to_model: when the grids differ, resample ``pos_embed`` to the model's grid with the model's
            interpolation settings (logged). Off by default: a grid mismatch is then a ValueError.

    Raises:
        ValueError: naming every missing/unexpected key and shape mismatch.
    """
    state = load_state(path_or_state, which)
    own = model.state_dict()
    if resize_pos_embed_to_model and "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = math.isqrt(own["pos_embed"].shape[1] - 1)
        logger.info("resampling pos_embed %s -> %s", tuple(state["pos_embed"].shape), tuple(own["pos_embed"].shape))
        state = resize_pos_embed(
            state,
            grid,
            interpolate_offset=getattr(model, "interpolate_offset", 0.1),
            interpolate_antialias=getattr(model, "interpolate_antialias", False),
        )
    load_into(model, state)


def load_backbone(
    path_or_state: str | Path | Mapping, which: str = "teacher", num_heads: int | None = None, **overrides
) -> nn.Module:
    """Build the backbone that a checkpoint describes and load it strictly; returned in eval mode.

    The architecture (width, depth, heads = D/64, FFN, registers, patch and image size from the pos-embed grid) is
    inferred from the weights, with the official hub defaults (LayerScale, block_chunks=0; register models offset 0.0
    and antialias, others offset 0.1). ``overrides`` replace any constructor argument (e.g. ``block_chunks=4``).

    Raises:
        ValueError: on an unreadable layout, or any key/shape disagreement with the built model.
    """
    state = load_state(path_or_state, which)
    if num_heads is None and isinstance(path_or_state, (str, Path)):
        num_heads = hf_num_heads(path_or_state)
    spec = infer_spec(state, num_heads=num_heads)
    model = build_from_spec(spec, **overrides)
    load_into(model, state)
    return model.eval()


__all__ = [
    "BackboneSpec",
    "extract_backbone",
    "hf_num_heads",
    "load_backbone",
    "load_backbone_weights",
    "load_into",
    "load_state",
    "read_weights",
    "resize_pos_embed",
    "resolve_path",
]
