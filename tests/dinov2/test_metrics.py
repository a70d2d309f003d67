"""MetricLogger: JSON lines always, TensorBoard scalars when asked."""

from __future__ import annotations

import json

import pytest

from dinov2.metrics import MetricLogger


def test_json_lines_hold_exact_values_per_log_period(tmp_path):
    log = MetricLogger(tmp_path, period=2, max_iter=5, enabled=True)
    for it in range(5):
        log.update(it, {"total_loss": float(it), "lr": 0.1})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "training_metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 3, 4]  # every 2nd iteration and the last
    assert [r["total_loss"] for r in records] == [1.0, 3.0, 4.0]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricLogger(tmp_path, period=1, max_iter=3, enabled=True, tensorboard=True)
    for it in range(3):
        log.update(it, {"total_loss": 10.0 - it})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("total_loss")]
    assert [s for s, _ in steps] == [0, 1, 2]
    assert steps[0][1] == 10.0  # median of the window so far
