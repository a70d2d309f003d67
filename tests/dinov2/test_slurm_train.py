"""Training through the real CLI on the single-node SLURM cluster: ``python -m dinov2.train ... --tasks-per-node 2``.

A 2-task CPU (gloo) run of a tiny ViT is preempted with USR2, saves, is requeued (the harness lifts Slurm's ~2 min
requeue hold) and resumes at the next iteration with the per-iteration losses of an uninterrupted run; a real time
limit requeues and resumes the same way; a bad partition or a missing config fails before anything is submitted.
Only CLI behaviour is relied on: the exit status and printed job id, ``training_metrics.json`` and ``logs/log.txt``.
(``test_slurm_submit.py`` covers the submission pieces with toy jobs.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm
N_ITER = 12


@pytest.fixture(scope="module")
def tiny_overrides(tiny_train):
    """``tiny_overrides(data, max_iter)``: the shared tiny run at batch 2 per task, no periodic checkpoint or export
    (the output dir comes from ``--output-dir``)."""
    return lambda data, max_iter: tiny_train(data, max_iter, None, "train.batch_size_per_gpu=2", "optim.epochs=2",
                                             "train.checkpoint_period=1000", "evaluation.eval_period_iterations=100000")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinov2.train", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=180)


def submit(out: Path, overrides: list[str], partition: str, *cluster_flags: str) -> str:
    """Submits a 2-task CPU job through the CLI; returns its job id."""
    done = cli("--output-dir", str(out), *overrides, "--partition", partition, "--nodes", "1", "--tasks-per-node", "2",
               "--cpus-per-task", "1", *cluster_flags)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted SLURM job (\d+)", done.stdout).group(1)


def job_field(job_id: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", shown)
    return match.group(1) if match else ""


def wait_until(condition, cluster, job_id: str, timeout_s: float, what: str, out: Path) -> None:
    """Polls ``condition`` while lifting requeue holds on ``job_id``; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            log = log_text(out)
            pytest.fail(f"{what} not reached within {timeout_s} s (job {job_id}: {job_field(job_id, 'JobState')})\n"
                        f"{log[-3000:]}")
        cluster.release_requeue_hold(job_id)
        time.sleep(0.5)


def finished(job_id: str) -> bool:
    return job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "")


def metric_lines(out: Path) -> list[dict]:
    path = out / "training_metrics.json"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if "event" not in line]  # per-iteration lines, not e.g. a collapse warning


def log_text(out: Path) -> str:
    path = out / "logs" / "log.txt"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def images(noise_images) -> Path:
    return noise_images(16, 40, 48)


@pytest.fixture(scope="module")
def reference_losses(slurm_cluster, images, tmp_path_factory, tiny_overrides) -> list[float]:
    """Per-iteration total loss of an uninterrupted 2-task run."""
    out = tmp_path_factory.mktemp("reference")
    job_id = submit(out, tiny_overrides(images, N_ITER), slurm_cluster.partition, "--timeout-min", "10")
    wait_until(lambda: finished(job_id), slurm_cluster, job_id, 300, "the reference run's end", out)
    lines = metric_lines(out)
    assert job_field(job_id, "JobState") == "COMPLETED", log_text(out)[-3000:]
    assert [line["iteration"] for line in lines] == list(range(N_ITER))
    return [line["total_loss"] for line in lines]


def test_preempted_run_saves_requeues_and_resumes_with_identical_losses(slurm_cluster, images, reference_losses,
                                                                        tmp_path, tiny_overrides):
    out = tmp_path / "run"
    job_id = submit(out, tiny_overrides(images, N_ITER), slurm_cluster.partition, "--timeout-min", "10")
    wait_until(lambda: len(metric_lines(out)) >= 3, slurm_cluster, job_id, 240, "iteration 2", out)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: finished(job_id), slurm_cluster, job_id, 300, "the preempted run's end", out)
    log = log_text(out)
    assert job_field(job_id, "JobState") == "COMPLETED", log[-3000:]
    assert job_field(job_id, "Restarts") == "1"
    saved = int(re.search(r"preemption requested: saved at iteration (\d+)", log).group(1))
    assert 2 <= saved < N_ITER - 1
    assert (out / "checkpoints" / f"iter_{saved:07d}" / "COMMITTED").is_file()
    assert "resuming from" in log
    lines = metric_lines(out)
    # Every iteration logged exactly once: the requeued run started at saved + 1 (the JSON was flushed at the stop).
    assert [line["iteration"] for line in lines] == list(range(N_ITER))
    assert [line["total_loss"] for line in lines] == reference_losses


@pytest.mark.slow
def test_time_limit_requeues_and_resumes(slurm_cluster, images, tmp_path, tiny_overrides):
    out = tmp_path / "run"
    limits = tmp_path / "short.yaml"
    # Slurm sends its USR2 when at most signal_delay_s remain, checked about every 30-60 s: with 2 min and 30 s it
    # comes 30-90 s into each run, after start-up (a 1 min limit signals during start-up, which submitit's fallback
    # handler turns into requeues without a checkpoint, over and over).
    limits.write_text("timeout_min: 2\nsignal_delay_s: 30\n")
    job_id = submit(out, tiny_overrides(images, 100_000), slurm_cluster.partition, "--slurm", str(limits))
    try:
        wait_until(lambda: "resuming from" in log_text(out), slurm_cluster, job_id, 420, "a resume after the limit",
                   out)
        saved = int(re.search(r"preemption requested: saved at iteration (\d+)", log_text(out)).group(1))
        wait_until(lambda: any(line["iteration"] == saved + 1 for line in metric_lines(out)), slurm_cluster, job_id,
                   120, "the first iteration after the resume", out)
        assert int(job_field(job_id, "Restarts") or 0) >= 1
        iterations = [line["iteration"] for line in metric_lines(out)]
        assert iterations == list(range(len(iterations)))  # continued at saved + 1, nothing repeated or lost
    finally:
        subprocess.run(["scancel", job_id], check=False)


def _jobs_writing_under(folder: Path) -> list[str]:
    """Queued or running jobs whose log goes under ``folder`` (other test sessions may share the cluster)."""
    ids = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    return [job_id for job_id in ids if str(folder) in job_field(job_id, "StdOut")]


def test_bad_partition_or_missing_config_fails_before_submitting(slurm_cluster, images, tmp_path, tiny_overrides):
    out = tmp_path / "run"
    bad_partition = cli("--output-dir", str(out), *tiny_overrides(images, 2), "--partition", "no-such-partition",
                        "--tasks-per-node", "2")
    assert bad_partition.returncode == 2
    assert "no-such-partition" in bad_partition.stderr and "Traceback" not in bad_partition.stderr
    assert len(bad_partition.stderr.strip().splitlines()) == 1
    missing = cli("--config-file", str(tmp_path / "nope.yaml"), "--output-dir", str(out),
                  "--partition", slurm_cluster.partition, "--tasks-per-node", "2")
    assert missing.returncode == 2
    assert "config file not found" in missing.stderr and "Traceback" not in missing.stderr
    bad_key = cli("--output-dir", str(out), "train.no_such_key=1", "--partition", slurm_cluster.partition)
    assert bad_key.returncode == 2 and "train.no_such_key" in bad_key.stderr
    assert not (out / "slurm").exists() and not _jobs_writing_under(out)  # nothing of this run in the queue
