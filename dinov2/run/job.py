"""One training run in this process: what ``python -m dinov2.train`` does once its flags are parsed.

The same function runs locally, under torchrun, and inside every SLURM task (``dinov2.run.submit.TrainingJob``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from dinov2.config import ConfigError, TrainConfig, load_config, save_config
from dinov2.distributed.env import DistEnv, all_reduce_min, init_distributed
from dinov2.io.errors import describe_os_error
from dinov2.io.lock import DirectoryLock, DirectoryLockedError
from dinov2.run.preemption import PreemptionHandler
from dinov2.train.metrics import setup_logging
from dinov2.train.train import train

logger = logging.getLogger("dinov2")


@dataclass(frozen=True)
class TrainRequest:
    """What a run takes from the command line (everything but the cluster flags).

    Attributes:
        config_file: override YAML on top of ``configs/train/ssl_default.yaml``; "" for the defaults alone.
        output_dir: checkpoints, logs and exports; ``%j`` is replaced by the SLURM job id inside a job.
        opts: dotted ``key=value`` config overrides.
        resume: continue from the newest valid checkpoint in ``output_dir``.
    """

    config_file: str
    output_dir: str
    opts: tuple[str, ...] = ()
    resume: bool = True

    def for_job(self, job_id: str) -> TrainRequest:
        """This request with ``%j`` replaced by ``job_id`` (a no-op outside SLURM)."""
        if not job_id:
            return self
        return replace(self, output_dir=self.output_dir.replace("%j", job_id),
                       opts=tuple(opt.replace("%j", job_id) for opt in self.opts))

    def load_config(self) -> TrainConfig:
        """The validated config, with ``train.output_dir`` set to the absolute output directory."""
        output_dir = Path(self.output_dir).resolve()
        return load_config(self.config_file or None, list(self.opts) + [f"train.output_dir={output_dir}"])


def run_training(request: TrainRequest) -> int:
    """Trains as one rank (the environment says which) and returns the exit status: 0, or 2 on bad input."""
    request = request.for_job(os.environ.get("SLURM_JOB_ID", ""))
    try:
        cfg = request.load_config()
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(cfg.train.output_dir)
    env = init_distributed(DistEnv.from_environment())
    lock = take_output_dir(output_dir, env)
    if lock is None:
        return 2
    try:
        return _train_locked(cfg, request, output_dir, env)
    finally:
        if isinstance(lock, DirectoryLock):
            lock.release()


def take_output_dir(output_dir: Path, env: DistEnv) -> DirectoryLock | bool | None:
    """Rank 0 locks the output directory for the run; every rank learns whether it may go on.

    Returns:
        The lock on rank 0, True on the other ranks, None on every rank when the directory is taken (rank 0 prints
        the holder in one line). A requeued SLURM job re-takes its own lock: the kill freed it.
    """
    lock: DirectoryLock | None = None
    if env.is_main:
        try:
            lock = DirectoryLock(output_dir, "training run").acquire()
        except DirectoryLockedError as error:
            print(f"error: {error}", file=sys.stderr)
        except OSError as error:  # a file in the way, a read-only or full disk
            print(f"error: output directory {output_dir}: {describe_os_error(error)}", file=sys.stderr)
    if all_reduce_min(env.is_main is False or lock is not None, env) < 1:
        return None  # the others leave too, instead of waiting forever in the first collective
    return lock if env.is_main else True


def _train_locked(cfg: TrainConfig, request: TrainRequest, output_dir: Path, env: DistEnv) -> int:
    logging.raiseExceptions = False  # a full disk must not turn every log line into a printed traceback
    try:
        setup_logging(output_dir, env.is_main, env.rank)
        if env.is_main:
            save_config(cfg, output_dir / "config.yaml")
        preemption = PreemptionHandler()
        preemption.install()
        summary = train(cfg, env, resume=request.resume, preemption=preemption)
    except (ConfigError, ValueError) as error:
        logger.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or quota mid-run; the newest committed checkpoint is intact
        logger.error("%s", describe_os_error(error))
        print(f"error: {describe_os_error(error)}; the run can resume from its last checkpoint", file=sys.stderr)
        return 1
    logger.info("finished at iteration %d; skipped steps %d; images skipped %s", summary["iteration"],
                summary["skipped_steps"], summary["images_skipped"])
    return 0
