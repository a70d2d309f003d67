"""The command line of ``python -m dinov2.train``: train here, or submit the same run to SLURM.

Usage: ``python -m dinov2.train --config-file F --output-dir D [key=value ...]`` trains in this process (CPU or one
GPU, or one rank under torchrun / SLURM). Cluster flags (``--slurm``, ``--nodes`` ...) submit the same run through
submitit instead (``dinov2.run.submit``).
"""

from __future__ import annotations

import argparse
import sys

from dinov2.config import ConfigError
from dinov2.run.job import TrainRequest, run_training
from dinov2.run.submit import add_cluster_arguments, submit_training, wants_cluster


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.train",
        description="DINOv2 SSL training. Trailing key=value pairs override config keys.",
    )
    parser.add_argument("--config-file", default="", help="override file on top of configs/train/ssl_default.yaml")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="checkpoints, logs and exports go here")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in the output dir")
    parser.add_argument("opts", nargs="*", help="config overrides, e.g. train.batch_size_per_gpu=32")
    add_cluster_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    request = TrainRequest(args.config_file, args.output_dir, tuple(args.opts), resume=not args.no_resume)
    if not wants_cluster(args):
        return run_training(request)
    try:
        request.load_config()  # a bad key fails here, before anything is submitted
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    return submit_training(request, args)
