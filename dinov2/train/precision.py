"""The autocast dtype of a run: ``train.autocast_dtype`` as given, or ``auto`` resolved for the device at hand.

``auto`` is bf16 on CUDA and on CPUs that multiply bf16 natively (AMX or AVX512-BF16), else fp32: on a CPU without
them bf16 matmuls are emulated and run about 30x slower than fp32. The CPU answer is measured (a small bf16 against an
fp32 matmul), because the flags say what the silicon has, not what this torch build uses; it is measured once per
process.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger("dinov2")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# bf16 counts as native when it is at most this much slower than fp32 (timing noise on a shared machine); emulated
# bf16 is an order of magnitude slower, native bf16 faster.
_NATIVE_SLOWDOWN = 1.25
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 matmul flags this CPU reports in /proc/cpuinfo (empty where there is no such file)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        return []
    return [flag for flag in _BF16_FLAGS if flag in words]


def _fastest_seconds(pairs: list[tuple[torch.Tensor, torch.Tensor]], repeats: int = 5) -> list[float]:
    """Fastest time of ``a @ b`` for each pair, the pairs taking turns, so other jobs on a shared machine slow
    them alike and the fastest repetition (the least disturbed one) is compared."""
    for a, b in pairs:
        a @ b  # warm-up: kernel selection and first-touch allocation
    best = [float("inf")] * len(pairs)
    for _ in range(repeats):
        for i, (a, b) in enumerate(pairs):
            start = time.perf_counter()
            a @ b
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(side: int = 1024) -> float:
    """fp32 time / bf16 time of a ``side``-square matmul on this CPU (> 1: bf16 is faster). Cached per process.

    1024, not smaller: on an AVX-512 CPU without AMX a 256-square bf16 matmul still runs near fp32 speed (measured
    1.2x on the development machine, which then chose bf16), while at the model's sizes it is 3-30x slower.
    """
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(side, side, generator=gen), torch.randn(side, side, generator=gen)
    fp32, bf16 = _fastest_seconds([(a, b), (a.bfloat16(), b.bfloat16())])
    return fp32 / max(bf16, 1e-9)


def bf16_is_native(speedup: float) -> bool:
    """Whether a measured bf16 / fp32 matmul speed ratio means native bf16 (emulated bf16 is ~30x slower)."""
    return speedup >= 1 / _NATIVE_SLOWDOWN


def resolve_autocast_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``train.autocast_dtype`` on ``device``; ``auto`` is decided here and logged.

    Raises:
        ValueError: for a setting other than auto, bf16, fp16 or fp32.
    """
    if setting != "auto":
        if setting not in AUTOCAST_DTYPES:
            raise ValueError(f"train.autocast_dtype: {setting!r} is not one of auto, {', '.join(AUTOCAST_DTYPES)}")
        return AUTOCAST_DTYPES[setting]
    if device.type == "cuda":
        logger.info("train.autocast_dtype auto -> bf16 (CUDA)")
        return torch.bfloat16
    speedup = cpu_bf16_speedup()
    native = bf16_is_native(speedup)
    flags = ", ".join(cpu_bf16_flags()) or "none"
    logger.info("train.autocast_dtype auto -> %s (CPU: bf16 matmul %.2gx the speed of fp32; bf16 flags: %s)",
                "bf16" if native else "fp32", speedup, flags)
    return torch.bfloat16 if native else torch.float32
