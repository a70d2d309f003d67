"""Cluster launch: ``slurm/*.yaml`` and CLI flags -> ``submitit.AutoExecutor``; one task per GPU; a requeueable job.

Only launching lives here; the job itself is ``python -m dinov2.train`` run in the allocation. Site facts
(partition, account, ...) come from YAML files such as ``slurm/cluster.yaml`` and ``slurm/train_1node.yaml``
(later files and then CLI flags win); see ``slurm/README.md`` for how each key maps onto sbatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MAX_REQUEUES = 30  # the official launcher's slurm_max_num_timeout


@dataclass
class ClusterConfig:
    """One SLURM job's resources. ``None`` leaves the choice to the cluster's defaults.

    Attributes:
        partition: ``--partition``; None = the cluster's default partition.
        nodes: ``--nodes``.
        gpus_per_node: GPUs per node; one task is started per GPU. 0 for CPU jobs.
        tasks_per_node: tasks per node for CPU jobs (must equal ``gpus_per_node`` when that is set); default 1.
        cpus_per_task, mem_gb: per task / per node resources (``mem_gb=0`` asks for all of a node's memory).
        timeout_min: wall-time limit in minutes.
        account, qos, constraint: passed through to sbatch.
        signal_delay_s: Slurm sends the preemption signal (USR2) this long before the time limit; must cover one
            iteration plus a checkpoint save.
        max_requeues: timeouts submitit's fallback handler may requeue (``slurm_max_num_timeout``).
        job_name: the job's name in ``squeue``.
        additional_parameters: any other sbatch option, e.g. ``{"exclude": "node7"}``.
    """

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120
    max_requeues: int = DEFAULT_MAX_REQUEUES
    job_name: str = "dinov2"
    additional_parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nodes", "timeout_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster {name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"cluster {name} must be >= 0, got {getattr(self, name)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"cluster tasks_per_node must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"one task per GPU: tasks_per_node={self.tasks_per_node} contradicts "
                             f"gpus_per_node={self.gpus_per_node}")

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU; CPU jobs take ``tasks_per_node`` (default 1)."""
        return self.gpus_per_node or self.tasks_per_node or 1


CLUSTER_KEYS = frozenset(f.name for f in dataclasses.fields(ClusterConfig))


def load_cluster_config(paths: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """Merges YAML files in order, then ``overrides``, into a validated ``ClusterConfig``.

    Raises:
        ValueError: a missing file, a file that is not a mapping, an unknown key or an invalid value.
    """
    values: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cluster config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of cluster settings, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - CLUSTER_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown cluster keys {unknown}; known: {sorted(CLUSTER_KEYS)}")
        extra = {**values.get("additional_parameters", {}), **(loaded.pop("additional_parameters", None) or {})}
        # `key: null` in a file means "unset": the cluster's (or this class's) default.
        values.update({key: value for key, value in loaded.items() if value is not None}, additional_parameters=extra)
    overrides = dict(overrides or {})
    extra = {**values.get("additional_parameters", {}), **(overrides.pop("additional_parameters", None) or {})}
    values.update(overrides, additional_parameters=extra)
    try:
        return ClusterConfig(**values)
    except TypeError as error:  # a wrong type compared against an int
        raise ValueError(f"invalid cluster settings {values}: {error}") from None


def executor_parameters(cfg: ClusterConfig) -> dict[str, Any]:
    """The ``AutoExecutor.update_parameters`` keywords for ``cfg`` (unset options are left out)."""
    params: dict[str, Any] = {
        "name": cfg.job_name,
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.ntasks_per_node,
        "timeout_min": cfg.timeout_min,
        "slurm_signal_delay_s": cfg.signal_delay_s,
    }
    optional = {
        "gpus_per_node": cfg.gpus_per_node or None,
        "cpus_per_task": cfg.cpus_per_task,
        "mem_gb": cfg.mem_gb,
        "slurm_partition": cfg.partition,
        "slurm_account": cfg.account,
        "slurm_qos": cfg.qos,
        "slurm_constraint": cfg.constraint,
        "slurm_additional_parameters": cfg.additional_parameters or None,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def check_partition(partition: str | None) -> None:
    """Checks that SLURM answers and, if given, that ``partition`` exists.

    Raises:
        ValueError: ``sinfo`` is missing or fails, or the partition does not exist (the message lists the existing).
    """
    def sinfo(*args: str) -> str:
        try:
            done = subprocess.run(["sinfo", "-h", "-o", "%P", *args], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise ValueError("SLURM is not available here: 'sinfo' was not found on PATH") from None
        except subprocess.TimeoutExpired:
            raise ValueError("SLURM does not answer: 'sinfo' timed out after 60 s") from None
        if done.returncode != 0:
            raise ValueError(f"'sinfo' failed: {done.stderr.strip()}")
        return done.stdout

    if partition is None:
        sinfo()
    elif not sinfo("-p", partition).strip():
        available = ", ".join(p.rstrip("*") for p in sinfo().split())
        raise ValueError(f"SLURM partition {partition!r} does not exist (available: {available or 'none'})")


def build_executor(cfg: ClusterConfig, folder: str | Path) -> Any:
    """A SLURM ``submitit.AutoExecutor`` writing each job's logs and pickles to ``<folder>/<job id>/``."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm",
                                     slurm_max_num_timeout=cfg.max_requeues)
    executor.update_parameters(**executor_parameters(cfg))
    return executor


def submit(fn: Callable[..., Any], args: Sequence[Any], cfg: ClusterConfig, folder: str | Path) -> Any:
    """Validates the cluster settings, then submits ``fn(*args)`` as one SLURM job.

    ``fn`` must be picklable (a module-level function or an object such as ``TrainingJob``); it runs once per task.

    Returns:
        The ``submitit.Job``; multi-task jobs return one value per task from ``job.results()``.

    Raises:
        ValueError: before anything is submitted, if SLURM or the partition is missing.
    """
    check_partition(cfg.partition)
    return build_executor(cfg, folder).submit(fn, *args)


class TrainingJob:
    """The picklable callable submitit runs in every task: ``dinov2.train.main(argv)``.

    ``argv`` must hold no cluster flags (see ``strip_cluster_arguments``), so the job trains instead of submitting.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from dinov2.train import main  # lazily: the submitting process never imports the trainer's dependencies

        job_id = os.environ.get("SLURM_JOB_ID", "")
        argv = [arg.replace("%j", job_id) for arg in self.argv] if job_id else self.argv
        status = main(argv)
        if status:
            raise RuntimeError(f"python -m dinov2.train {' '.join(argv)} exited with status {status}")
        return status

    def checkpoint(self) -> Any:
        """submitit's fallback when its own handler catches the signal (ours was not installed yet): requeue as is.

        Training resumes from the latest checkpoint in the output directory.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.argv))


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


def strip_cluster_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` without cluster flags and their values (``--flag v``, ``--flag=v`` or an unambiguous prefix).

    Assumes ``argv`` already parsed without error, so a prefix of a cluster flag is not ambiguous with another flag.
    """
    by_flag = {flag: dest for flags, dest, _, _ in CLUSTER_FLAGS for flag in flags}
    kept: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":  # everything after is positional
            kept.append(token)
            kept.extend(tokens)
            break
        name, has_value, _ = token.partition("=")
        if not name.startswith("--"):
            kept.append(token)
            continue
        dests = {by_flag[name]} if name in by_flag else {d for f, d in by_flag.items() if f.startswith(name)}
        if len(dests) != 1:
            kept.append(token)
        elif not has_value:
            next(tokens, None)
    return kept


def submit_training(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Submits ``python -m dinov2.train`` with ``argv`` minus the cluster flags; prints the job id and log paths.

    Args:
        args: parsed ``dinov2.train`` arguments (uses ``config_file``, ``output_dir`` and the cluster flags).
        argv: the command line they were parsed from.

    Returns:
        0 once submitted; 2 (with a one-line error on stderr) when a check fails, before anything is submitted.
    """
    try:
        cfg = cluster_config_from_args(args)
        config_file = getattr(args, "config_file", "")
        if config_file and not Path(config_file).is_file():
            raise ValueError(f"config file not found: {config_file}")
        folder = Path(args.output_dir).resolve() / "slurm"
        job = submit(TrainingJob(strip_cluster_arguments(argv)), (), cfg, folder)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"submitted SLURM job {job.job_id}: {cfg.nodes} node(s) x {cfg.ntasks_per_node} task(s), "
          f"partition {cfg.partition or '(default)'}")
    print(f"logs: {job.paths.stdout} and {job.paths.stderr} (task 0; other tasks next to them)")
    return 0
