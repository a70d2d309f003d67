"""Shared test set-up: the single-node SLURM cluster fixture, the ``gpu`` marker's skip, and the tiny training run.

The cluster is started by ``slurm/cluster_up.sh`` (root and apt needed) once per session and left running at the
end: starting it again is a no-op, and stopping it would only cost the next session ~6 s.
Set ``REQUIRE_SLURM=1`` (CI as root does) to turn "no cluster" from a skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_UP = REPO_ROOT / "slurm" / "cluster_up.sh"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


# seconds a requeued job's hold is seen before the tests release it (see SlurmCluster.release_requeue_hold)
REQUEUE_SETTLE_S = 2.0


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its partition and a fresh folder for this session's submitit logs.

    The log folder is new per session because Slurm reuses job ids after its state is wiped, and submitit would
    then find an old job's result in a reused ``<folder>/<job id>/``.
    """

    partition: str
    log_root: Path
    _held_since: dict = field(default_factory=dict, compare=False, repr=False)

    def release_requeue_hold(self, job_id: str) -> bool:
        """Lets a requeued job start soon instead of after Slurm's ~2 min hold. Returns whether it was held.

        Not at once: slurmd rejects a job credential created in the same second as its revocation at the requeue
        ("Killing non-startable batch job: Job credential revoked", and the job ends FAILED), so the hold is
        released once it has been seen for REQUEUE_SETTLE_S.
        """
        shown = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True).stdout
        if "Reason=BeginTime" not in shown:
            self._held_since.pop(job_id, None)
            return False
        seen = self._held_since.setdefault(job_id, time.monotonic())
        if time.monotonic() - seen >= REQUEUE_SETTLE_S:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                           check=False)
        return True

    def wait(self, job, timeout_s: float = 60.0) -> None:
        """Waits until ``job`` is done, releasing requeue holds on the way; fails the test on timeout."""
        deadline = time.monotonic() + timeout_s
        while not job.done():
            if time.monotonic() > deadline:
                state = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True,
                                       text=True).stdout
                pytest.fail(f"SLURM job {job.job_id} not done after {timeout_s} s:\n{state}")
            self.release_requeue_hold(job.job_id)
            time.sleep(0.3)


def _start_cluster() -> str:
    """Runs the start script; returns why there is no cluster, or "" when it is up."""
    if os.geteuid() != 0:
        return "the SLURM cluster needs root"
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available"
    try:
        done = subprocess.run(["bash", str(CLUSTER_UP)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"{CLUSTER_UP} did not finish within 300 s"
    if done.returncode != 0:
        return f"{CLUSTER_UP} failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return ""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> SlurmCluster:
    """The single-node cluster, started on first use; skips (or fails under ``REQUIRE_SLURM=1``) without one."""
    reason = _start_cluster()
    if reason:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but no SLURM cluster: {reason}")
        pytest.skip(reason)
    return SlurmCluster(partition=os.environ.get("SLURM_PARTITION", "debug"),
                        log_root=tmp_path_factory.mktemp("slurm_logs"))


def tiny_train_overrides(data: Path, max_iter: int, out: Path | None = None, *extra: str) -> list[str]:
    """Config overrides of a tiny, deterministic CPU training run on the images at ``data``: a 2-block 32-wide ViT
    (patch 8, 32/16 px crops, 2 local crops), 64 prototypes, batch 4, 10-iteration epochs, fp32, a metrics line every
    iteration and a checkpoint every 5. ``extra`` overrides come last, so they win."""
    return [
        f"train.dataset_path={data}", *([f"train.output_dir={out}"] if out is not None else []),
        "student.arch=vit_custom", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
        "student.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
        "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=64", "train.batch_size_per_gpu=4", "train.num_workers=0", f"train.max_iter={max_iter}",
        "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
        "teacher.warmup_teacher_temp_epochs=1", "train.device=cpu", "train.log_period=1", "train.checkpoint_period=5",
        "train.autocast_dtype=fp32", "train.deterministic=true", *extra,
    ]


@pytest.fixture(scope="session")
def tiny_train() -> Callable[..., list[str]]:
    """:func:`tiny_train_overrides`: ``tiny_train(data, max_iter, out=None, *extra)``."""
    return tiny_train_overrides
