"""Training metrics: smoothed meters, one console line and one JSON line per log period, FLOPs per image."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import deque
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.io.atomic import write_atomic

logger = logging.getLogger("dinov2")


class SmoothedValue:
    """Median over a window and average over the whole run."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.values.append(value)
        self.total += value
        self.count += 1

    @property
    def median(self) -> float:
        ordered = sorted(self.values)
        return ordered[len(ordered) // 2] if ordered else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Collects per-iteration values and writes a line (console + ``training_metrics.json``) every ``period`` steps.

    Only the main process should create one with ``enabled=True``; the others get a silent instance. With
    ``progress`` (default: when stderr is a terminal) a tqdm bar on stderr advances every iteration and the console
    lines are printed above it.
    """

    def __init__(self, output_dir: Path, period: int, max_iter: int, enabled: bool, tensorboard: bool = False,
                 progress: bool | None = None):
        self.progress = enabled and (sys.stderr.isatty() if progress is None else progress)
        self.bar = None
        self._redirect = contextlib.ExitStack()
        self.period = period
        self.max_iter = max_iter
        self.enabled = enabled
        self.meters: dict[str, SmoothedValue] = {}
        self.json_path = Path(output_dir) / "training_metrics.json"
        self.start_time = time.perf_counter()
        self.start_iter: int | None = None
        self.writer = None
        if enabled and tensorboard:
            try:  # optional dependency, imported only when asked
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "train.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]'"
                ) from None

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def update(self, iteration: int, values: dict[str, float]) -> None:
        if self.start_iter is None:
            self.start_iter = iteration
            self.start_time = time.perf_counter()
            if self.enabled:
                drop_records_from(self.json_path, iteration)  # a resume redoes the iterations since its checkpoint
            if self.progress:
                self.bar = tqdm(total=self.max_iter, initial=iteration, unit="it", dynamic_ncols=True, file=sys.stderr)
                self._redirect.enter_context(logging_redirect_tqdm(loggers=[logger]))  # log lines above the bar
        if self.bar is not None:
            self.bar.update(1)
            if "total_loss" in values:
                self.bar.set_postfix(loss=f"{float(values['total_loss']):.4g}", refresh=False)
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue()).update(float(value))
        last = iteration == self.max_iter - 1
        if self.enabled and ((iteration + 1) % self.period == 0 or last):
            self._emit(iteration, values)

    def _emit(self, iteration: int, latest: dict[str, float]) -> None:
        done = iteration + 1 - (self.start_iter or 0)
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.max_iter - iteration - 1)
        # JSON holds this iteration's exact values (comparable across resumes); the console shows window medians.
        record = {"iteration": iteration, **latest, "eta_s": round(eta, 1)}
        with self.json_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, meter in self.meters.items():
                self.writer.add_scalar(name, meter.median, iteration)
        shown = "  ".join(f"{k}: {m.median:.4g}" for k, m in self.meters.items())
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta))
        logger.info("it %d/%d  eta %s  %s", iteration + 1, self.max_iter, eta_text, shown)

    def event(self, iteration: int, record: dict) -> None:
        """An extra JSON line ``{"iteration": it, **record}`` (e.g. a collapse warning) in training_metrics.json."""
        if self.enabled:
            with self.json_path.open("a") as f:
                f.write(json.dumps({"iteration": iteration, **record}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()


def drop_records_from(path: Path, first_iteration: int) -> int:
    """Rewrite the JSON-lines file at ``path`` without records of ``first_iteration`` or later (atomically: a kill
    leaves the old or the new file). A torn last line (a kill mid-write) goes too. Returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["iteration"]) < first_iteration
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return dropped


def setup_logging(output_dir: Path, is_main: bool, rank: int) -> None:
    """Console on the main process, a log file per rank; no print monkey-patching."""
    log = logging.getLogger("dinov2")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_dir / ("log.txt" if rank == 0 else f"log.txt.rank{rank}"))
    file_handler.setFormatter(fmt)
    log.addHandler(file_handler)
    if is_main:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(fmt)
        log.addHandler(stream)


def _sdpa_flop_handle(inputs, outputs) -> int:
    # fvcore counts one multiply-add as one flop: QK^T and (softmax)V are each B*H*Nq*Nk*d multiply-adds.
    q_shape = inputs[0].type().sizes()
    k_shape = inputs[1].type().sizes()
    batch_heads = 1
    for size in q_shape[:-2]:
        batch_heads *= size
    n_q, d = q_shape[-2], q_shape[-1]
    n_k = k_shape[-2]
    return 2 * batch_heads * n_q * n_k * d


# What the matmul peak measures and the profiler's FLOP counts cover: fvcore's names for linear layers,
# convolutions, matrix products and attention. Its layer-norm and upsampling estimates are not matmul work.
MATMUL_OPERATORS = frozenset({"linear", "conv", "matmul", "bmm", "mm", "addmm", "einsum",
                              "scaled_dot_product_attention"})


def count_forward_flops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """Forward matmul FLOPs (2 x multiply-adds) of ``module(*inputs)`` counted by fvcore, attention included."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return 2.0 * float(sum(n for op, n in analysis.by_operator().items() if op in MATMUL_OPERATORS))


def count_backbone_flops(backbone: nn.Module, size: int, device: torch.device) -> tuple[float, float]:
    """(forward, forward + backward) matmul FLOPs of one ``size`` px crop through a ViT backbone: the backward
    costs twice the forward (input and weight gradients) except in the patch embedding, whose input, the pixels,
    needs no gradient."""
    crop = torch.zeros(1, 3, size, size, device=device)
    forward = count_forward_flops(backbone, crop)
    return forward, 3 * forward - count_forward_flops(backbone.patch_embed, crop)
