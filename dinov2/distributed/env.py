"""Distributed state as an explicit value: ``DistEnv`` from SLURM (through submitit), torchrun or a single process, and
its collectives."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist
from submitit.slurm.slurm import SlurmJobEnvironment, SlurmParseException

logger = logging.getLogger("dinov2")

TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# Ports derived from the job id land in DINOv2's range, which clusters set up for it keep open.
PORT_LOW, PORT_HIGH = 20000, 60000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Built once, then passed to whatever needs it (no module globals).

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes in the job.
        local_rank: rank among the processes of this node; also the CUDA device index.
        local_world_size: processes per node.
        device: ``cuda:<local_rank>`` when CUDA is used, else ``cpu``.
        backend: ``nccl`` on CUDA, ``gloo`` on CPU.
        master_addr: host of rank 0 (rendezvous address).
        master_port: rendezvous TCP port; 0 for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of size {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is outside a node of {self.local_world_size} processes")
        if self.world_size > 1 and not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} is not a valid TCP port")

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the one process that logs, writes exports and talks to the scheduler."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, use_cuda: bool | None = None) -> DistEnv:
        """Reads the process layout from this process's environment variables.

        Sources, in order:
          1. torchrun: all of ``MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE``. Checked
             first because torchrun started inside a SLURM allocation inherits SLURM's variables for the wrong layout.
          2. A SLURM job step (``SLURM_JOB_ID``, ``SLURM_STEP_ID``, ``SLURM_PROCID`` set, i.e. under ``srun``, as in
             every task submitit starts): read by submitit (:class:`SlurmStepEnvironment`); master = first host of
             the step's node list, port = ``MASTER_PORT`` or derived from the job id. A batch script outside
             ``srun`` (no ``SLURM_STEP_ID``) is a single process even when ``SLURM_NTASKS`` > 1.
          3. Otherwise a single process (world 1, no process group needed).

        Args:
            use_cuda: put this rank on ``cuda:<local_rank>``; default: whether CUDA is available.

        Raises:
            ValueError: a partial torchrun set outside SLURM (the message lists the missing names), or malformed values.
        """
        environ = os.environ
        use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        present = [name for name in TORCHRUN_VARS if name in environ]
        in_slurm_step = all(name in environ for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID"))
        if len(present) == len(TORCHRUN_VARS):
            layout = _layout_from_torchrun(environ)
        elif in_slurm_step:
            layout = _layout_from_slurm()
        elif present:
            missing = [name for name in TORCHRUN_VARS if name not in environ]
            raise ValueError(f"partially set torchrun environment: {', '.join(present)} set but "
                             f"{', '.join(missing)} missing; set all of {', '.join(TORCHRUN_VARS)} or none")
        else:
            layout = {}
        local_rank = layout.get("local_rank", 0)
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return cls(device=device, backend="nccl" if use_cuda else "gloo", **layout)


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def _layout_from_torchrun(environ: Mapping[str, str]) -> dict:
    return {
        "rank": _int_var(environ, "RANK"),
        "world_size": _int_var(environ, "WORLD_SIZE"),
        "local_rank": _int_var(environ, "LOCAL_RANK"),
        "local_world_size": _int_var(environ, "LOCAL_WORLD_SIZE"),
        "master_addr": environ["MASTER_ADDR"],
        "master_port": _int_var(environ, "MASTER_PORT"),
    }


class SlurmStepEnvironment(SlurmJobEnvironment):
    """submitit's view of a SLURM task, reading the job *step*'s task count, node count and node list (which srun
    sets for the tasks it starts) instead of the job's: ``srun -n 1`` inside a 2-task allocation is a world of 1.

    submitit parses SLURM's compressed host lists (``gpu[07-08,10],cpu3``); its ``_env`` table is the documented way
    to point a ``JobEnvironment`` at other variables.
    """

    _env: ClassVar[dict[str, str]] = {
        **SlurmJobEnvironment._env,
        "num_tasks": "SLURM_STEP_NUM_TASKS",
        "num_nodes": "SLURM_STEP_NUM_NODES",
        "nodes": "SLURM_STEP_NODELIST",
    }


def _layout_from_slurm() -> dict:
    step = SlurmStepEnvironment()
    try:
        layout = {"rank": step.global_rank, "world_size": step.num_tasks, "local_rank": step.local_rank,
                  "local_world_size": max(1, step.num_tasks // step.num_nodes), "master_addr": step.hostnames[0]}
    except (ValueError, SlurmParseException) as error:
        raise ValueError(f"malformed SLURM environment: {error}") from None
    port = os.environ.get("MASTER_PORT")
    layout["master_port"] = _int_var(os.environ, "MASTER_PORT") if port else port_from_job_id(step.raw_job_id)
    return layout


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port every rank of a job computes alike, and that differs between consecutive job ids.

    Args:
        job_id: ``SLURM_JOB_ID`` (digits; for array tasks the ``_<index>`` suffix is folded in too).
    """
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID {job_id!r} holds no digits")
    return PORT_LOW + int(digits) % (PORT_HIGH - PORT_LOW)


def init_distributed(env: DistEnv, timeout: timedelta = timedelta(minutes=30)) -> DistEnv:
    """Selects the CUDA device and, when ``world_size > 1``, joins the default process group.

    The rendezvous is a TCP store at ``master_addr:master_port`` (no environment variables are exported). At world 1
    nothing is initialised, and every helper below is a no-op.

    Returns:
        ``env`` itself, so a caller can write ``env = init_distributed(DistEnv.from_environment())``.
    """
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=env.backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
        logger.info("joined process group: rank %d of %d (%s, master %s:%d)", env.rank, env.world_size,
                    env.backend, env.master_addr, env.master_port)
    return env


def _all_reduce(value: float, env: DistEnv, op: dist.ReduceOp) -> float:
    if env.world_size == 1:
        return float(value)
    # NCCL only reduces tensors that live on the GPU; gloo takes CPU tensors.
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def all_reduce_max(value: float | bool, env: DistEnv) -> float:
    """The maximum of ``value`` over all ranks (e.g. "does any rank want to stop?"); ``value`` itself at world 1."""
    return _all_reduce(value, env, dist.ReduceOp.MAX)


def all_reduce_min(value: float | bool, env: DistEnv) -> float:
    """The minimum of ``value`` over all ranks (e.g. "is every rank finite?"); ``value`` itself at world 1."""
    return _all_reduce(value, env, dist.ReduceOp.MIN)


def all_reduce_sum(value: float, env: DistEnv) -> float:
    """The sum of ``value`` over all ranks; ``value`` itself at world 1."""
    return _all_reduce(value, env, dist.ReduceOp.SUM)


def barrier(env: DistEnv) -> None:
    """Waits for every rank; a no-op at world 1."""
    if env.world_size > 1:
        dist.barrier()


def destroy(env: DistEnv) -> None:
    """Leaves the process group if this process joined one; safe to call more than once."""
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
