"""MetricLogger: JSON lines always, TensorBoard scalars when asked."""

from __future__ import annotations

import json

import pytest

from dinov2.train.metrics import MetricLogger


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


def test_progress_bar_on_request_and_log_lines_still_written(tmp_path, capsys):
    from dinov2.train.metrics import setup_logging

    setup_logging(tmp_path, is_main=True, rank=0)
    log = MetricLogger(tmp_path, period=2, max_iter=6, enabled=True, progress=True)
    for it in range(2, 6):  # a resumed run: the bar starts at its first iteration
        log.update(it, {"total_loss": 0.5})
    log.close()
    captured = capsys.readouterr()
    assert "6/6" in captured.err and "loss=0.5" in captured.err
    assert "it 4/6" in (tmp_path / "logs" / "log.txt").read_text()
    assert "it 6/6" in captured.out + captured.err  # console lines printed through the bar, not lost


def test_no_progress_bar_when_not_interactive(tmp_path, capsys):
    log = MetricLogger(tmp_path, period=1, max_iter=2, enabled=True)  # pytest's stderr is not a terminal
    log.update(0, {"total_loss": 1.0})
    log.close()
    assert log.progress is False and "it/s" not in capsys.readouterr().err
