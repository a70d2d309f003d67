"""The training regime chosen from the total batch: official at or above ``small_batch.below_total_batch``, the
small-batch recipe below it (see ``SmallBatchConfig`` and README "Small batches").

``resolve_regime`` is a pure function of the config and the world size. It returns the config the run uses: the
input object itself in the official regime (so every value, and the run, is bit for bit the official one), or a copy
with the small-batch values written into the official keys they replace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from dinov2.config import TrainConfig, total_batch_size


@dataclass(frozen=True)
class Regime:
    """Which regime a run is in, why, and the config keys it changed (key -> (official value, regime value))."""

    name: str  # "official" | "small_batch"
    total_batch: int
    changes: dict[str, tuple[object, object]]

    def describe(self) -> str:
        """One log line."""
        if self.name == "official":
            return f"regime: official (total batch {self.total_batch})"
        changed = ", ".join(f"{k}={new} (was {old})" for k, (old, new) in self.changes.items()) or "nothing"
        return (f"regime: small_batch (total batch {self.total_batch}); sets {changed}; "
                "small_batch.mode=never keeps the official values")


def small_batch_active(cfg: TrainConfig, world_size: int) -> bool:
    """True when the small-batch regime applies: ``small_batch.mode`` always, or auto below the threshold. In
    distillation too (without the Sinkhorn-Knopp queue): at a small batch the official temperatures give targets
    near uniform from a teacher trained under the regime, and the student hardly moves at the square-root lr
    (bench/distill.py, README "Distillation")."""
    mode = cfg.small_batch.mode
    if mode == "auto":
        return total_batch_size(cfg.train, world_size) < cfg.small_batch.below_total_batch
    return mode == "always"


def short_run_momentum(cfg: TrainConfig, time_constants: float) -> float:
    """The teacher's start momentum m_0, lowered if needed so that the cosine schedule m_0 -> m_1 over the run's T
    scheduled iterations (``optim.epochs`` x ``train.OFFICIAL_EPOCH_LENGTH``) sums to ``time_constants``::

        sum_t (1 - m_t) ~= T * ((1 - m_1) + (m_1 - m_0) / 2)   =>   m_0 <= m_1 - 2 * (time_constants / T - (1 - m_1))

    Never raised; clamped at 0. A teacher that has summed too few time constants by the end of a short run is
    still partly its random init and lags its student: 600 iterations from 0.99 sum to 3 (a 5% share of the init
    left), from 0.98 to 6 (0.25%); bench/learning.py gains more with the latter (README "Small batches"). A run
    that starts from trained weights (``train.init_from``, ``MODEL.WEIGHTS``, ``student.pretrained_weights``) has no
    random init to forget and keeps its momentum: make demo's 120-iteration continuation on curated shards gained
    nothing over its start with the lowered one (0.9), and gains with 0.99.
    """
    teacher = cfg.teacher
    scheduled = cfg.scheduled_iters
    pretrained = cfg.train.init_from or cfg.MODEL.WEIGHTS or cfg.student.pretrained_weights
    if time_constants <= 0 or scheduled <= 0 or pretrained:
        return teacher.momentum_teacher
    final = teacher.final_momentum_teacher
    needed = final - 2.0 * (time_constants / scheduled - (1.0 - final))
    return max(0.0, min(teacher.momentum_teacher, round(needed, 6)))


def resolve_regime(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, Regime]:
    """(the config the run uses, its regime). Official: ``cfg`` itself, unchanged. Small batch: a validated copy."""
    total = total_batch_size(cfg.train, world_size)
    if not small_batch_active(cfg, world_size):
        return cfg, Regime("official", total, {})
    small = cfg.small_batch
    centering = cfg.train.centering if small.centering == "keep" else small.centering
    wanted = {
        ("teacher", "warmup_teacher_temp"): small.teacher_temp,
        ("teacher", "teacher_temp"): small.teacher_temp,
        ("train", "centering"): centering,
        ("optim", "scaling_min_total_batch"): small.lr_scaling_min_total_batch,
    }
    if not cfg.distillation.enabled:  # a distillation model has no queue (measured: it did not help there)
        queue = small.sinkhorn_queue_size if centering == "sinkhorn_knopp" else 0
        wanted[("dino", "sinkhorn_queue_size")] = queue
        # distillation's teacher is frozen (its EMA is the students' spare copy, with its own horizon)
        wanted[("teacher", "momentum_teacher")] = short_run_momentum(cfg, small.teacher_ema_time_constants)
    resolved = copy.deepcopy(cfg)
    changes: dict[str, tuple[object, object]] = {}
    for (section, key), value in wanted.items():
        old = getattr(getattr(cfg, section), key)
        if old != value:
            setattr(getattr(resolved, section), key, value)
            changes[f"{section}.{key}"] = (old, value)
    resolved.validate()
    return resolved, Regime("small_batch", total, changes)
