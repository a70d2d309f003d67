"""Schedules as pure functions of the iteration, equal to the official CosineScheduler arrays."""

import numpy as np
import pytest

from dinov2.config import load_config, scaled_lr
from dinov2.train.schedules import CosineSchedule, build_schedules


def official_cosine_array(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """The official ``CosineScheduler`` construction (``dinov2/utils/utils.py``), written out here on its own."""
    frozen = np.zeros(freeze)
    warm = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((frozen, warm, cosine))


@pytest.mark.parametrize("warmup, freeze", [(0, 0), (100, 0), (100, 50), (1, 0)])
def test_cosine_schedule_equals_official_array(warmup, freeze):
    reference = official_cosine_array(0.005, 1e-6, 1000, warmup, 0.0, freeze)
    schedule = CosineSchedule(0.005, 1e-6, 1000, warmup, 0.0, freeze)
    ours = np.array([schedule(i) for i in range(1000)])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-15)
    assert schedule(1000) == 1e-6 and schedule(10**6) == 1e-6


def test_default_schedules_at_known_iterations():
    cfg = load_config()
    peak_lr = scaled_lr(cfg.optim, total_batch=64 * 16)  # 1024 images: lr = base_lr
    s = build_schedules(cfg.optim, cfg.teacher, cfg.train.OFFICIAL_EPOCH_LENGTH, peak_lr)
    assert s.lr(0) == 0.0
    assert s.lr(12499) == pytest.approx(0.004)  # last warm-up point is the peak
    assert s.lr(12500) == pytest.approx(0.004)  # first cosine point is the peak too
    assert s.lr(125000) == pytest.approx(1e-6)
    assert s.last_layer_lr(1249) == 0.0  # frozen for one epoch ...
    # ... then the lr schedule itself, mid warm-up (the official overwrites the first epoch with 0, it does not shift)
    assert s.last_layer_lr(1250) == s.lr(1250) == pytest.approx(0.004 * 1250 / 12499)
    assert all(s.last_layer_lr(i) == s.lr(i) for i in (5000, 12500, 60000, 125000))
    assert s.teacher_temp(0) == 0.04
    assert s.teacher_temp(18750) == pytest.approx(0.0550, abs=1e-4)
    assert s.teacher_temp(37500) == 0.07 and s.teacher_temp(100000) == 0.07
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(125000) == 1.0
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(124999) == pytest.approx(0.4, abs=1e-6)
