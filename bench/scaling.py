"""Benchmark: training throughput per process across world sizes and parallel strategies (``train.strategy``).

Usage:
    python bench/scaling.py                    # CPU (gloo): world 1 (none), world 2 (fsdp, ddp, none); tiny ViT
    python bench/scaling.py --iters 12 --batch 8
    python bench/scaling.py --gpu              # one GPU: ViT-S/14, none + bf16 autocast vs FSDP2 bf16 (one-rank group)

Every row is a real ``train()`` run (loader, augmentation, losses, clipping, EMA, no checkpoint inside the
timed window) on a synthetic JPEG folder, in fresh processes joined through a TCP store like torchrun. Throughput is
``batch_size_per_gpu / median(iter_time)`` over the iterations after ``--warmup``; ``data`` is the share of the step
spent waiting for the loader. On a CPU machine the processes share its cores, so the world-2 rows show the cost of
the collectives plus the contention, not a speed-up. Results are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
import torch.distributed as dist
from dinov2.config import load_config
from dinov2.distributed.env import DistEnv, destroy, init_distributed
from dinov2.train.train import train

env = init_distributed(DistEnv.from_environment())
cfg = load_config(None, json.loads(sys.argv[1]))
if cfg.train.strategy in ("fsdp", "ddp") and not dist.is_initialized():  # one rank still needs a process group
    dist.init_process_group(env.backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=0,
                            world_size=1)
train(cfg, env, resume=False)
if dist.is_initialized():
    dist.destroy_process_group()
"""


def write_images(root: Path, count: int, size: int) -> Path:
    """A folder of ``count`` random-texture JPEGs (the loader decodes and augments them as real data)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 255, (3,), dtype=np.uint8)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.jpg")
    return root


def cpu_overrides(batch: int) -> list[str]:
    return [
        "student.arch=vit_custom", "student.embed_dim=96", "student.depth=4", "student.num_heads=3",
        "student.patch_size=16", "crops.global_crops_size=64", "crops.local_crops_size=32",
        "crops.local_crops_number=2", "dino.head_n_prototypes=1024", "dino.head_hidden_dim=256",
        "dino.head_bottleneck_dim=64", "ibot.head_n_prototypes=1024", f"train.batch_size_per_gpu={batch}",
        "train.num_workers=0", "train.device=cpu", "train.autocast_dtype=fp32",
    ]


def gpu_overrides(batch: int, strategy: str) -> list[str]:
    overrides = [
        "student.arch=vit_small", "student.patch_size=14", "student.drop_path_rate=0.1",
        "crops.global_crops_size=224", "crops.local_crops_size=98", "crops.local_crops_number=8",
        f"train.batch_size_per_gpu={batch}", "train.num_workers=8", "train.device=cuda",
        "compute_precision.grad_scaler=false",
    ]
    if strategy == "fsdp":  # bf16 parameters and compute through FSDP2; heads reduce in fp32 (the defaults say so)
        overrides.append("train.autocast_dtype=fp32")
        for role in ("student", "teacher"):
            for module in ("backbone", "dino_head", "ibot_head"):
                overrides.append(f"compute_precision.{role}.{module}.mixed_precision.param_dtype=bf16")
                reduce = "fp32" if role == "student" and module != "backbone" else "bf16"
                overrides.append(f"compute_precision.{role}.{module}.mixed_precision.reduce_dtype={reduce}")
    else:
        overrides.append("train.autocast_dtype=bf16")
    return overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world_size: int, overrides: list[str], out: Path, threads: int | None) -> list[dict]:
    """One training run at ``world_size``; returns rank 0's metric rows."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        environ = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}
        if threads:
            environ["OMP_NUM_THREADS"] = str(threads)
        args = json.dumps(overrides + [f"train.output_dir={out}"])
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, args], cwd=REPO, env=environ,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, proc in enumerate(procs):
        output = proc.communicate()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} failed:\n{output[-3000:]}")
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


def summarise(rows: list[dict], warmup: int, batch: int) -> dict:
    timed = rows[warmup:]
    step = statistics.median(r["iter_time"] for r in timed)
    data = statistics.median(r["data_time"] / r["iter_time"] for r in timed)
    return {"step_s": step, "per_process": batch / step, "data_share": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="single-GPU rows (ViT-S/14) instead of the CPU rows")
    parser.add_argument("--batch", type=int, default=0, help="images per process (default 8 on CPU, 32 on GPU)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (default: cores // world size)")
    args = parser.parse_args(argv)
    batch = args.batch or (32 if args.gpu else 8)
    if args.gpu:
        cases = [(1, "none", "bf16 autocast"), (1, "fsdp", "FSDP2 bf16 params")]
    else:
        cases = [(1, "none", "fp32"), (2, "fsdp", "fp32"), (2, "ddp", "fp32"), (2, "none", "fp32")]
    common = [f"train.max_iter={args.iters}", "train.log_period=1", f"train.checkpoint_period={10**6}",
              f"evaluation.eval_period_iterations={10**6}", f"train.OFFICIAL_EPOCH_LENGTH={args.iters}"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "images", 128 if args.gpu else 64, 256 if args.gpu else 96)
        for world, strategy, precision in cases:
            overrides = gpu_overrides(batch, strategy) if args.gpu else cpu_overrides(batch)
            overrides += common + [f"train.dataset_path={data}", f"train.strategy={strategy}"]
            # CPU: the machine's cores are split between the ranks, as a real multi-process job would split them
            threads = None if args.gpu else args.threads or max(1, (os.cpu_count() or 1) // world)
            rows = run(world, overrides, Path(tmp) / f"out_{world}_{strategy}", threads)
            results.append((world, strategy, precision, summarise(rows, args.warmup, batch)))
    device = "cuda" if args.gpu else f"cpu ({os.cpu_count()} cores)"
    threads = f"; {args.threads} thread(s) per process" if args.threads else ""
    print(f"device: {device}; batch {batch} per process; median of iterations {args.warmup}..{args.iters - 1}{threads}")
    print(f"{'world':>5}  {'strategy':<8}  {'precision':<18}  {'step s':>7}  {'img/s/proc':>10}  {'img/s total':>11}  "
          f"{'data':>5}")
    for world, strategy, precision, r in results:
        print(f"{world:>5}  {strategy:<8}  {precision:<18}  {r['step_s']:>7.3f}  {r['per_process']:>10.2f}  "
              f"{r['per_process'] * world:>11.2f}  {r['data_share']:>5.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
