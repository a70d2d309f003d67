"""Atomic checkpoints: commit markers, retention, RNG capture, non-finite refusal, weights_only loading."""

import random

import numpy as np
import pytest
import torch

from dinov2.train.checkpoint import (
    capture_rng_state,
    list_valid_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "optimizer": {}, "iteration": int(value)}


def test_retention_keeps_newest_and_ignores_uncommitted(tmp_path):
    for it in range(5):
        save_checkpoint(tmp_path, it, _state(it), max_to_keep=2)
    assert [it for it, _ in list_valid_checkpoints(tmp_path)] == [3, 4]
    # A save killed before its marker: newer directory, no COMMITTED -> never loaded.
    torn = tmp_path / "checkpoints" / "iter_0000009"
    torn.mkdir()
    (torn / "state.pth").write_bytes(b"garbage")
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded["iteration"] == 4 and torch.equal(loaded["model"]["w"], torch.full((3,), 4.0))


def test_refuses_non_finite_weights(tmp_path):
    state = _state(1.0)
    state["model"]["w"][0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        save_checkpoint(tmp_path, 1, state, max_to_keep=1)
    assert list_valid_checkpoints(tmp_path) == []


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path, 0, {"model": {}, "optimizer": {}, "rng": capture_rng_state()}, max_to_keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_latest_checkpoint(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_no_checkpoint_returns_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
