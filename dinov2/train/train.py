"""The training loop: DINOv2 self-supervised training (DINO + iBOT + KoLeo) with exact resume, in one function.

``train(cfg, env)`` reads top to bottom: schedules, forward and loss, backward, clipping, the non-finite guard, the
optimizer step, the EMA teacher, metrics, checkpoint and export. The command line is ``python -m dinov2.train``
(``dinov2.run.cli``). With ``distillation.enabled`` the same loop trains students against a frozen teacher: the
model is then :class:`~dinov2.models.distillation.Distillation`, whose ``teacher`` holds the students' EMAs
(``dinov2.train.distill`` resolves the teacher and exports one model per student).

This module is where the config is unpacked: every builder it calls takes only the sections or values it reads, and
derived values (the scaled lr, the resolved device and parallel strategy) are computed here once and passed in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from dinov2.config import ConfigError, CropsConfig, StudentConfig, TrainConfig, scaled_lr, total_batch_size
from dinov2.data import build_train_loader, split_micro_batches
from dinov2.distributed import parallel
from dinov2.distributed.env import DistEnv
from dinov2.eval.knn import evaluate_knn
from dinov2.io.atomic import write_atomic
from dinov2.models.student_teacher import StudentTeacher, build_backbones
from dinov2.train.anomaly import AnomalyLog, LossSpikeDetector
from dinov2.train.checkpoint import (
    latest_checkpoint,
    restore_rng_state,
)
from dinov2.train.collapse import CollapseMonitor
from dinov2.train.collapse import describe as describe_collapse
from dinov2.train.distill import build_distillation, ema_backbones, ema_exports, ema_momentum, plan_distillation
from dinov2.train.distill import flops_per_image as distillation_flops_per_image
from dinov2.train.highres import freeze_backbone_grads, init_phase_from, update_teacher_heads
from dinov2.train.metrics import MetricLogger, count_backbone_flops, count_forward_flops
from dinov2.train.optim import apply_schedules, build_optimizer, build_param_groups
from dinov2.train.precision import resolve_autocast_dtype
from dinov2.train.regime import resolve_regime
from dinov2.train.schedules import build_schedules
from dinov2.train.state import restore_newest_loadable, save_training_state
from dinov2.weights.arch import BackboneSpec, spec_of_module

logger = logging.getLogger("dinov2")


class StopRequest(Protocol):
    """A preemption source: all ranks agree whether to stop at this iteration; ``requeue`` resubmits the job."""

    def should_stop(self, env: DistEnv) -> bool: ...

    def requeue(self, env: DistEnv) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Raised when the non-finite policy says to stop the run."""


def resolve_device(device: str, env: DistEnv) -> torch.device:
    """``train.device`` (auto | cpu | cuda) as this rank's device."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda was requested but no CUDA device is available")
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_student_teacher(cfg: TrainConfig) -> StudentTeacher:
    """The model of a run, from the config sections it reads (official ``SSLMetaArch(cfg)``)."""
    return StudentTeacher(cfg.student, cfg.dino, cfg.ibot, img_size=cfg.crops.global_crops_size,
                          n_local_crops=cfg.crops.local_crops_number, centering=cfg.train.centering)


def load_initial_weights(model: StudentTeacher, pretrained_weights: str) -> None:
    """``student.pretrained_weights``: a backbone in any supported layout, loaded strictly into student and teacher
    ("" loads nothing)."""
    if not pretrained_weights:
        return
    from dinov2.weights import load_backbone_weights

    for role in ("student", "teacher"):
        load_backbone_weights(getattr(model, role)["backbone"], pretrained_weights)
    logger.info("initialised student and teacher backbones from %s", pretrained_weights)


def flops_per_image(model: StudentTeacher, crops: CropsConfig, device: torch.device,
                    masked_tokens_per_image: float = 0.0) -> float:
    """Training matmul FLOPs per image: student forward + backward (``count_backbone_flops``; 3x forward for the
    heads) on all crops plus the teacher's forward. Heads included: the DINO head on every CLS token, the iBOT head
    on ``masked_tokens_per_image`` patch tokens (both roles run it on the masked tokens, see
    ``expected_masked_tokens``); the iBOT head is about 12% of a ViT-S/14 step at 65536 prototypes."""
    backbone = model.teacher["backbone"]
    with torch.no_grad():
        global_forward, global_trained = count_backbone_flops(backbone, crops.global_crops_size, device)
        _, local_trained = count_backbone_flops(backbone, crops.local_crops_size, device)
        token = torch.zeros(1, backbone.embed_dim, device=device)
        head = count_forward_flops(model.teacher["dino_head"], token) if "dino_head" in model.teacher else 0.0
        ibot = 0.0
        if model.do_ibot and masked_tokens_per_image > 0:
            ibot = masked_tokens_per_image * count_forward_flops(model.teacher[model.ibot_head_name], token)
    n_local = crops.local_crops_number
    student = 2 * global_trained + n_local * local_trained + 3 * ((2 + n_local) * head + ibot)
    teacher = 2 * global_forward + 2 * head + ibot
    return student + teacher


def expected_masked_tokens(cfg: TrainConfig) -> float:
    """Mean masked patch tokens per image that the collate targets for batches of B = ``train.batch_size_per_gpu``:
    ``int(2B p)`` of the 2B global crops masked at stratified ratios in [r_min, r_max] (mean (r_min + r_max) / 2)
    of the N patches of a global crop (``dinov2.data.collate``)."""
    batch_size, ibot = cfg.train.batch_size_per_gpu, cfg.ibot
    n_tokens = (cfg.crops.global_crops_size // cfg.student.patch_size) ** 2
    r_min, r_max = ibot.mask_ratio_min_max
    masked_crops = int(2 * batch_size * ibot.mask_sample_probability)
    return masked_crops * n_tokens * (r_min + r_max) / 2 / batch_size


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def all_finite(values: list[torch.Tensor], env: DistEnv) -> bool:
    """True when every value is finite on every rank (all ranks agree, so they skip or step together)."""
    flag = torch.tensor([float(all(bool(torch.isfinite(v).all()) for v in values))], device=values[0].device)
    if env.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def reduce_mean(values: dict[str, float], env: DistEnv, device: torch.device) -> dict[str, float]:
    if env.world_size == 1:
        return values
    stacked = torch.tensor(list(values.values()), device=device, dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / env.world_size).tolist()))


def gather_teacher_state(model: StudentTeacher, sharded: bool) -> dict[str, torch.Tensor]:
    """The full teacher state dict on CPU (``backbone.*``, ``dino_head.*``...). Under FSDP a collective that every
    rank enters; only rank 0 receives the tensors (the others get ``{}``)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.teacher.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model.teacher, options=options)


def export_teacher(teacher_state: dict[str, torch.Tensor], output_dir: Path, iteration: int,
                   spec: BackboneSpec) -> Path:
    """``eval/training_<it>/``: ``teacher_checkpoint.pth`` in the official layout, plus the backbone in the hub
    layout as ``teacher_backbone_hub.pth`` and ``teacher_backbone_hub.safetensors``; each records ``spec``."""
    from dinov2.weights import export_backbone

    folder = output_dir / "eval" / f"training_{iteration}"
    record = {"teacher": teacher_state, "backbone_spec": spec.to_record()}
    write_atomic(folder / "teacher_checkpoint.pth", lambda f: torch.save(record, f))
    backbone = {k.removeprefix("backbone."): v for k, v in teacher_state.items() if k.startswith("backbone.")}
    export_backbone(backbone, folder / "teacher_backbone_hub.pth", layout="hub", spec=spec)
    export_backbone(backbone, folder / "teacher_backbone_hub.safetensors", layout="hub", spec=spec)
    return folder


def knn_backbones(model: torch.nn.Module, exports: dict[Path, dict[str, torch.Tensor]],
                  students: dict[str, StudentConfig], img_size: int, device: torch.device,
                  sharded: bool) -> dict[str, torch.nn.Module]:
    """The EMA backbones for rank 0's kNN check by student name ("" without distillation): the live modules, or
    unsharded copies under FSDP (a sharded forward on one rank would wait forever for the others), built from
    ``students`` (the student section by the same names) at ``img_size``."""
    live = ema_backbones(model)
    if not sharded:
        return live
    copies = {}
    for name, state in zip(live, exports.values()):
        _, backbone = build_backbones(students[name], img_size)
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                  if k.startswith("backbone.")})
        copies[name] = backbone.to(device).eval()
    return copies


def accumulate_gradients(forward_model: torch.nn.Module, model: StudentTeacher, batch: dict, n: int,
                         teacher_temp: float, scaler: torch.amp.GradScaler | None,
                         autocast: tuple[str, torch.dtype, bool]) -> dict[str, torch.Tensor]:
    """Gradient accumulation over ``n`` micro-batches of ``batch``: the large-batch step, in pieces.

    First the teacher logits of every micro-batch; then the targets over all of them at once (one center update,
    Sinkhorn-Knopp over the whole step's rows); then per micro-batch the student losses, each back-propagated with
    weight 1/n (the large batch's losses are means over images, so this sums to its gradient). Under DDP the
    gradient all-reduce runs once, with the last micro-batch. Returns the loss terms averaged over micro-batches.
    """
    device_type, dtype, enabled = autocast
    micro_batches = split_micro_batches(batch, n)
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        logits = [model.teacher_logits(micro) for micro in micro_batches]
    targets = model.targets_from_logits(logits, teacher_temp)
    no_sync = getattr(forward_model, "no_sync", None)  # DDP: reduce gradients only after the last micro-batch
    sums: dict[str, torch.Tensor] = {}
    for k, (micro, micro_targets) in enumerate(zip(micro_batches, targets)):
        last = k == n - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                terms = forward_model(micro, teacher_temp, targets=micro_targets)
            loss = terms["total_loss"] / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach() / n
    return sums


def train(cfg: TrainConfig, env: DistEnv, resume: bool = True, preemption: StopRequest | None = None) -> dict:
    """Train until ``cfg.max_iter``, resuming from the newest valid checkpoint in ``train.output_dir``.

    Returns:
        A summary: ``iteration`` (last finished), ``losses`` (per-step total loss of this call),
        ``skipped_steps``, ``images_skipped`` (corrupt inputs) and ``stopped_for_preemption``.

    Args:
        cfg: the run's config; the regime for its total batch is resolved here (``dinov2.train.regime``).
        preemption: asked once per iteration whether to save and stop (``dinov2.run.preemption``); None: never.
    """
    cfg, regime = resolve_regime(cfg, env.world_size)
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device, env)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    autocast_dtype = resolve_autocast_dtype(cfg.train.autocast_dtype, device)
    use_autocast = autocast_dtype != torch.float32

    # distillation: resolve the frozen teacher; one without heads first gets them from a head-fitting run
    plan = plan_distillation(cfg, resume, env.is_main) if cfg.distillation.enabled else None
    if plan is not None and plan.head_fit is not None:
        fitted = train(plan.head_fit, env, resume, preemption)
        if fitted["stopped_for_preemption"]:
            return fitted

    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights without a broadcast
    model = (build_distillation(cfg, plan) if plan is not None else build_student_teacher(cfg)).to(device)
    load_initial_weights(model, cfg.student.pretrained_weights)
    init_phase_from(model, cfg.train, resume)  # train.init_from (e.g. the 518 px phase), only without own checkpoint
    model.train()
    # Counted on rank 0 alone, so before sharding turns every forward into a collective.
    if not env.is_main:
        image_flops = 0.0
    elif plan is not None:
        image_flops = distillation_flops_per_image(model, cfg.crops, device)
    else:
        image_flops = flops_per_image(model, cfg.crops, device, expected_masked_tokens(cfg))
    checkpoint_dir = latest_checkpoint(output_dir) if resume else None
    if checkpoint_dir is None and cfg.MODEL.WEIGHTS:
        weights = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(weights.get("model", weights))
        logger.info("initialised the whole model from MODEL.WEIGHTS=%s", cfg.MODEL.WEIGHTS)
    strategy = parallel.resolve_strategy(cfg.train.strategy, env, device)
    # wrapped before the optimizer is built: it must see the sharded parameters
    forward_model = parallel.wrap_student_teacher(model, strategy, cfg.compute_precision, env, device)
    sharded = parallel.is_sharded(model)
    seed_everything(cfg.train.seed + env.rank)  # per-rank streams (stochastic depth) from here on
    optimizer = build_optimizer(
        build_param_groups(dict(model.student.items()), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
        cfg.optim.adamw_beta1,
        cfg.optim.adamw_beta2,
    )
    use_scaler = cfg.compute_precision.grad_scaler and (
        autocast_dtype == torch.float16 or parallel.computes_in_fp16(model, cfg.compute_precision.student, device)
    )
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    accum_steps = cfg.train.grad_accum_steps
    images_per_step = total_batch_size(cfg.train, env.world_size)
    peak_lr = scaled_lr(cfg.optim, images_per_step)
    schedules = build_schedules(cfg.optim, cfg.teacher, cfg.train.OFFICIAL_EPOCH_LENGTH, peak_lr)
    max_iter = cfg.max_iter

    start_iter, skipped_images_total, saved_rng = 0, {}, None
    if checkpoint_dir is not None:
        resumed = restore_newest_loadable(output_dir, model, optimizer, scaler, env)  # skips corrupt ones
        start_iter = resumed["iteration"] + 1
        skipped_images_total = dict(resumed.get("images_skipped", {}))
        saved_rng = resumed.get("rng")
        if saved_rng is None:
            # Saved at another world size: per-rank streams cannot carry over, so fresh ones derive from
            # (seed, rank, iteration); the data stream still continues at the global batch index.
            seed_everything(cfg.train.seed + env.rank + 1_000_003 * start_iter)

    loader = build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=env.rank,
                                world_size=env.world_size, start_batch=start_iter,
                                pin_memory=env.device.type == "cuda")
    if checkpoint_dir is None:  # a resumed run's totals already hold what the listing left out
        # Files the listing refused (FIFOs, broken links, cut images of a truncated shard ...) count as skipped
        # images from the start, so the summary and the checkpoints say what the run never saw.
        for reason, count in getattr(loader.dataset.source, "listing_skips", {}).items():
            skipped_images_total[reason] = skipped_images_total.get(reason, 0) + int(count)
    metrics = MetricLogger(output_dir, cfg.train.log_period, max_iter, env.is_main, cfg.train.tensorboard)
    logger.info(regime.describe())
    floor = cfg.optim.scaling_min_total_batch
    logger.info("lr %.3g (%s rule for a total batch of %d = %d ranks x %d images x %d micro-batches%s); "
                "%.3g GFLOP per image", peak_lr, cfg.optim.scaling_rule, images_per_step, env.world_size,
                cfg.train.batch_size_per_gpu, accum_steps,
                f", scaled as {floor}" if floor > images_per_step else "", image_flops / 1e9)
    collapse = CollapseMonitor(cfg.dino.head_n_prototypes, cfg.train.log_period, cfg.train.collapse_patience)
    spikes = LossSpikeDetector(cfg.train.loss_spike_window, cfg.train.loss_spike_threshold)
    anomalies = AnomalyLog(output_dir, env.rank)
    student_groups = {
        name: [p for p in module.parameters() if p.requires_grad] for name, module in model.student.items()
    }

    losses_seen: list[float] = []
    consecutive_nonfinite, skipped_steps, stopped = 0, 0, False
    iteration = start_iter - 1
    step_start = time.perf_counter()
    for iteration, batch in zip(range(start_iter, max_iter), loader):
        if saved_rng is not None:  # after the first fetch: starting the loader draws from the global RNG
            restore_rng_state(saved_rng)
            saved_rng = None
        # --- schedules ---
        hp = schedules.at(iteration)
        apply_schedules(optimizer, hp["lr"], hp["wd"], hp["last_layer_lr"])
        data_time = time.perf_counter() - step_start
        for reason, count in batch.get("skipped", {}).items():
            skipped_images_total[reason] = skipped_images_total.get(reason, 0) + int(count)
        batch = batch_to_device(batch, device)

        # --- forward and loss (centers are restored if this step turns out non-finite) ---
        centers_before = {k: v.clone() for k, v in model.dino_loss.state_dict().items()}
        ibot_centers_before = {k: v.clone() for k, v in model.ibot_patch_loss.state_dict().items()}
        optimizer.zero_grad(set_to_none=True)
        if accum_steps == 1:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                loss_terms = forward_model(batch, hp["teacher_temp"])
            total_loss = loss_terms["total_loss"]

            # --- backward ---
            (scaler.scale(total_loss) if scaler is not None else total_loss).backward()
        else:
            loss_terms = accumulate_gradients(forward_model, model, batch, accum_steps, hp["teacher_temp"], scaler,
                                              (device.type, autocast_dtype, use_autocast))
        if strategy == "none" and env.world_size > 1:
            parallel.average_gradients(student_groups, env)
        backbone_frozen = freeze_backbone_grads(model, cfg.train.head_warmup_iters, iteration)  # head-only warm-up

        # --- gradient clipping, per student submodule as the official trainer ---
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
        grad_norms = parallel.clip_grad_norms(student_groups, max_norm)  # global norms, also over FSDP shards

        # --- non-finite guard: skip the optimizer, EMA and center updates together ---
        if not all_finite([t.detach() for t in loss_terms.values()] + list(grad_norms.values()), env):
            consecutive_nonfinite += 1
            skipped_steps += 1
            model.dino_loss.load_state_dict(centers_before)
            model.ibot_patch_loss.load_state_dict(ibot_centers_before)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # lets the fp16 loss scale back off
            terms = {k: float(v.detach()) for k, v in loss_terms.items()}
            terms.update({f"grad_norm_{k}": float(v) for k, v in grad_norms.items()})
            anomalies.record(iteration, "nonfinite", terms, batch.get("sample_keys", []))
            logger.warning("non-finite loss or gradient at iteration %d (%s); step skipped, batch keys in %s",
                           iteration, terms, anomalies.path)
            if cfg.train.nonfinite_policy == "abort" or consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {iteration} ({consecutive_nonfinite} consecutive); stopping"
                )
            step_start = time.perf_counter()
            continue
        consecutive_nonfinite = 0

        # --- optimizer step ---
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

        # --- EMA teacher ---
        if sharded:
            parallel.reshard_teacher(model)  # EMA on local shards: the gathered root weights must be freed first
        if backbone_frozen:
            update_teacher_heads(model, hp["mom"])
        else:
            parallel.update_teacher(model, ema_momentum(model, hp["mom"]))

        # --- metrics ---
        values = {k: float(v.detach()) for k, v in loss_terms.items()}
        losses_seen.append(values["total_loss"])
        if spikes.is_spike(values["total_loss"]):  # this rank's own loss: the keys below are its batch
            anomalies.record(iteration, "spike", values, batch.get("sample_keys", []))
            logger.warning("loss spike at iteration %d on rank %d: %.4g; batch keys in %s", iteration, env.rank,
                           values["total_loss"], anomalies.path)
        values = reduce_mean(values, env, device)
        step_time = time.perf_counter() - step_start
        images_per_s = images_per_step / max(step_time, 1e-9)
        values.update(hp)
        values.update({f"grad_norm_{k}": float(v) for k, v in grad_norms.items()})
        values.update(
            iter_time=step_time,
            data_time=data_time,
            images_per_s=images_per_s,
            tflops=image_flops * images_per_s / 1e12,
            max_mem_mb=peak_memory_mb(device),
        )
        metrics.update(iteration, values)
        if "dino_teacher_entropy" in values:
            event = collapse.update(iteration, values["dino_teacher_entropy"])
            if event is not None:
                logger.warning(describe_collapse(event, iteration))
                metrics.event(iteration, event)

        # --- checkpoint, teacher export, preemption ---
        last = iteration == max_iter - 1
        stopped = preemption is not None and preemption.should_stop(env)
        if (iteration + 1) % cfg.train.checkpoint_period == 0 or last or stopped:
            save_training_state(model, optimizer, scaler, iteration, skipped_images_total, output_dir,
                                cfg.train.max_to_keep, env)
        export_now = (iteration + 1) % cfg.evaluation.eval_period_iterations == 0 or last
        gather = export_now and (sharded or env.is_main)  # a collective under FSDP, rank 0's business otherwise
        teacher_state = gather_teacher_state(model, sharded) if gather else {}
        if env.is_main and export_now:
            exports = ema_exports(model, teacher_state, output_dir)  # distillation: one per student
            for (folder, state), backbone in zip(exports.items(), ema_backbones(model).values()):
                export_teacher(state, folder, iteration, spec_of_module(backbone))
            if cfg.evaluation.knn_train_dataset and cfg.evaluation.knn_val_dataset:
                students = (cfg.distillation.student_configs(cfg.student) if cfg.distillation.enabled
                            else {"": cfg.student})
                backbones = knn_backbones(model, exports, students, cfg.crops.global_crops_size, device, sharded)
                for name, backbone in backbones.items():
                    knn = evaluate_knn(backbone, cfg.evaluation.knn_train_dataset,
                                       cfg.evaluation.knn_val_dataset, image_size=cfg.crops.global_crops_size)
                    logger.info("kNN top-1 at iteration %d %s: %s", iteration, name, knn["top1"])
                    prefix = f"{name}/" if name else ""
                    metrics.update(iteration, {f"{prefix}knn_top1_k{k}": v for k, v in knn["top1"].items()})
        if stopped:
            logger.info("preemption requested: saved at iteration %d, requeueing", iteration)
            metrics.close()  # under SLURM requeue() never returns
            preemption.requeue(env)
            break
        step_start = time.perf_counter()

    metrics.close()
    return {
        "iteration": iteration,
        "losses": losses_seen,
        "skipped_steps": skipped_steps,
        "images_skipped": skipped_images_total,
        "stopped_for_preemption": stopped,
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
