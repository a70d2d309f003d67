"""Start a training phase from earlier weights: the 518 px high-resolution adaptation (Oquab et al. 2023, Sec. 4).

A phase is an ordinary run with its own output directory and config (e.g. ``configs/train/vitl14_highres518.yaml``:
global crops 518, local crops 98, a short low-lr schedule) plus ``train.init_from``, read only while that directory
holds no checkpoint of its own, so resuming inside the phase is plain resume. ``init_from`` may name:

- a finished run's output directory: its newest committed checkpoint (single-file or sharded DCP);
- one checkpoint: an ``iter_*`` directory or its ``state.pth``;
- an official-layout ``teacher_checkpoint.pth`` with heads (the official trainer's and our exports, e.g. a distilled
  student's): both roles start from its one model, heads included; loss centers restart from their initial value;
- a backbone file in any layout :mod:`dinov2.weights` reads (official hub release, timm, HF, our exports). It has no
  heads, so it needs ``train.init_heads=fresh``.

Student and teacher backbones are loaded strictly from the student/teacher entries, with ``pos_embed`` resampled to
the new grid (``global_crops_size // patch_size``) by :func:`dinov2.weights.resize_pos_embed` with the model's own
interpolation settings (bicubic; 16x16 -> 37x37 for 224 -> 518 at patch 14). The iBOT mask grid follows the same
crop size in the loader, so nothing else changes shape. With ``init_heads=checkpoint`` the DINO/iBOT heads of both
roles and the loss centers come from the checkpoint too; with ``fresh`` they keep their new initialisation (teacher
heads = student heads). The optimizer state, iteration counter, RNG and data position are never carried over: the
phase is a new run with its own schedules.

``train.head_warmup_iters`` > 0 trains the heads only for that many iterations: the student backbone's gradients are
dropped after backward (AdamW skips a parameter without a gradient, so its weights, weight decay and Adam moments all
stay untouched, and its moments start at step 1 when it unfreezes), and the teacher EMA updates the heads only.

Takes the ``train`` config section (``init_from``, ``init_heads``, ``output_dir``) and plain values.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from dinov2.config import TrainSection
from dinov2.models.student_teacher import StudentTeacher
from dinov2.train.checkpoint import STATE_FILE, list_valid_checkpoints
from dinov2.weights import extract_backbone, load_into, read_weights, resize_pos_embed
from dinov2.weights.formats import strip_wrappers

logger = logging.getLogger("dinov2")

_DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes into a sharded checkpoint directory
_ROLES = ("student", "teacher")
_HEADS = ("dino_head.", "ibot_head.")
_CENTERS = ("dino_loss.", "ibot_patch_loss.")
# Sinkhorn-Knopp's queue of earlier teacher rows (present only where the run's regime uses one): rows of the previous
# phase's teacher at another resolution, so a phase starts with an empty queue whatever either phase's regime is
_QUEUE = ("dino_loss.queue", "dino_loss.queue_filled")


def resolve_init_source(init_from: str | Path) -> Path:
    """The checkpoint directory or weights file that ``train.init_from`` names.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a run directory without any committed checkpoint.
    """
    path = Path(init_from)
    if not path.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    if path.is_file() or _is_checkpoint_dir(path):
        return path
    valid = list_valid_checkpoints(path)
    if valid:
        return valid[-1][1]
    if (path / "checkpoints").is_dir():
        raise ValueError(f"train.init_from: {path} holds no committed checkpoint")
    return path  # e.g. a Hugging Face save_pretrained directory, read by dinov2.weights


def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and ((path / STATE_FILE).is_file() or (path / _DCP_METADATA).is_file())


def read_model_state(source: Path) -> dict[str, torch.Tensor] | None:
    """The ``StudentTeacher`` state dict of a training checkpoint, or None when ``source`` is a backbone file.

    Args:
        source: what :func:`resolve_init_source` returned.
    """
    if source.is_dir() and (source / _DCP_METADATA).is_file() and not (source / STATE_FILE).is_file():
        return _read_dcp_model_state(source)
    if source.is_dir() and (source / STATE_FILE).is_file():
        source = source / STATE_FILE
    if source.is_dir():  # an HF directory: a backbone only
        return None
    obj = read_weights(source)
    model = obj.get("model") if isinstance(obj, Mapping) else None
    if isinstance(model, Mapping) and any(k.startswith("student.backbone.") for k in model):
        return dict(model)
    teacher = obj.get("teacher") if isinstance(obj, Mapping) else None
    if isinstance(teacher, Mapping) and any(k.startswith(_HEADS) for k in teacher):
        # official teacher_checkpoint.pth (also our exports): one model with heads, no loss centers; both roles
        # start from it (the centers keep their initial value, see _load_heads)
        teacher = strip_wrappers(teacher)
        return {f"{role}.{k}": v for role in _ROLES for k, v in teacher.items()}
    return None


def _read_dcp_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Only the ``model`` entry of a sharded checkpoint, as full CPU tensors (the optimizer is not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    template = {
        key[len("model.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not template:
        raise ValueError(f"train.init_from: sharded checkpoint {path} holds no model state")
    state = {"model": template}
    with warnings.catch_warnings():  # a one-process phase start reads it without a process group, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    return state["model"]


def load_backbone_resampled(backbone: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strict load of a canonical backbone state dict, with ``pos_embed`` resampled to ``backbone``'s grid."""
    own = backbone.state_dict()["pos_embed"]
    if state["pos_embed"].shape != own.shape:
        grid = math.isqrt(own.shape[1] - 1)
        logger.info("resampling pos_embed %s -> %s", tuple(state["pos_embed"].shape), tuple(own.shape))
        state = resize_pos_embed(
            state, grid, interpolate_offset=backbone.interpolate_offset,
            interpolate_antialias=backbone.interpolate_antialias,
        )
    load_into(backbone, state)


def _load_heads(model: StudentTeacher, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Heads of both roles and the loss centers, strictly (every non-backbone entry of the model but the queue)."""
    is_backbone = lambda key: any(key.startswith(f"{role}.backbone.") for role in _ROLES)  # noqa: E731
    wanted = {k: v for k, v in model.state_dict().items() if not is_backbone(k) and k not in _QUEUE}
    given = {k: v for k, v in state.items() if not is_backbone(k) and k not in _QUEUE}
    missing = sorted(set(wanted) - set(given))
    if not any(k.startswith(_CENTERS) for k in given):  # a teacher_checkpoint.pth: no centers to carry over
        missing = [k for k in missing if not k.startswith(_CENTERS)]
        logger.info("train.init_from: %s holds no loss centers; they start from their initial value", source)
    unexpected = sorted(set(given) - set(wanted))
    mismatched = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
                  if k in given and given[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"train.init_from: the heads in {source} do not match this config (missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}, shape mismatch {mismatched[:6]}); match dino/ibot head settings or set "
            "train.init_heads=fresh"
        )
    model.load_state_dict(given, strict=False)


def init_phase_from(model: StudentTeacher, train: TrainSection, resume: bool = True) -> bool:
    """Initialise ``model`` from ``train.init_from`` unless the run resumes from its own checkpoint.

    Call it on the freshly built model, before any parallel wrapping and before the optimizer sees a step.

    Args:
        model: the new phase's model (its backbones built at the new ``global_crops_size``).
        train: ``init_from``, ``init_heads`` and ``output_dir`` are read (``head_warmup_iters`` is logged).
        resume: whether the run will resume from ``train.output_dir``; then a committed checkpoint there wins.

    Returns:
        True when weights were loaded from ``init_from``.

    Raises:
        ValueError: no usable weights, ``init_heads=checkpoint`` with a backbone-only file, or any key/shape mismatch.
    """
    if not train.init_from or (resume and list_valid_checkpoints(train.output_dir)):
        return False
    source = resolve_init_source(train.init_from)
    state = read_model_state(source)
    if state is None:
        if train.init_heads == "checkpoint":
            raise ValueError(
                f"train.init_from: {source} holds a backbone only (no DINO/iBOT heads); set train.init_heads=fresh"
            )
        backbone = extract_backbone(read_weights(source))
        for role in _ROLES:
            load_backbone_resampled(getattr(model, role)["backbone"], backbone)
    else:
        for role in _ROLES:
            load_backbone_resampled(getattr(model, role)["backbone"], extract_backbone({"model": state}, role))
        if train.init_heads == "checkpoint":
            _load_heads(model, state, source)
    logger.info("phase initialised from %s (heads: %s, head-only warm-up: %d iterations)", source,
                train.init_heads, train.head_warmup_iters)
    return True


def freeze_backbone_grads(model: StudentTeacher, head_warmup_iters: int, iteration: int) -> bool:
    """During the head-only warm-up, drop the student backbone's gradients (call after backward, before clipping).

    Returns:
        True while ``iteration < head_warmup_iters`` (``train.head_warmup_iters``): the backbone is frozen this step.
    """
    if iteration >= head_warmup_iters:
        return False
    for param in model.student["backbone"].parameters():
        param.grad = None
    return True


@torch.no_grad()
def update_teacher_heads(model: StudentTeacher, momentum: float) -> None:
    """The EMA of :meth:`StudentTeacher.update_teacher` restricted to the heads (the teacher backbone stays put)."""
    from torch.distributed.tensor import DTensor

    def local(param: torch.Tensor) -> torch.Tensor:  # FSDP2: the EMA is elementwise on same-layout local shards
        return param.to_local() if isinstance(param, DTensor) else param

    teacher_params, student_params = [], []
    for name, teacher_module in model.teacher.items():
        if name != "backbone":
            teacher_params.extend(local(p) for p in teacher_module.parameters())
            student_params.extend(local(p) for p in model.student[name].parameters())
    if teacher_params:
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


__all__ = ["freeze_backbone_grads", "init_phase_from", "load_backbone_resampled", "read_model_state",
           "resolve_init_source", "update_teacher_heads"]
