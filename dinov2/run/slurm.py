"""SLURM through submitit: one cluster-settings schema (``slurm/*.yaml``) and one executor builder.

Training (``dinov2.run.submit``: :func:`submit`) and the curation job arrays (``data_pipeline.core.executors``:
:func:`submit_array`) both build their ``submitit.AutoExecutor`` here, from one :class:`ClusterConfig`. Site facts
(partition, account, ...) come from YAML files such as ``slurm/cluster.yaml``; later files and then explicit
overrides win. ``slurm/README.md`` maps each key onto sbatch.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinov2.io.yaml_config import load_typed_config

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
        array_parallelism: job arrays only: how many array tasks may run at once (``--array=...%N``).
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
    array_parallelism: int | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nodes", "timeout_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster {name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"cluster {name} must be >= 0, got {getattr(self, name)}")
        for name in ("tasks_per_node", "array_parallelism"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"cluster {name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"one task per GPU: tasks_per_node={self.tasks_per_node} contradicts "
                             f"gpus_per_node={self.gpus_per_node}")

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU; CPU jobs take ``tasks_per_node`` (default 1)."""
        return self.gpus_per_node or self.tasks_per_node or 1


def load_cluster_config(paths: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """Merges YAML files in order, then ``overrides``, into a validated ``ClusterConfig``.

    ``key: null`` sets an optional key back to unset (the cluster's default); ``additional_parameters`` mappings
    merge key by key.

    Raises:
        ValueError: (``ConfigError``) a missing file, a file that is not a mapping, an unknown key or an invalid value.
    """
    return load_typed_config(ClusterConfig, paths, values=overrides)


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
        "slurm_array_parallelism": cfg.array_parallelism,
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


def submit_array(fn: Callable[..., Any], calls: Sequence[Sequence[Any]], cfg: ClusterConfig,
                 folder: str | Path) -> list[Any]:
    """Validates the cluster settings, then submits ``fn(*args)`` for each ``args`` of ``calls`` as one SLURM job
    array, each element a task with ``cfg``'s resources (at most ``cfg.array_parallelism`` running at once).

    Returns:
        One ``submitit.Job`` per element of ``calls``, in order.

    Raises:
        ValueError: before anything is submitted, if SLURM or the partition is missing.
    """
    check_partition(cfg.partition)
    if not calls:
        return []
    return build_executor(cfg, folder).map_array(fn, *zip(*calls))
