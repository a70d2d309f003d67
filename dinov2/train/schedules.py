"""Training schedules as pure functions of the iteration: lr, last-layer lr, weight decay, teacher momentum/temp.

Each schedule reproduces the official ``CosineScheduler`` array exactly (freeze zeros, then a linear warm-up that
ends on the base value, then a half cosine to the final value; the final value past the end) but is evaluated in
O(1) per step, so nothing of size ``max_iter`` is built and a resumed run needs no state.

Takes the ``optim`` and ``teacher`` config sections, the epoch length and the already scaled peak lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinov2.config import OptimConfig, TeacherConfig


@dataclass(frozen=True)
class CosineSchedule:
    """Value at iteration ``it`` of the official cosine schedule.

    Layout over ``total_iters``: ``freeze_iters`` zeros, ``warmup_iters`` points of
    ``linspace(start_warmup_value, base_value)``, then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for
    ``i = 0..n-1`` with ``n = total - warmup - freeze``. Iterations at or past the end give ``final_value``.
    """

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __call__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if self.warmup_iters == 1:  # np.linspace(a, b, 1) == [a]
                return self.start_warmup_value
            step = (self.base_value - self.start_warmup_value) / (self.warmup_iters - 1)
            return self.start_warmup_value + step * it
        it -= self.warmup_iters
        n = self.total_iters - self.warmup_iters - self.freeze_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + math.cos(math.pi * it / n))


@dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear from ``start`` to ``end`` over ``warmup_iters`` (the last warm-up point is ``end``), then ``end``."""

    start: float
    end: float
    warmup_iters: int

    def __call__(self, it: int) -> float:
        if it >= self.warmup_iters:
            return self.end
        if self.warmup_iters == 1:  # np.linspace(a, b, 1) == [a]
            return self.start
        return self.start + (self.end - self.start) * it / (self.warmup_iters - 1)


@dataclass(frozen=True)
class ZeroedPrefixSchedule:
    """``schedule(it)``, but 0 for ``it < zero_iters``: the official last-layer lr (the lr array with its first
    ``freeze_last_layer_epochs`` epochs overwritten by 0, not shifted, so the warm-up does not restart after it)."""

    schedule: CosineSchedule
    zero_iters: int

    def __call__(self, it: int) -> float:
        return 0.0 if it < self.zero_iters else self.schedule(it)


@dataclass(frozen=True)
class TrainingSchedules:
    """All per-iteration hyper-parameters of a run."""

    lr: CosineSchedule
    last_layer_lr: ZeroedPrefixSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: LinearWarmupSchedule

    def at(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr(it),
            "last_layer_lr": self.last_layer_lr(it),
            "wd": self.weight_decay(it),
            "mom": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
        }


def build_schedules(optim: OptimConfig, teacher: TeacherConfig, epoch_length: int, peak_lr: float) -> TrainingSchedules:
    """The official schedules.

    Args:
        optim: epochs, warm-up, final lr, weight decay and last-layer freeze.
        teacher: EMA momentum and teacher temperature.
        epoch_length: iterations per "epoch" (``train.OFFICIAL_EPOCH_LENGTH``, unrelated to the data size).
        peak_lr: the lr after the batch-size scaling rule (:func:`dinov2.config.scaled_lr`).
    """
    total = optim.epochs * epoch_length
    lr = CosineSchedule(peak_lr, optim.min_lr, total, warmup_iters=optim.warmup_epochs * epoch_length)
    # The last layer's lr is 0 for the first freeze_last_layer_epochs: Adam moments still accumulate (as official).
    last_layer_lr = ZeroedPrefixSchedule(lr, optim.freeze_last_layer_epochs * epoch_length)
    wd = CosineSchedule(optim.weight_decay, optim.weight_decay_end, total)
    momentum = CosineSchedule(teacher.momentum_teacher, teacher.final_momentum_teacher, total)
    teacher_temp = LinearWarmupSchedule(
        teacher.warmup_teacher_temp, teacher.teacher_temp, teacher.warmup_teacher_temp_epochs * epoch_length
    )
    return TrainingSchedules(lr, last_layer_lr, wd, momentum, teacher_temp)
