"""``train.autocast_dtype``: explicit values pass through; ``auto`` is bf16 on CUDA and on native-bf16 CPUs."""

from __future__ import annotations

import logging

import pytest
import torch

from dinov2.config import ConfigError, load_config
from dinov2.train import precision
from dinov2.train.precision import cpu_bf16_speedup, resolve_autocast_dtype


def test_auto_is_the_default_and_explicit_values_pass_through():
    assert load_config().train.autocast_dtype == "auto"
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        assert resolve_autocast_dtype(name, torch.device("cpu")) == dtype
    with pytest.raises(ConfigError, match="train.autocast_dtype"):
        load_config(overrides=["train.autocast_dtype=bf32"])


def test_auto_on_cuda_is_bf16_without_measuring(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("CUDA must not time the CPU"))
    with caplog.at_level(logging.INFO, logger="dinov2"):
        assert resolve_autocast_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert "auto -> bf16 (CUDA)" in caplog.text


@pytest.mark.parametrize(("speedup", "expected"), [(30.0, torch.bfloat16), (1.0, torch.bfloat16),
                                                   (0.85, torch.bfloat16), (0.5, torch.float32),
                                                   (1 / 30, torch.float32)])  # fmt: skip
def test_auto_on_cpu_follows_the_measured_speed(monkeypatch, caplog, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    propagate = logging.getLogger("dinov2").propagate
    logging.getLogger("dinov2").propagate = True  # setup_logging in other tests turns it off
    try:
        with caplog.at_level(logging.INFO, logger="dinov2"):
            assert resolve_autocast_dtype("auto", torch.device("cpu")) == expected
    finally:
        logging.getLogger("dinov2").propagate = propagate
    name = "bf16" if expected == torch.bfloat16 else "fp32"
    assert f"auto -> {name} (CPU: bf16 matmul" in caplog.text  # the choice and its reason are logged


def test_measurement_is_real_and_cached_per_process():
    cpu_bf16_speedup.cache_clear()
    first = cpu_bf16_speedup()
    assert first > 0
    assert cpu_bf16_speedup() == first and cpu_bf16_speedup.cache_info().hits >= 1
    flags = precision.cpu_bf16_flags()
    assert set(flags) <= {"amx_bf16", "avx512_bf16"}


def test_bf16_is_native_threshold():
    from dinov2.train.precision import bf16_is_native

    assert bf16_is_native(1.0) and bf16_is_native(6.2) and bf16_is_native(0.85)
    assert not bf16_is_native(1 / 30) and not bf16_is_native(0.5)
