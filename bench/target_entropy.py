"""Diagnostic: why do the DINO teacher targets go uniform? Counterfactual target entropies on a run's own logits.

Usage:
    python bench/target_entropy.py --data tux --iters 100                 # bench/learning.py, plus this table
    python bench/target_entropy.py --data tux --iters 100 small_batch.mode=never   # any bench/learning arguments

Runs ``bench/learning.py`` (same data, ViT, schedules and kNN report) and records, at every step, the teacher's DINO
logits t (2B, K), the center c in use and the teacher temperature. Every ``--every`` steps it prints, on the same
logits, the entropy of the targets each ingredient would give, as a fraction of ln K (1.0 = uniform):

- ``center``: softmax((t - c) / tau), what centering trains on (the actual targets of a centering run);
- ``no_center``: softmax(t / tau), sharpening alone;
- ``tau=0.04`` / ``tau=0.02``: centering at a fixed lower temperature;
- ``SK batch``: Sinkhorn-Knopp over the 2B rows of the step (what ``train.centering=sinkhorn_knopp`` uses);
- ``SK queue``: Sinkhorn-Knopp over the step's rows plus the last ``--queue`` rows of earlier steps (SwAV's queue);
- ``K=256``: centering over 256 of the K prototypes (a smaller head at the same logits);
and the signal that sharpening has to work with: the across-image standard deviation of t (per prototype, averaged),
divided by tau. Centering subtracts the across-image mean, so targets are uniform unless that ratio is >~ 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.loss import sinkhorn_knopp  # noqa: E402
from dinov2.loss.dino_loss import DINOLoss  # noqa: E402

# bench/learning.py is a script beside this one, not a package: loaded by path
_spec = importlib.util.spec_from_file_location("bench_learning", Path(__file__).resolve().parent / "learning.py")
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)


def entropy_fraction(probs: torch.Tensor) -> float:
    """Mean row entropy of (n, K) probabilities as a fraction of ln K."""
    h = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return float(h) / math.log(probs.shape[-1])


def record_teacher_logits(records: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Wrap DINOLoss's two target functions so that every call appends (logits, center in use, temperature)."""
    centered, sinkhorn = DINOLoss.softmax_center_teacher, DINOLoss.sinkhorn_knopp_teacher

    def centered_and_recorded(self, logits, temp):
        self.apply_center_update()
        records.append((logits.detach().float().clone(), self.center.detach().reshape(-1).clone(), temp))
        return centered(self, logits, temp)

    def sinkhorn_and_recorded(self, logits, temp, n_iterations=3):
        records.append((logits.detach().float().clone(), self.center.detach().reshape(-1).clone(), temp))
        return sinkhorn(self, logits, temp, n_iterations)

    DINOLoss.softmax_center_teacher = centered_and_recorded
    DINOLoss.sinkhorn_knopp_teacher = sinkhorn_and_recorded


def counterfactuals(records, step: int, queue: int) -> dict[str, float]:
    logits, center, temp = records[step]
    past = torch.cat([r[0] for r in records[max(0, step - queue // len(logits)) : step]] or [logits[:0]])
    past = past[-queue:]
    sk_queue = sinkhorn_knopp(torch.cat((past, logits)), temp)[len(past):]
    sub = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(0))[:256]
    return {
        "temp": temp,
        "center": entropy_fraction(torch.softmax((logits - center) / temp, -1)),
        "no_center": entropy_fraction(torch.softmax(logits / temp, -1)),
        "tau=0.04": entropy_fraction(torch.softmax((logits - center) / 0.04, -1)),
        "tau=0.02": entropy_fraction(torch.softmax((logits - center) / 0.02, -1)),
        "SK batch": entropy_fraction(sinkhorn_knopp(logits, temp)),
        "SK queue": entropy_fraction(sk_queue),
        "K=256": entropy_fraction(torch.softmax((logits[:, sub] - center[sub]) / temp, -1)),
        "std/tau": float(logits.std(dim=0).mean()) / temp,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--queue", type=int, default=2048, help="rows of earlier steps for 'SK queue'")
    args, learning_argv = parser.parse_known_args(argv)
    records: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    record_teacher_logits(records)
    learning.main(learning_argv)  # trains, evaluates and prints the kNN gain as bench/learning.py does
    n_prototypes = records[0][0].shape[1]
    print(f"\nTarget entropy as a fraction of ln K = {math.log(n_prototypes):.2f} over {len(records)} steps of "
          f"{records[0][0].shape[0]} teacher rows ({' '.join(learning_argv)})")
    steps = sorted(set(range(0, len(records), args.every)) | {len(records) - 1})
    rows = [(step, counterfactuals(records, step, args.queue)) for step in steps]
    names = list(rows[0][1])
    print(f"{'step':>5} " + " ".join(f"{n:>9}" for n in names))
    for step, row in rows:
        print(f"{step:>5} " + " ".join(f"{row[n]:>9.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
