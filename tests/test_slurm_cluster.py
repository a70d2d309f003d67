"""The single-node test cluster itself: idempotent start, multi-task steps, and the requeue-hold release helper."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _pids() -> tuple[str, str]:
    return Path("/run/slurmctld.pid").read_text().strip(), Path("/run/slurmd.pid").read_text().strip()


@pytest.mark.slurm
def test_cluster_up_is_idempotent(slurm_cluster) -> None:
    before = _pids()
    done = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "cluster_up.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"partition {slurm_cluster.partition}" in done.stdout
    assert _pids() == before, "a second start must leave the running daemons alone"
    states = subprocess.run(["sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%T"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert states and set(states) <= {"idle", "mixed", "allocated", "completing"}


@pytest.mark.slurm
def test_srun_two_tasks_get_distinct_ranks(slurm_cluster) -> None:
    out = subprocess.run(["srun", "-p", slurm_cluster.partition, "-n", "2", "bash", "-c",
                          "echo $SLURM_PROCID $SLURM_LOCALID $SLURM_STEP_NUM_TASKS"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert sorted(out.splitlines()) == ["0 0 2", "1 1 2"]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slurm
def test_release_requeue_hold_restarts_a_requeued_job_within_seconds(slurm_cluster, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    script = f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {runs}; [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && sleep 60; true'
    job_id = subprocess.run(["sbatch", "--parsable", "-p", slurm_cluster.partition, "-o", "/dev/null",
                             "--wrap", script], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while _lines(runs) != ["0"]:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        deadline = time.monotonic() + 20
        while not slurm_cluster.release_requeue_hold(job_id):  # Slurm needs a moment to mark the hold
            assert time.monotonic() < deadline, "the requeued job never showed Reason=BeginTime"
            time.sleep(0.2)
        released = time.monotonic()
        while _lines(runs) != ["0", "1"]:
            # Without the release the second run would start ~2 minutes after the requeue.
            assert time.monotonic() - released < 40, f"requeued job did not run again: {_lines(runs)}"
            slurm_cluster.release_requeue_hold(job_id)  # released once the hold has settled (REQUEUE_SETTLE_S)
            time.sleep(0.2)
    finally:
        subprocess.run(["scancel", job_id], check=False)
