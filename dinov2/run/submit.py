"""Submitting training to SLURM: the cluster flags of ``python -m dinov2.train`` and the job submitit runs.

Only launching lives here; the job itself is ``dinov2.run.job.run_training`` in every task of the allocation.
Resources come from ``slurm/*.yaml`` files and the flags (``dinov2.run.slurm``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dinov2.run.job import TrainRequest, run_training
from dinov2.run.slurm import ClusterConfig, load_cluster_config, submit


class TrainingJob:
    """The picklable callable submitit runs in every task: one ``run_training(request)`` per rank."""

    def __init__(self, request: TrainRequest) -> None:
        self.request = request

    def __call__(self) -> int:
        status = run_training(self.request)
        if status:
            raise RuntimeError(f"training of {self.request.output_dir} exited with status {status}")
        return status

    def checkpoint(self) -> Any:
        """submitit's fallback when its own handler catches the signal (ours was not installed yet): requeue as is.

        Training resumes from the latest checkpoint in the output directory.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.request))


# (flags, dest, type, help); every cluster flag takes one value.
CLUSTER_FLAGS: tuple[tuple[tuple[str, ...], str, type, str], ...] = (
    (("--slurm",), "slurm", str, "cluster YAML (repeatable; later files win), e.g. slurm/train_1node.yaml"),
    (("--nodes", "--nnodes"), "nodes", int, "number of nodes"),
    (("--gpus-per-node", "--ngpus", "--gpus"), "gpus_per_node", int, "GPUs per node (one task each)"),
    (("--tasks-per-node",), "tasks_per_node", int, "tasks per node for CPU jobs"),
    (("--partition",), "partition", str, "SLURM partition"),
    (("--timeout-min", "--timeout"), "timeout_min", int, "time limit in minutes"),
    (("--cpus-per-task",), "cpus_per_task", int, "CPUs per task"),
    (("--mem-gb",), "mem_gb", int, "memory per node in GB (0 = all)"),
    (("--account",), "account", str, "SLURM account"),
    (("--qos",), "qos", str, "SLURM quality of service"),
    (("--constraint",), "constraint", str, "SLURM node constraint, e.g. a GPU type"),
    (("--job-name",), "job_name", str, "job name"),
    (("--slurm-param",), "slurm_param", str, "extra sbatch option KEY=VALUE (repeatable)"),
)
REPEATABLE = ("slurm", "slurm_param")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the cluster flags; any of them set means "submit through SLURM" (see ``wants_cluster``)."""
    group = parser.add_argument_group("cluster", "submit the run to SLURM through submitit instead of running here")
    for flags, dest, kind, help_text in CLUSTER_FLAGS:
        action = "append" if dest in REPEATABLE else "store"
        group.add_argument(*flags, dest=dest, type=kind, action=action, default=None, help=help_text)


def wants_cluster(args: argparse.Namespace) -> bool:
    """Whether any cluster flag was given."""
    return any(getattr(args, dest, None) is not None for _, dest, _, _ in CLUSTER_FLAGS)


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """YAML files from ``--slurm``, then the explicit flags on top."""
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in CLUSTER_FLAGS
                 if dest not in REPEATABLE and getattr(args, dest, None) is not None}
    extra = {}
    for item in getattr(args, "slurm_param", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-param expects KEY=VALUE, got {item!r}")
        extra[key.replace("-", "_")] = value
    if extra:
        overrides["additional_parameters"] = extra
    return load_cluster_config(getattr(args, "slurm", None) or [], overrides)


def submit_training(request: TrainRequest, args: argparse.Namespace) -> int:
    """Submits ``request`` as one SLURM job with the resources the cluster flags in ``args`` name.

    Prints the job id and log paths.

    Returns:
        0 once submitted; 2 (with a one-line error on stderr) when a check fails, before anything is submitted.
    """
    try:
        cfg = cluster_config_from_args(args)
        if request.config_file and not Path(request.config_file).is_file():
            raise ValueError(f"config file not found: {request.config_file}")
        folder = Path(request.output_dir).resolve() / "slurm"
        job = submit(TrainingJob(request), (), cfg, folder)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"submitted SLURM job {job.job_id}: {cfg.nodes} node(s) x {cfg.ntasks_per_node} task(s), "
          f"partition {cfg.partition or '(default)'}")
    print(f"logs: {job.paths.stdout} and {job.paths.stderr} (task 0; other tasks next to them)")
    return 0
