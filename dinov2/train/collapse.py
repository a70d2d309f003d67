"""Collapse monitor: warns once when the DINO teacher targets stay uniform or one-hot for several log periods.

The DINO paper (Caron et al. 2021, section 5.3) tells the two collapses apart by the entropy of the teacher's
targets: near ln K every image gets the uniform distribution (centering outweighs sharpening; every DINO
cross-entropy is then at least ln K, so the loss stalls), near 0 every image gets a single prototype (sharpening
outweighs centering). Either state held for several log periods means the run is not learning from the DINO term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Fractions of ln K: above UNIFORM the targets are close to uniform (the small-batch failure measured at 0.97 ln K),
# below ONE_HOT nearly all of each target's mass sits on one prototype.
UNIFORM_FRACTION = 0.9
ONE_HOT_FRACTION = 0.05

ADVICE = {
    "uniform": (
        "centering outweighs sharpening: the teacher temperature is too high for the spread of the teacher's logits "
        "across images; lower it (small_batch.teacher_temp in the small-batch regime, small_batch.mode=always to use "
        "that regime at any batch, or teacher.teacher_temp and teacher.warmup_teacher_temp), see README 'Small "
        "batches'"
    ),
    "one_hot": (
        "sharpening outweighs centering: raise the teacher temperature (small_batch.teacher_temp in the small-batch "
        "regime, else teacher.teacher_temp), or use train.centering=sinkhorn_knopp, whose equipartition cannot put "
        "every image on one prototype"
    ),
}


@dataclass
class CollapseMonitor:
    """Feeds on ``dino_teacher_entropy`` every iteration; judges the mean of each log period.

    ``update`` returns, once per run, an event (a dict for ``training_metrics.json``) when ``patience`` consecutive
    log periods were all uniform (mean entropy >= UNIFORM_FRACTION ln K) or all one-hot (<= ONE_HOT_FRACTION ln K).
    ``patience`` 0 turns the monitor off. The state is not checkpointed: a resumed run watches afresh.
    """

    n_prototypes: int
    log_period: int
    patience: int
    warned: bool = False
    _sum: float = 0.0
    _count: int = 0
    _streak: list[float] = field(default_factory=list)
    _state: str | None = None

    @property
    def ln_k(self) -> float:
        return math.log(self.n_prototypes)

    def classify(self, entropy: float) -> str | None:
        """``"uniform"``, ``"one_hot"`` or None for a mean target entropy in nats."""
        if entropy >= UNIFORM_FRACTION * self.ln_k:
            return "uniform"
        if entropy <= ONE_HOT_FRACTION * self.ln_k:
            return "one_hot"
        return None

    def update(self, iteration: int, entropy: float) -> dict | None:
        if self.patience <= 0 or self.warned or not math.isfinite(entropy):
            return None
        self._sum += entropy
        self._count += 1
        if (iteration + 1) % self.log_period:
            return None
        mean = self._sum / self._count
        self._sum, self._count = 0.0, 0
        state = self.classify(mean)
        if state is None or state != self._state:
            self._streak = []
        self._state = state
        if state is None:
            return None
        self._streak.append(mean)
        if len(self._streak) < self.patience:
            return None
        self.warned = True
        return {
            "event": "collapse_warning",
            "kind": state,
            "ln_k": round(self.ln_k, 4),
            "period_mean_entropies": [round(h, 4) for h in self._streak],
            "fraction_of_ln_k": round(mean / self.ln_k, 4),
            "advice": ADVICE[state],
        }


def describe(event: dict, iteration: int) -> str:
    """The one warning line for the log."""
    entropies = ", ".join(f"{h:.2f}" for h in event["period_mean_entropies"])
    target = "uniform" if event["kind"] == "uniform" else "one-hot"
    return (f"DINO teacher targets {target} at iteration {iteration}: entropy {entropies} nats over the last "
            f"{len(event['period_mean_entropies'])} log periods ({event['fraction_of_ln_k']:.0%} of ln K = "
            f"{event['ln_k']:.2f}); {event['advice']}")
