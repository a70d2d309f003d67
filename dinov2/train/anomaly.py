"""Training anomalies: loss spikes and non-finite steps, recorded with the keys of the images that caused them.

A spike is a step whose total loss exceeds the median of the previous ``window`` steps by more than ``threshold``
robust standard deviations (1.4826 · median absolute deviation, floored at 1e-3 · |median| so that a flat loss does
not flag rounding noise). Each rank checks its own loss and writes its own records, so the keys point at the images
of that rank's batch. Spikes are only logged, never acted on: the detector's window is not checkpointed, and a
resumed run starts with an empty one, which cannot change training.

Records are JSON lines in ``<output_dir>/logs/anomalies.jsonl`` (rank 0) or ``anomalies.jsonl.rank<r>``::

    {"iteration": 1234, "kind": "spike" | "nonfinite", "total_loss": ..., "terms": {...}, "sample_keys": [...]}
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from statistics import median


class LossSpikeDetector:
    """Flags a loss far above the recent median; ``threshold <= 0`` disables it.

    Args:
        window: number of previous finite losses the median and deviation are taken over.
        threshold: robust standard deviations above the median that count as a spike.
    """

    def __init__(self, window: int = 100, threshold: float = 8.0) -> None:
        if window < 4:
            raise ValueError(f"the spike window must hold at least 4 losses, got {window}")
        self.threshold = threshold
        self.history: deque[float] = deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` is a spike against the history; finite losses then join the history."""
        if self.threshold <= 0 or not math.isfinite(loss):
            return False
        spike = False
        if len(self.history) >= self.history.maxlen // 2:
            center = median(self.history)
            spread = 1.4826 * median(abs(x - center) for x in self.history)
            spread = max(spread, 1e-3 * abs(center), 1e-12)
            spike = loss > center + self.threshold * spread
        self.history.append(loss)
        return spike


class AnomalyLog:
    """Appends anomaly records of one rank to its JSON-lines file (created on the first record)."""

    def __init__(self, output_dir: Path, rank: int) -> None:
        name = "anomalies.jsonl" if rank == 0 else f"anomalies.jsonl.rank{rank}"
        self.path = Path(output_dir) / "logs" / name

    def record(self, iteration: int, kind: str, terms: dict[str, float], sample_keys: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "iteration": iteration,
            "kind": kind,
            "total_loss": terms.get("total_loss"),
            "terms": {k: v for k, v in terms.items() if k != "total_loss"},
            "sample_keys": list(sample_keys),
        }
        with self.path.open("a") as f:  # non-finite floats are written as NaN/Infinity, which json.loads reads
            f.write(json.dumps(entry) + "\n")
