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
from dinov2.distributed.env import DistEnv, init_distributed
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
    setup_logging(output_dir, env.is_main, env.rank)
    if env.is_main:
        save_config(cfg, output_dir / "config.yaml")
    preemption = PreemptionHandler()
    preemption.install()
    try:
        summary = train(cfg, env, resume=request.resume, preemption=preemption)
    except (ConfigError, ValueError) as error:
        logger.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("finished at iteration %d; skipped steps %d; images skipped %s", summary["iteration"],
                summary["skipped_steps"], summary["images_skipped"])
    return 0
