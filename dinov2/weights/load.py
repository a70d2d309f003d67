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

from dinov2.weights.arch import BackboneSpec, build_from_spec, infer_spec, shape_fields_differ
from dinov2.weights.formats import StateDict, _short_list, strip_wrappers, to_canonical, unchunk_key

logger = logging.getLogger("dinov2")

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
# Containers around a state dict, tried in this order after the requested teacher/student entry.
_CONTAINER_KEYS = ("model", "state_dict", "teacher", "student", "module")
# Where the architecture is recorded: a key of our checkpoint dicts, the safetensors header / HF config.json key, and
# a JSON file next to a ``.pth`` export (whose tensors-only dict official loaders read strictly).
RECORD_KEY = "backbone_spec"
METADATA_KEY = "dinov2_backbone_spec"
SIDECAR_SUFFIX = ".arch.json"


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
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not path.is_file():  # a FIFO or device would block or never end
        raise ValueError(f"{path} is not a regular file")
    return path


def sidecar_path(path: str | Path) -> Path:
    """The architecture record written next to a ``.pth`` export: ``<name>.arch.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _one_line_reason(error: BaseException) -> str:
    """A short reason from a torch/safetensors load error, without torch's advice to set ``weights_only=False``."""
    text = str(error).replace("\x1b[1m", "").replace("\x1b[0m", "")
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # the refused class, e.g. "Unsupported global: GLOBAL os.system"
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first or "Weights only load failed" in first:
        return "it holds objects other than tensors and plain containers"
    first = first.split(". This is an internal miniz error")[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def read_weights(path: str | Path) -> dict[str, Any]:
    """Load a ``.safetensors`` file, or a torch pickle with ``weights_only=True`` on CPU.

    Raises:
        ValueError: if the pickle holds anything other than tensors and plain containers (code, custom classes).
    """
    path = resolve_path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({_one_line_reason(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain weights file: torch.load(weights_only=True) refused it ({_one_line_reason(err)}). "
            "Only tensors and plain containers are accepted; re-save the state dict from trusted code"
        ) from None
    except Exception as err:  # noqa: BLE001 -- arbitrary bytes fail anywhere in the unpickler (IndexError, KeyError...)
        # truncated zip/legacy pickle (RuntimeError, EOFError), text or other non-pickle bytes
        raise ValueError(
            f"{path} is not a readable torch weights file, truncated or corrupt? ({_one_line_reason(err)})"
        ) from None


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


def _hf_config(path: str | Path) -> dict:
    """The HF config.json next to (or in) ``path`` as a dict, or {} when there is none (or it is not JSON)."""
    if _URL.match(str(path)):
        return {}
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return {}
    try:
        loaded = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def hf_num_heads(path: str | Path) -> int | None:
    """``num_attention_heads`` from an HF config.json next to (or in) ``path``, when there is one."""
    try:
        return int(_hf_config(path)["num_attention_heads"])
    except (KeyError, ValueError, TypeError):
        return None


def read_record(source: str | Path | None, obj: Any = None) -> BackboneSpec | None:
    """The architecture recorded with a checkpoint, or None when there is no record.

    Looked for in: the loaded checkpoint dict (``backbone_spec``), the safetensors header (``dinov2_backbone_spec``),
    a ``<file>.arch.json`` next to the file, and an HF config.json (``dinov2_backbone_spec``).

    Raises:
        ValueError: for a record that exists but is malformed.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping):
        return BackboneSpec.from_record(obj[RECORD_KEY], f"{source or 'checkpoint'}: {RECORD_KEY}")
    if source is None or _URL.match(str(source)):
        return None
    path = resolve_path(source)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(METADATA_KEY)
        except Exception:  # noqa: BLE001 -- unreadable files are reported by read_weights, with a reason
            text = None
        if text is not None:
            return BackboneSpec.from_record(_parse_json(text, f"{path} header"), f"{path} header")
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return BackboneSpec.from_record(_parse_json(sidecar.read_text(errors="replace"), str(sidecar)), str(sidecar))
    config = _hf_config(source)
    if isinstance(config.get(METADATA_KEY), Mapping):
        return BackboneSpec.from_record(config[METADATA_KEY], f"{path.parent / 'config.json'}: {METADATA_KEY}")
    return None


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{source}: the architecture record is not valid JSON ({err})") from None


def resolve_spec(
    state: Mapping[str, torch.Tensor], record: BackboneSpec | None, num_heads: int | None = None, source: str = ""
) -> BackboneSpec:
    """The architecture to build: the record when there is one (checked against the weights), else what the weights
    fix plus ``num_heads`` (the user's, an HF config's, or the official D/64 for an official width).

    Raises:
        ValueError: when the record disagrees with the weights or with an explicit ``num_heads``, or when the head
            count cannot be known (no record, a non-official width and no ``num_heads``).
    """
    where = f"{source}: " if source else ""
    if record is None:
        return infer_spec(state, num_heads=num_heads)
    if num_heads is not None and num_heads != record.num_heads:
        raise ValueError(f"{where}the file records num_heads={record.num_heads}, but num_heads={num_heads} was given")
    differ = shape_fields_differ(record, infer_spec(state, num_heads=record.num_heads))
    if differ:
        raise ValueError(f"{where}the architecture record disagrees with the weights (record/weights: "
                         f"{', '.join(differ)})")
    return record


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
        ckpt, model = infer_spec(state, num_heads=1), infer_spec(theirs, num_heads=1)  # shapes only
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

    The architecture is the one recorded with the file (every checkpoint and export this project writes has one; see
    :func:`read_record`). Without a record it is read off the weights (width, depth, FFN, registers, patch and image
    size from the pos-embed grid) with the official hub defaults (LayerScale, block_chunks=0; register models offset
    0.0 and antialias, others offset 0.1); the head count then comes from ``num_heads``, an HF config.json, or D/64
    for an official width. ``overrides`` replace any constructor argument (e.g. ``block_chunks=4``).

    Raises:
        ValueError: on an unreadable file or layout, an unknown head count, or any key/shape disagreement.
    """
    source = path_or_state if isinstance(path_or_state, (str, Path)) else None
    obj = read_weights(source) if source is not None else path_or_state
    state = extract_backbone(obj, which)
    spec = backbone_spec(state, obj, source, num_heads)
    model = build_from_spec(spec, **overrides)
    load_into(model, state)
    return model.eval()


def backbone_spec(
    state: Mapping[str, torch.Tensor], obj: Any, source: str | Path | None, num_heads: int | None = None
) -> BackboneSpec:
    """The architecture of a loaded checkpoint: its record, else the weights plus the head count from ``num_heads``,
    an HF config.json next to ``source``, or the official rule (see :func:`resolve_spec`)."""
    record = read_record(source, obj)
    if record is None and num_heads is None and source is not None:
        num_heads = hf_num_heads(source)
    return resolve_spec(state, record, num_heads, str(source) if source is not None else "")


__all__ = [
    "BackboneSpec",
    "backbone_spec",
    "read_record",
    "resolve_spec",
    "sidecar_path",
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
