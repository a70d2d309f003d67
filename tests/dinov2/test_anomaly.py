"""Loss-spike detection: robust to noise, quiet while the window fills, blind to non-finite values."""

import pytest

from dinov2.train.anomaly import LossSpikeDetector


def test_spike_against_noisy_history():
    detector = LossSpikeDetector(window=8, threshold=8.0)
    noisy = [10.0, 10.2, 9.9, 10.1, 9.8, 10.3, 10.0, 9.9]
    assert not any(detector.is_spike(x) for x in noisy)
    assert not detector.is_spike(11.0)  # about 5 robust std devs: noise
    assert detector.is_spike(14.0)
    assert not detector.is_spike(9.0)  # drops are never spikes


def test_quiet_until_half_the_window_is_filled():
    detector = LossSpikeDetector(window=10, threshold=3.0)
    assert [detector.is_spike(x) for x in (1.0, 1.0, 1.0, 1.0, 50.0)] == [False] * 5
    assert detector.is_spike(500.0)


def test_flat_loss_does_not_flag_rounding_noise():
    detector = LossSpikeDetector(window=6, threshold=8.0)
    for _ in range(6):
        detector.is_spike(5.0)
    assert not detector.is_spike(5.0 + 1e-6)
    assert detector.is_spike(5.5)


def test_disabled_and_non_finite():
    off = LossSpikeDetector(window=4, threshold=0.0)
    assert not any(off.is_spike(x) for x in (1.0, 1.0, 1.0, 1.0, 1e9))
    on = LossSpikeDetector(window=4, threshold=8.0)
    for x in (1.0, 1.1, 0.9, 1.0):
        on.is_spike(x)
    assert not on.is_spike(float("nan")) and not on.is_spike(float("inf"))
    assert len(on.history) == 4 and max(on.history) == 1.1  # non-finite values never enter the window
    with pytest.raises(ValueError, match="at least 4"):
        LossSpikeDetector(window=3)
