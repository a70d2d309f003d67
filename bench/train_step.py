"""Benchmark: one full DINOv2 SSL training step (ViT-S/14, 2 x 224 + 8 x 98 crops) against the matmul peak, with a
per-phase breakdown from the PyTorch profiler.

Usage:
    python bench/train_step.py              # ViT-S/14, official heads (65536 prototypes), batch 4, CPU
    python bench/train_step.py --quick      # 2-block ViT-S, 4096 prototypes, batch 2: a smoke run
    python bench/train_step.py --batch 8 --iters 5 --no-breakdown
    python bench/train_step.py --compare 5464080      # the step of that git revision against this tree's
    python bench/train_step.py --device cuda --arch vit_large --precisions bf16 --multicrop packed,separate

A step is what ``train()`` does per iteration, minus data loading: teacher forward on the global crops, student
forward on all crops (packed multi-crop), DINO + iBOT + KoLeo losses, backward, per-submodule gradient clipping,
AdamW step and the EMA teacher update, each through the trainer's own functions. The batch comes from the real
collate (iBOT masks included). FLOPs per image come from the training log's own counter
(``dinov2.train.train.flops_per_image``: fvcore's matmul operators, attention included): the student's forward +
backward and the teacher's forward, heads included (iBOT's on the masked tokens the collate targets on average).
The matmul peak is measured beside it, in the same run and precision, so "of peak" (the model FLOP utilisation,
MFU, against the measured peak) compares like with like. Results are printed, never asserted.

bf16 counts only where the device multiplies bf16 natively (CUDA; CPUs with AMX or AVX512-BF16, measured as
``dinov2.train.precision`` measures it for ``train.autocast_dtype: auto``); elsewhere its target is reported as n/a
with the measured reason, and it runs only when asked for (``--precisions bf16``), e.g. to see where its time goes.

Breakdown (default; ``--no-breakdown`` skips it): one more step per configuration under ``torch.profiler``, split
into the phases the trainer marks with ``record_function`` ranges (collate, teacher forward, student forward, heads
and losses, backward, grad clip, optimizer step, EMA update). Each phase gets its time, its share of the step, its
matmul FLOPs (mm/addmm/bmm/conv as the profiler counts them, plus SDPA and the patch-embedding backward from their
recorded shapes; the backward of attention counts twice its forward) and the rate they ran at. On CUDA a phase's
time is the device time of the kernels it launched. The collate runs in the loader workers during training, beside
the step: it is shown for scale, outside the step's total. "casts" is the time in dtype conversions (autocast's
re-casts included) anywhere in the step.

``--compare REV`` builds a second model from the ``dinov2`` package of git revision REV (same config schema assumed)
and times the two alternately in this process (REV, this tree, REV, ...), so load on a shared machine hits both
alike; medians are reported with their ratio, beside the ratios of the fastest steps and of the process CPU time
(what the step computed, not what it waited for: the steadier figure when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd.profiler import record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.backbone import matmul_peak, sync  # noqa: E402
from dinov2.config import load_config  # noqa: E402
from dinov2.data.collate import collate_crops  # noqa: E402
from dinov2.data.masking import MaskingGenerator  # noqa: E402
from dinov2.train.precision import bf16_is_native, cpu_bf16_flags, cpu_bf16_speedup  # noqa: E402

# The trainer's phases in step order; the model marks the middle three itself (dinov2/models/student_teacher.py).
PHASES = ("collate", "teacher_forward", "student_forward", "heads_losses", "backward", "clip", "optimizer", "ema")
# Targets of issue 18 (fractions of the measured matmul peak); printed beside the results, never asserted.
TARGETS = {("cpu", "fp32"): 0.60, ("cpu", "bf16"): 0.35, ("cuda", "bf16"): 0.45}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::conv2d")


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


def make_samples(cfg, batch: int, seed: int = 0) -> list[dict]:
    """Random crops of ``batch`` images, as the dataset yields them (the data path is not what this measures)."""
    g = torch.Generator().manual_seed(seed)
    gs, ls = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    return [
        {
            "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
            "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(cfg.crops.local_crops_number)],
        }
        for _ in range(batch)
    ]


def collate(cfg, samples: list[dict], seed: int = 0) -> dict:
    """The trainer's collate of ``samples``, with real iBOT masks."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return collate_crops(
        samples,
        tuple(cfg.ibot.mask_ratio_min_max),
        cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(grid, max_num_patches=0.5 * grid * grid),
        rng=random.Random(seed),
    )


def make_batch(cfg, batch: int, seed: int = 0) -> dict:
    """A collated batch of random crops with real iBOT masks."""
    return collate(cfg, make_samples(cfg, batch, seed), seed)


def _is_dinov2(name: str) -> bool:
    return name == "dinov2" or name.startswith("dinov2.")


@contextmanager
def dinov2_from_revision(rev: str) -> Iterator[None]:
    """Within the block, ``import dinov2...`` loads the package as of git revision ``rev`` (extracted to a temporary
    folder); this tree's modules are put back afterwards. Objects built inside keep the old code: their functions
    hold their own module globals."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dinov2"], capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"--compare {rev}: git archive failed: {archive.stderr.decode().strip()}")
    saved = {name: module for name, module in sys.modules.items() if _is_dinov2(name)}
    with tempfile.TemporaryDirectory(prefix="dinov2_rev_") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
        for name in saved:
            del sys.modules[name]
        sys.path.insert(0, folder)
        try:
            yield
        finally:
            sys.path.remove(folder)
            for name in [n for n in sys.modules if _is_dinov2(n)]:
                del sys.modules[name]
            sys.modules.update(saved)


def trainer_functions() -> SimpleNamespace:
    """The trainer's step functions from whichever ``dinov2`` package is importable now."""
    optim = importlib.import_module("dinov2.train.optim")
    train = importlib.import_module("dinov2.train.train")
    parallel = importlib.import_module("dinov2.distributed.parallel")
    return SimpleNamespace(
        build_student_teacher=train.build_student_teacher,
        build_param_groups=optim.build_param_groups,
        build_optimizer=optim.build_optimizer,
        apply_schedules=optim.apply_schedules,
        clip_grad_norms=parallel.clip_grad_norms,
        update_teacher=parallel.update_teacher,
    )


def run_crops_separately(backbone: torch.nn.Module) -> None:
    """Make ``backbone`` run a list of crop groups one group after the other instead of packed (for the ratio)."""
    packed_forward = backbone.forward

    def forward(x, masks=None, is_training: bool = False):
        if not isinstance(x, (list, tuple)):
            return packed_forward(x, masks=masks, is_training=is_training)
        masks = masks if masks is not None else [None] * len(x)
        return [packed_forward(xi, masks=mi, is_training=is_training) for xi, mi in zip(x, masks)]

    backbone.forward = forward


@dataclass
class Arm:
    """One configuration timed in the run: a model, its optimizer and the step functions of its code."""

    label: str
    fns: SimpleNamespace
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    groups: dict[str, list[torch.nn.Parameter]]
    flops: float
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds, all threads
    losses: list[float] = field(default_factory=list)
    phases: dict | None = None


def model_flops_per_image(model: torch.nn.Module, cfg, device: torch.device) -> float:
    """The training log's FLOP count of this tree, whichever revision built ``model``: every arm runs the same math,
    so all are measured against one count (iBOT's head on the batch's expected masked tokens included)."""
    from dinov2.train.train import expected_masked_tokens, flops_per_image

    return flops_per_image(model, cfg.crops, device, expected_masked_tokens(cfg))


def build_arm(label: str, cfg, device: torch.device, rev: str | None, separate: bool) -> Arm:
    with dinov2_from_revision(rev) if rev else nullcontext():
        fns = trainer_functions()
        torch.manual_seed(0)
        model = fns.build_student_teacher(cfg).to(device).train()
        optimizer = fns.build_optimizer(
            fns.build_param_groups(dict(model.student.items()), cfg.optim.layerwise_decay,
                                   cfg.optim.patch_embed_lr_mult),
            cfg.optim.adamw_beta1,
            cfg.optim.adamw_beta2,
        )
    flops = model_flops_per_image(model, cfg, device)
    if separate:
        run_crops_separately(model.student["backbone"])
    groups = {name: [p for p in m.parameters() if p.requires_grad] for name, m in model.student.items()}
    return Arm(label, fns, model, optimizer, groups, flops)


def train_step(arm: Arm, batch: dict, device: torch.device, dtype: torch.dtype, clip: float) -> float:
    """One step as ``train()`` runs it (accum_steps 1, one rank); returns the total loss."""
    fns = arm.fns
    fns.apply_schedules(arm.optimizer, 1e-4, 0.04, 1e-4)
    arm.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        terms = arm.model(batch, 0.04)
    with record_function("backward"):
        terms["total_loss"].backward()
    with record_function("clip"):
        fns.clip_grad_norms(arm.groups, clip)
    with record_function("optimizer"):
        arm.optimizer.step()
    with record_function("ema"):
        fns.update_teacher(arm.model, 0.992)
    return float(terms["total_loss"].detach())


def _attention_flops(name: str, shapes: list) -> float:
    """SDPA kernels from their recorded (b, h, n, d) query and (b, h, m, d) key shapes; backward = 2 x forward."""
    if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
        return 0.0
    (b, h, n, d), m = shapes[0], shapes[1][2]
    forward = 4.0 * b * h * n * m * d
    return 2 * forward if name.endswith("_backward") else forward


def op_matmul_flops(event) -> float:
    """Matmul FLOPs of one profiler event (0 for everything else)."""
    name = event.name
    if name in _MATMUL_OPS:
        return float(event.flops or 0)
    if name.startswith("aten::_scaled_dot_product"):
        return _attention_flops(name, event.input_shapes)
    if name == "aten::convolution_backward" and len(event.input_shapes) >= 3:
        grad_out, weight = event.input_shapes[0], event.input_shapes[2]
        if len(grad_out) == 4 and len(weight) == 4:  # the weight gradient (images need none)
            return 2.0 * math.prod(grad_out) * math.prod(weight[1:])
    return 0.0


def profile_step(arm: Arm, cfg, samples: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """One profiled step (collate first, outside the step); per phase: seconds, matmul FLOPs; plus casts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        with record_function("collate"):
            batch = collate(cfg, samples)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with record_function("step"):
            train_step(arm, batch, device, dtype, cfg.optim.clip_grad)
        sync(device)
    events = list(prof.events())
    ranges = {e.name: e for e in events if e.name in PHASES or e.name == "step"}
    missing = [p for p in PHASES if p not in ranges]
    spans = {name: (e.time_range.start, e.time_range.end) for name, e in ranges.items()}

    def seconds(event) -> float:
        if device.type == "cuda" and getattr(event, "device_time_total", 0):
            return event.device_time_total / 1e6
        return (event.time_range.end - event.time_range.start) / 1e6

    flops = dict.fromkeys(PHASES, 0.0)
    casts_s, casts_n, xformers, step_flops = 0.0, 0, False, 0.0
    for e in events:
        xformers = xformers or "xformers" in e.name
        if e.name == "aten::_to_copy" and spans["step"][0] <= e.time_range.start <= spans["step"][1]:
            parent = e.cpu_parent
            if parent is None or parent.name != "aten::_to_copy":
                casts_s += seconds(e)
                casts_n += 1
        f = op_matmul_flops(e)
        if not f:
            continue
        if spans["step"][0] <= e.time_range.start <= spans["step"][1]:
            step_flops += f
        for name, (start, end) in spans.items():
            if name != "step" and start <= e.time_range.start <= end:
                flops[name] += f
                break
    phases = {p: (seconds(ranges[p]) if p in ranges else 0.0, flops[p]) for p in PHASES}
    return {"phases": phases, "step": (seconds(ranges["step"]), step_flops), "casts": (casts_s, casts_n),
            "missing": missing, "xformers": xformers}


def bf16_status(device: torch.device, fp32_peak: float, bf16_peak: float) -> tuple[bool, str]:
    """Whether bf16 matmul is native here, and why: decided as ``train.autocast_dtype: auto`` decides (its own
    1024-square bf16 vs fp32 matmul timing, ``dinov2.train.precision``), with this run's two peaks as the reason."""
    if device.type == "cuda":
        return True, "CUDA"
    speedup = cpu_bf16_speedup()
    flags = ", ".join(cpu_bf16_flags()) or "none"
    ratio = bf16_peak / fp32_peak if fp32_peak else float("nan")
    return bf16_is_native(speedup), (f"bf16 matmul {speedup:.2g}x the speed of fp32 (peaks: {ratio:.2g}x; "
                                     f"CPU bf16 flags: {flags})")


def print_breakdown(arms: list[Arm], peak: float, device: torch.device) -> None:
    """One table, the arms side by side: ms, share of the step, matmul GFLOP, TFLOP/s and fraction of peak."""
    head = f"{'phase':<16}" + "".join(f" | {a.label[:22]:>22} {'share':>6} {'GFLOP':>7} {'TFLOP/s':>8} {'peak':>5}"
                                       for a in arms)
    print(head)
    print("-" * len(head))
    for phase in PHASES + ("step",):
        line = f"{phase:<16}"
        for arm in arms:
            info = arm.phases
            sec, fl = info["step"] if phase == "step" else info["phases"][phase]
            share = sec / info["step"][0] if info["step"][0] else float("nan")
            rate = fl / sec / 1e12 if sec and fl else 0.0
            rate_s = f"{rate:8.3f}" if fl else f"{'-':>8}"
            peak_s = f"{rate / peak:5.0%}" if fl and peak else f"{'-':>5}"
            share_s = f"{share:6.0%}" if phase != "collate" else f"{'(' + format(share, '.0%') + ')':>6}"
            line += f" | {sec * 1e3:19.1f} ms {share_s} {fl / 1e9:7.1f} {rate_s} {peak_s}"
        print(line)
    for arm in arms:
        casts_s, casts_n = arm.phases["casts"]
        other = arm.phases["step"][0] - sum(s for p, (s, _) in arm.phases["phases"].items() if p != "collate")
        notes = [f"dtype casts {casts_s * 1e3:.1f} ms ({casts_n} calls)", f"outside the phases {other * 1e3:.1f} ms"]
        if arm.phases["missing"]:
            notes.append(f"no range for {', '.join(arm.phases['missing'])} (this code does not mark it)")
        if arm.phases["xformers"]:
            notes.append("xFormers attention ran: its FLOPs are not counted here")
        print(f"  {arm.label}: " + "; ".join(notes))
    unit = "device time of the kernels each phase launched" if device.type == "cuda" else "wall time under the profiler"
    print(f"  (times: {unit}; collate runs in the loader workers during training, so it is outside the step)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-block model, small heads, one timed step")
    parser.add_argument("--batch", type=int, default=0, help="images per step (default 4; 2 with --quick)")
    parser.add_argument("--iters", type=int, default=0, help="timed steps per arm (default 3; 1 with --quick)")
    parser.add_argument("--precisions", default="",
                        help="comma list of fp32,bf16 (default: fp32, plus bf16 where it is native)")
    parser.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_base", "vit_large", "vit_giant2"])
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="all = CPU, then CUDA if any")
    parser.add_argument("--multicrop", default="packed",
                        help="comma list of packed,separate: the student's crop groups in one packed forward, or "
                             "one forward per group (both: timed alternately, with their ratio)")
    parser.add_argument("--compare", default="", metavar="REV",
                        help="also time the step of git revision REV's dinov2, alternately with this tree's")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled per-phase breakdown")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # under a timeout (the GPU check) what was printed survives a kill
    batch_size = args.batch or (2 if args.quick else 4)
    iters = args.iters or (1 if args.quick else 3)
    cfg = bench_config(args.quick, batch_size, args.arch)
    samples = make_samples(cfg, batch_size)
    if args.precisions and not set(args.precisions.split(",")) <= set(DTYPES):
        parser.error(f"--precisions: {args.precisions!r} is not a comma list of {', '.join(DTYPES)}")
    multicrop = args.multicrop.split(",")
    if not set(multicrop) <= {"packed", "separate"}:
        parser.error(f"--multicrop: {args.multicrop!r} is not a comma list of packed, separate")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [d for d in devices if args.device in ("all", d.type)]
    if not devices:
        parser.error(f"--device {args.device}: no such device here")
    arch = f"{args.arch}/14 2-block (quick)" if args.quick else f"{args.arch}/14"
    print(f"One SSL step: {arch}, {batch_size} images x (2 x {cfg.crops.global_crops_size} + "
          f"{cfg.crops.local_crops_number} x {cfg.crops.local_crops_size} crops), DINO+iBOT+KoLeo, "
          f"{cfg.dino.head_n_prototypes} prototypes; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows, notes, native_bf16 = [], [], {}
    for device in devices:
        batch = collate(cfg, samples)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        max_n = 4096 if device.type == "cpu" else 16384
        # on a CPU both peaks are measured (their ratio is part of the bf16 verdict); on CUDA only those run
        wanted = set(DTYPES) if device.type == "cpu" or not args.precisions else set(args.precisions.split(","))
        peaks = {name: matmul_peak(device, DTYPES[name], max_n, budget_s=8.0) for name in DTYPES if name in wanted}
        native, reason = bf16_status(device, peaks.get("fp32", (0.0, 0))[0], peaks.get("bf16", (0.0, 0))[0])
        native_bf16[device.type] = native
        names = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if native else [])
        if not native:
            notes.append(f"{device.type} bf16 target: n/a, {reason}: emulated, not native"
                         + ("" if "bf16" in names else " (not run; --precisions bf16 runs it)"))
        for name in names:
            dtype = DTYPES[name]
            peak, peak_n = peaks[name]
            arms = []
            for mode in multicrop:
                suffix = "" if len(multicrop) == 1 else f" {mode}"
                if args.compare:
                    arms.append(build_arm(f"{args.compare}{suffix}", cfg, device, args.compare, mode == "separate"))
                arms.append(build_arm(f"{'this tree' if args.compare else 'step'}{suffix}", cfg, device, None,
                                      mode == "separate"))
            for arm in arms:  # warm-up (allocations, kernel selection)
                train_step(arm, batch, device, dtype, cfg.optim.clip_grad)
            for _ in range(iters):  # round robin, so load on a shared machine hits every arm alike
                for arm in arms:
                    sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    arm.losses.append(train_step(arm, batch, device, dtype, cfg.optim.clip_grad))
                    sync(device)
                    arm.times.append(time.perf_counter() - t0)
                    arm.cpu_times.append(time.process_time() - c0)
            for arm in arms:
                seconds = statistics.median(arm.times)
                images_per_s = batch_size / seconds
                achieved = arm.flops * images_per_s / 1e12
                finite = all(math.isfinite(v) for v in arm.losses)
                rows.append((device.type, name, arm.label, batch_size, seconds, images_per_s, arm.flops / 1e9,
                             achieved, peak, peak_n, achieved / peak if peak else float("nan"), finite))
                print(f"{device.type} {name} {arm.label}: {seconds:.3f} s/step, {images_per_s:.2f} img/s, "
                      f"{achieved / peak if peak else float('nan'):.0%} of the {peak:.3f} TFLOP/s matmul peak")
            for arm in arms:
                notes.append(f"{device.type} {name} {arm.label}: s/step of each timed step "
                             + " ".join(f"{t:.2f}" for t in arm.times)
                             + "; process CPU s " + " ".join(f"{t:.2f}" for t in arm.cpu_times))
            if len(arms) > 1:
                base = arms[0]
                for arm in arms[1:]:
                    wall = statistics.median(base.times) / statistics.median(arm.times)
                    fastest = min(base.times) / min(arm.times)
                    cpu = statistics.median(base.cpu_times) / statistics.median(arm.cpu_times)
                    notes.append(f"{device.type} {name}: {arm.label} is {wall:.2f}x the speed of {base.label} "
                                 f"(medians of {iters} alternated steps; fastest steps {fastest:.2f}x; process CPU "
                                 f"time {cpu:.2f}x, the figure least moved by other jobs on a shared machine)")
            if not args.no_breakdown:
                for arm in arms:
                    arm.phases = profile_step(arm, cfg, samples, device, dtype)
                print(f"\nBreakdown, {device.type} {name} (one profiled step each; matmul peak {peak:.3f} TFLOP/s):")
                print_breakdown(arms, peak, device)
            del arms

    print()
    header = (f"{'device':<6} {'prec':<5} {'arm':<18} {'batch':>5} {'s/step':>8} {'img/s':>8} {'GFLOP/img':>10} "
              f"{'TFLOP/s':>8} {'peak TFLOP/s':>12} {'(n)':>6} {'of peak':>8} {'target':>7} {'finite':>6}")
    print(header)
    print("-" * len(header))
    for dev, name, label, b, sec, ips, gflop, ach, peak, n, frac, finite in rows:
        target = TARGETS.get((dev, name))
        target_s = f"{target:.0%}" if target is not None else "-"
        if name == "bf16" and not native_bf16[dev]:
            target_s = "n/a"
        print(f"{dev:<6} {name:<5} {label[:18]:<18} {b:>5} {sec:>8.2f} {ips:>8.2f} {gflop:>10.1f} {ach:>8.3f} "
              f"{peak:>12.3f} {n:>6} {frac:>8.0%} {target_s:>7} {str(finite):>6}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
