"""Distillation mode of ``python -m dinov2.train`` (``distillation.enabled``): the frozen teacher, its heads, checks.

The model is :class:`~dinov2.models.distillation.Distillation`; the loop is the ordinary one. This module resolves
what the loop needs before it starts:

- the teacher's architecture and heads come from its own training config (``distillation.full_cfg_path``, by
  default the ``config.yaml`` of the run the weights belong to), the way the official DINOv3 config names it;
- its weights from ``distillation.checkpoint_path``: our run directory or checkpoint (the EMA teacher entries),
  an official ``teacher_checkpoint.pth`` (ours too: a distilled student's export), or a backbone in any layout
  :mod:`dinov2.weights` reads. ``pos_embed`` is resampled to this run's global crop grid;
- a teacher without heads (a released backbone) first gets them from a head-fitting run, ``<output_dir>/
  teacher_heads``: the existing head-only warm-up (``train.head_warmup_iters``) of self-distillation on the frozen
  teacher backbone for ``distillation.head_fit_iters`` iterations, with this run's data, crops and centering and its
  schedules compressed into that length (no KoLeo, no stochastic depth: only the heads learn). It is an ordinary
  run directory: resumed if interrupted, skipped once finished, and the distillation then reads its EMA heads;
- incompatible pairings are one-line :class:`~dinov2.config.ConfigError` s before anything is built.

Outputs besides the usual ones: every export period, ``students/<name>/eval/training_<it>/`` holds each student's
EMA (the final model) as ``teacher_checkpoint.pth`` (official layout, heads included: ``train.init_from`` accepts
it, e.g. for the 518 px phase) and ``teacher_backbone_hub.{pth,safetensors}``. The training checkpoints hold
everything (all students, their EMAs, their AdamW moments, the frozen teacher and the centers) so resume is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from dinov2.config import (
    ConfigError,
    CropsConfig,
    DistillationConfig,
    ModelWeightsConfig,
    StudentConfig,
    TrainConfig,
    load_config,
    save_config,
)
from dinov2.models.distillation import FEATURE_HEAD, Distillation, part_key, split_by_student
from dinov2.models.student_teacher import ibot_prototypes
from dinov2.train.checkpoint import list_valid_checkpoints
from dinov2.train.highres import load_backbone_resampled, read_model_state, resolve_init_source
from dinov2.train.metrics import count_backbone_flops, count_forward_flops
from dinov2.weights import extract_backbone

logger = logging.getLogger("dinov2")

HEAD_FIT_DIR = "teacher_heads"
REPO = Path(__file__).resolve().parents[2]
_HEADS = ("dino_head", "ibot_head")


@dataclass(frozen=True)
class DistillationPlan:
    """What a distillation run loads, resolved once before the model is built.

    Attributes:
        teacher: the teacher's training config (``student``: its backbone, ``dino``/``ibot``: its heads).
        weights: where the teacher's weights are read (the head-fitting run's directory for a released backbone).
        head_fit: the config of the head-fitting run still to do (or to finish), else None.
        students: name -> architecture of each student.
    """

    teacher: TrainConfig
    weights: Path
    head_fit: TrainConfig | None
    students: dict[str, StudentConfig]


def teacher_config_path(distillation: DistillationConfig) -> Path:
    """``full_cfg_path``, or the ``config.yaml`` of the run directory that ``checkpoint_path`` is, or lies in
    (``<run>``, ``<run>/checkpoints/iter_*[/state.pth]``, ``<run>/eval/training_*/<file>``).

    Raises:
        ConfigError: no config given and none found next to the weights.
    """
    if distillation.full_cfg_path:
        return Path(distillation.full_cfg_path)
    path = Path(distillation.checkpoint_path)
    candidates = [path, path.parent.parent, path.parent.parent.parent]
    for run in candidates:
        if (run / "config.yaml").is_file() and (run / "checkpoints").is_dir():
            return run / "config.yaml"
    raise ConfigError(f"distillation.full_cfg_path: required for {path} (the teacher's training config, whose "
                      "student/dino/ibot sections describe it, e.g. configs/train/vitg14.yaml)")


def _student_key(cfg: TrainConfig, index: int) -> str:
    """The config key of the ``index``-th student, for error messages."""
    return f"distillation.students[{index}]" if cfg.distillation.students else "student"


def check_pairing(cfg: TrainConfig, teacher: TrainConfig, students: dict[str, StudentConfig]) -> None:
    """Teacher and students must share the crop grid (iBOT and the feature term compare tokens one to one) and the
    prototype counts.

    Raises:
        ConfigError: one line naming the key to change.
    """
    size = cfg.crops.global_crops_size
    patch = teacher.student.patch_size
    if size % patch:
        raise ConfigError(f"crops.global_crops_size: {size} is not a multiple of the teacher's patch_size {patch}")
    do_ibot, do_dino = cfg.ibot.loss_weight > 0, cfg.dino.loss_weight > 0
    do_features = cfg.distillation.feature_loss_weight > 0
    for index, (name, student) in enumerate(students.items()):
        if (do_ibot or do_features) and size // student.patch_size != size // patch:
            grid, teacher_grid = size // student.patch_size, size // patch
            needs = "iBOT" if do_ibot else "the feature term"
            off = "ibot.loss_weight=0" if do_ibot else "distillation.feature_loss_weight=0"
            raise ConfigError(
                f"{_student_key(cfg, index)}.patch_size: {student.patch_size} gives student {name} a "
                f"{grid}x{grid} patch grid at crops.global_crops_size={size}, the teacher's patch_size {patch} a "
                f"{teacher_grid}x{teacher_grid} one; {needs} needs equal grids (or set {off})")
    if do_dino and teacher.dino.head_n_prototypes != cfg.dino.head_n_prototypes:
        raise ConfigError(f"dino.head_n_prototypes: {cfg.dino.head_n_prototypes} differs from the teacher's "
                          f"{teacher.dino.head_n_prototypes} (students predict the teacher's prototypes)")
    if do_ibot and ibot_prototypes(teacher.dino, teacher.ibot) != ibot_prototypes(cfg.dino, cfg.ibot):
        raise ConfigError(f"ibot.head_n_prototypes: the students' iBOT head has {ibot_prototypes(cfg.dino, cfg.ibot)}"
                          f" prototypes, the teacher's {ibot_prototypes(teacher.dino, teacher.ibot)}")
    if do_dino and teacher.dino.loss_weight <= 0:
        raise ConfigError("dino.loss_weight: DINO is on but the teacher config has no DINO head")
    if do_ibot and teacher.ibot.loss_weight <= 0:
        raise ConfigError("ibot.loss_weight: iBOT is on but the teacher config has no iBOT head")


def has_heads(source: Path) -> bool:
    """Whether the teacher weights at ``source`` (resolved) include DINO/iBOT heads."""
    state = read_model_state(source)
    return state is not None and any(k.startswith(("teacher.dino_head.", "teacher.ibot_head.")) for k in state)


def head_fit_config(cfg: TrainConfig, teacher: TrainConfig, weights: Path) -> TrainConfig:
    """The head-fitting run for a teacher backbone without heads (see the module docstring)."""
    iters = cfg.distillation.head_fit_iters
    train = replace(
        cfg.train, output_dir=str(Path(cfg.train.output_dir) / HEAD_FIT_DIR), max_iter=iters,
        OFFICIAL_EPOCH_LENGTH=max(1, math.ceil(iters / cfg.optim.epochs)),  # this run's schedules, compressed
        init_from=str(weights), init_heads="fresh", head_warmup_iters=iters,
        checkpoint_period=min(cfg.train.checkpoint_period, iters),
    )
    return replace(
        cfg, MODEL=ModelWeightsConfig(), train=train, distillation=DistillationConfig(),
        student=replace(teacher.student, drop_path_rate=0.0, pretrained_weights=""),
        dino=replace(teacher.dino, koleo_loss_weight=0.0), ibot=teacher.ibot,
        evaluation=replace(cfg.evaluation, eval_period_iterations=iters, knn_train_dataset="", knn_val_dataset=""),
    )


def head_fit_done(output_dir: str | Path, iters: int) -> bool:
    checkpoints = list_valid_checkpoints(output_dir)
    return bool(checkpoints) and checkpoints[-1][0] >= iters - 1


def plan_distillation(cfg: TrainConfig, resume: bool, is_main: bool) -> DistillationPlan:
    """Resolve the teacher (config, weights, whether its heads must be fitted) and check the pairing.

    Args:
        resume: whether this run resumes; a finished head-fitting run is then reused, else redone.
        is_main: rank 0 writes the head-fitting run's ``config.yaml``.

    Raises:
        ConfigError: a missing teacher config, an incompatible pairing, or a headless teacher with
            ``head_fit_iters`` 0.
        FileNotFoundError: the teacher weights do not exist.
    """
    distillation = cfg.distillation
    config_path = teacher_config_path(distillation)
    if not config_path.is_file() and not config_path.is_absolute() and (REPO / config_path).is_file():
        config_path = REPO / config_path  # e.g. configs/train/vitg14.yaml from outside the repository
    if not config_path.is_file():
        raise ConfigError(f"distillation.full_cfg_path: {config_path} does not exist")
    teacher = load_config(config_path)
    students = distillation.student_configs(cfg.student)
    check_pairing(cfg, teacher, students)
    weights = resolve_init_source(distillation.checkpoint_path)
    if has_heads(weights):
        return DistillationPlan(teacher, weights, None, students)
    if distillation.head_fit_iters <= 0:
        raise ConfigError(f"distillation.head_fit_iters: {weights} has no DINO/iBOT heads; set it > 0 to fit them")
    fit = head_fit_config(cfg, teacher, weights)
    done = resume and head_fit_done(fit.train.output_dir, distillation.head_fit_iters)
    if is_main and not done:
        save_config(fit, Path(fit.train.output_dir) / "config.yaml")
    return DistillationPlan(teacher, Path(fit.train.output_dir), None if done else fit, students)


def load_frozen_teacher(model: Distillation, weights: Path) -> None:
    """The teacher's backbone (``pos_embed`` resampled to the model's grid) and heads, strictly.

    Raises:
        ValueError: the weights hold no heads, or any key or shape disagrees with the teacher config.
    """
    source = resolve_init_source(weights)
    state = read_model_state(source)
    if state is None:
        raise ValueError(f"distillation.checkpoint_path: {source} holds no DINO/iBOT heads")
    load_backbone_resampled(model.frozen_teacher["backbone"], extract_backbone({"model": state}, "teacher"))
    for head in _HEADS:
        if head not in model.frozen_teacher:
            continue
        prefix = f"teacher.{head}."
        given = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        own = model.frozen_teacher[head].state_dict()
        if given.keys() != own.keys() or any(given[k].shape != v.shape for k, v in own.items()):
            shapes = {k: tuple(v.shape) for k, v in list(given.items())[:4]}
            raise ValueError(f"distillation.full_cfg_path: the teacher's {head} in {source} does not match its "
                             f"config (checkpoint {shapes or 'none'}); use the config the teacher was trained with")
        model.frozen_teacher[head].load_state_dict(given)
    logger.info("frozen teacher loaded from %s", source)


def spare_ema_momentum(cfg: TrainConfig) -> float | None:
    """The students' spare EMA momentum, 1 - 1 / max(1, ema_horizon * max_iter), or None (``ema_horizon`` 0: the
    teacher-momentum schedule)."""
    horizon = cfg.distillation.ema_horizon
    return None if horizon <= 0 else 1.0 - 1.0 / max(1.0, horizon * cfg.train.max_iter)


def build_distillation(cfg: TrainConfig, plan: DistillationPlan) -> Distillation:
    """The distillation model with its frozen teacher loaded (on CPU, before any wrapping)."""
    model = Distillation(
        plan.teacher.student, plan.teacher.dino, plan.teacher.ibot, plan.students, cfg.dino, cfg.ibot,
        img_size=cfg.crops.global_crops_size, n_local_crops=cfg.crops.local_crops_number,
        centering=cfg.train.centering, feature_loss_weight=cfg.distillation.feature_loss_weight,
        spare_ema_momentum=spare_ema_momentum(cfg), seed=cfg.train.seed,
    )
    load_frozen_teacher(model, plan.weights)
    momentum = model.spare_ema_momentum
    logger.info("students' spare EMA: %s", "the teacher-momentum schedule" if momentum is None else
                f"constant momentum {momentum:.6g} (distillation.ema_horizon {cfg.distillation.ema_horizon} of "
                f"{cfg.train.max_iter} iterations)")
    weight = cfg.distillation.feature_loss_weight
    if weight > 0:
        logger.info("distillation objective: the paper's (DINO + iBOT + KoLeo on the frozen teacher's targets) + the "
                    "feature term, weight %g", weight)
    else:
        logger.info("distillation objective: the paper's (DINO + iBOT + KoLeo on the frozen teacher's targets); "
                    "where the teacher's heads saw much less training than its backbone (heads fitted on a released "
                    "backbone, a short or small-batch SSL run), distillation.feature_loss_weight=10 adds what those "
                    "targets lack (README, Distillation)")
    return model


def ema_exports(model: torch.nn.Module, teacher_state: dict[str, torch.Tensor],
                output_dir: Path) -> dict[Path, dict[str, torch.Tensor]]:
    """Where each exported model goes: the run's own teacher to ``output_dir``, or each student's EMA to
    ``output_dir/students/<name>`` (``teacher_state``: the gathered ``model.teacher`` state dict) without the
    feature term's projection, which only training uses (the training checkpoints keep it), so the exports keep
    the official layout."""
    if not isinstance(model, Distillation):
        return {output_dir: teacher_state}
    return {output_dir / "students" / name: {k: v for k, v in state.items() if not k.startswith(f"{FEATURE_HEAD}.")}
            for name, state in split_by_student(teacher_state).items()}


def ema_momentum(model: torch.nn.Module, momentum: float) -> float:
    """The momentum of this step's EMA update: the scheduled one in self-distillation (the EMA is the teacher),
    the students' spare EMA's bias-corrected one in distillation (see ``Distillation.ema_momentum``)."""
    return model.ema_momentum(momentum) if isinstance(model, Distillation) else momentum


def ema_backbones(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The EMA backbones by student name ("" for self-distillation's teacher)."""
    if not isinstance(model, Distillation):
        return {"": model.teacher["backbone"]}
    return {name: model.teacher[part_key(name, "backbone")] for name in model.student_names}


def flops_per_image(model: Distillation, crops: CropsConfig, device: torch.device) -> float:
    """Training matmul FLOPs per image: the teacher's forward on the global crops plus, per student, forward and
    backward (``count_backbone_flops``; 3x forward for the heads) on every crop. Heads included: the DINO head on
    every CLS token and, with iBOT, the iBOT head on every patch token of the two global crops (nothing is masked
    here; at ViT-S/14, 224 px and 65536 prototypes those heads cost about as much as the backbone) and the feature
    term's projection on every global-crop token."""
    g, lsize, n_local = crops.global_crops_size, crops.local_crops_size, crops.local_crops_number

    def head_flops(parts: torch.nn.ModuleDict, key: str, width: int) -> float:
        if key not in parts:
            return 0.0
        return count_forward_flops(parts[key], torch.zeros(1, width, device=device))

    def role_flops(parts: torch.nn.ModuleDict, key: Callable[[str], str], ibot_head: str) -> tuple[float, ...]:
        """Of one backbone with its heads, ``key(part)`` its keys: the global crop's forward, then the global and
        the local crop's forward + backward."""
        backbone = parts[key("backbone")]
        width, grid = backbone.embed_dim, g // backbone.patch_size
        heads = head_flops(parts, key("dino_head"), width)
        patches = grid * grid * head_flops(parts, key(ibot_head), width) if model.do_ibot else 0.0
        features = (1 + grid * grid) * head_flops(parts, key(FEATURE_HEAD), width)  # students with the term only
        global_forward, global_trained = count_backbone_flops(backbone, g, device)
        _, local_trained = count_backbone_flops(backbone, lsize, device)
        return (global_forward + heads + patches, global_trained + 3 * (heads + patches + features),
                local_trained + 3 * heads)

    with torch.no_grad():
        teacher_global, _, _ = role_flops(model.frozen_teacher, str, model.teacher_ibot_head)
        students = 0.0
        for name in model.student_names:
            _, student_global, student_local = role_flops(model.student, partial(part_key, name),
                                                          model.student_ibot_head)
            students += 2 * student_global + n_local * student_local
    return 2 * teacher_global + students


__all__ = ["DistillationPlan", "build_distillation", "check_pairing", "ema_backbones", "ema_exports", "ema_momentum",
           "flops_per_image", "head_fit_config", "load_frozen_teacher", "plan_distillation", "spare_ema_momentum",
           "teacher_config_path"]
