"""Benchmark: one full DINOv2 SSL training step (ViT-S/14, 2 x 224 + 8 x 98 crops) against the matmul peak.

Usage:
    python bench/train_step.py              # ViT-S/14, official heads (65536 prototypes), batch 4, CPU fp32 + bf16
    python bench/train_step.py --quick      # 2-block ViT-S, 4096 prototypes, batch 2: a smoke run
    python bench/train_step.py --batch 8 --iters 5

A step is what ``train()`` does per iteration, minus data loading: teacher forward on the global crops, student
forward on all crops (packed multi-crop), DINO + iBOT + KoLeo losses, backward, per-submodule gradient clipping,
AdamW step and the EMA teacher update. The batch comes from the real collate (iBOT masks included). FLOPs per image
come from the training log's own counter (``dinov2.train.train.flops_per_image``: fvcore, attention included):
3 x student forward (forward + backward) + teacher forward. The matmul peak is measured beside it, in the same
run and precision, so "fraction of peak" compares like with like. Results are printed, never asserted.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backbone import matmul_peak, sync  # noqa: E402
from dinov2.config import load_config  # noqa: E402
from dinov2.data.collate import collate_crops  # noqa: E402
from dinov2.data.masking import MaskingGenerator  # noqa: E402
from dinov2.train.optim import apply_schedules, build_optimizer, build_param_groups  # noqa: E402
from dinov2.train.train import build_student_teacher, flops_per_image  # noqa: E402


def bench_config(quick: bool, batch: int, arch: str = "vit_small"):
    """ViT-S/14 (or ``arch``) with the official recipe's heads and crops (``configs/train/ssl_default.yaml``
    otherwise)."""
    overrides = [
        f"student.arch={arch}",
        "student.patch_size=14",
        "student.drop_path_rate=0.1",
        "crops.global_crops_size=224",
        "crops.local_crops_size=98",
        "crops.local_crops_number=8",
        f"train.batch_size_per_gpu={batch}",
        "train.device=cpu",
    ]
    if quick:
        overrides += ["student.arch=vit_custom", "student.embed_dim=384", "student.depth=2", "student.num_heads=6",
                      "dino.head_n_prototypes=4096", "ibot.head_n_prototypes=4096"]
    return load_config(None, overrides)


def make_batch(cfg, batch: int, seed: int = 0) -> dict:
    """A collated batch of random crops with real iBOT masks (the data path is not what this measures)."""
    g = torch.Generator().manual_seed(seed)
    gs, ls = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    samples = [
        {
            "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
            "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(cfg.crops.local_crops_number)],
        }
        for _ in range(batch)
    ]
    grid = gs // cfg.student.patch_size
    return collate_crops(
        samples,
        tuple(cfg.ibot.mask_ratio_min_max),
        cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(grid, max_num_patches=0.5 * grid * grid),
        rng=random.Random(seed),
    )


def run_precision(cfg, batch: dict, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    """Seconds per step (median of ``iters`` timed steps) and the loss values seen, for one autocast dtype."""
    torch.manual_seed(0)
    model = build_student_teacher(cfg).to(device).train()
    groups = {name: [p for p in m.parameters() if p.requires_grad] for name, m in model.student.items()}
    optimizer = build_optimizer(
        build_param_groups(dict(model.student.items()), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
        cfg.optim.adamw_beta1,
        cfg.optim.adamw_beta2,
    )
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    use_autocast = dtype != torch.float32
    losses: list[float] = []

    def step() -> None:
        apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if use_autocast else nullcontext()
        with ctx:
            terms = model(batch, 0.04)
        terms["total_loss"].backward()
        for params in groups.values():
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        model.update_teacher(0.992)
        losses.append(float(terms["total_loss"].detach()))

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "losses": losses, "flops": flops_per_image(model, cfg.crops, device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-block model, small heads, one timed step")
    parser.add_argument("--batch", type=int, default=0, help="images per step (default 4; 2 with --quick)")
    parser.add_argument("--iters", type=int, default=0, help="timed steps (default 3; 1 with --quick)")
    parser.add_argument("--precisions", default="", help="comma list of fp32,bf16 (default: both)")
    parser.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_base", "vit_large", "vit_giant2"])
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="all = CPU, then CUDA if any")
    args = parser.parse_args(argv)
    batch_size = args.batch or (2 if args.quick else 4)
    iters = args.iters or (1 if args.quick else 3)
    cfg = bench_config(args.quick, batch_size, args.arch)
    batch = make_batch(cfg, batch_size)

    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [d for d in devices if args.device in ("all", d.type)]
    for device in devices:
        names = args.precisions.split(",") if args.precisions else (["fp32", "bf16"])
        for name in names:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            peak, peak_n = matmul_peak(device, dtype, 4096 if device.type == "cpu" else 16384, budget_s=8.0)
            result = run_precision(cfg, batch, device, dtype, warmup=1, iters=iters)
            images_per_s = batch_size / result["seconds"]
            achieved = result["flops"] * images_per_s / 1e12
            finite = all(math.isfinite(v) for v in result["losses"])
            rows.append((device.type, name, batch_size, result["seconds"], images_per_s, result["flops"] / 1e9,
                         achieved, peak, peak_n, achieved / peak if peak else float("nan"), finite))
    arch = f"{args.arch}/14 2-block (quick)" if args.quick else f"{args.arch}/14"
    print(f"\nOne SSL step: {arch}, {batch_size} images x (2 x 224 + 8 x 98 crops), DINO+iBOT+KoLeo, "
          f"{cfg.dino.head_n_prototypes} prototypes; torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"{'device':<6} {'prec':<5} {'batch':>5} {'s/step':>8} {'img/s':>8} {'GFLOP/img':>10} "
              f"{'TFLOP/s':>8} {'peak TFLOP/s':>12} {'(n)':>6} {'of peak':>8} {'finite':>6}")
    print(header)
    print("-" * len(header))
    for dev, name, b, sec, ips, gflop, ach, peak, n, frac, finite in rows:
        print(f"{dev:<6} {name:<5} {b:>5} {sec:>8.2f} {ips:>8.2f} {gflop:>10.1f} {ach:>8.3f} {peak:>12.3f} "
              f"{n:>6} {frac:>8.0%} {str(finite):>6}")
    cpu = {r[1]: r for r in rows if r[0] == "cpu"}
    if "fp32" in cpu and "bf16" in cpu:
        print(f"\nCPU bf16 / fp32 step speed: {cpu['fp32'][3] / cpu['bf16'][3]:.2f}x "
              f"(matmul peak ratio {cpu['bf16'][7] / cpu['fp32'][7]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
