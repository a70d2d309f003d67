"""Data-parallel strategies for the student/teacher pair: FSDP2 (``fully_shard``), DDP, or a manual all-reduce.

``train.strategy``:

- ``none``: no wrapper. At world size > 1 the trainer averages the flat student gradients with one all-reduce after
  backward (:func:`average_gradients`). The only strategy that runs without a process group.
- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel` around the whole :class:`StudentTeacher` (its forward
  is the one call per step). Teacher parameters do not require grad, so DDP reduces student gradients only. Buffers
  (the loss centers) are not broadcast: every rank already updates them with the same all-reduced statistics.
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on each backbone and each head, for student and
  teacher alike, on a 1-D mesh over all ranks. Mixed precision follows ``compute_precision.<role>.<module>``
  (``param_dtype``, ``reduce_dtype``) on CUDA; on CPU everything stays fp32 (gloo reduces fp32, and CPU half-precision
  matmuls are slower than fp32). ``sharding_strategy`` maps to ``reshard_after_forward``: ``FULL_SHARD`` frees the
  gathered weights after forward, ``SHARD_GRAD_OP`` and ``NO_SHARD`` keep them until backward. The teacher (no
  backward) always reshards, so its parameters are local shards again when the EMA runs.
- ``auto``: ``none`` at world size 1; ``fsdp`` on CUDA and ``ddp`` on CPU at world size > 1 (DDP's one all-reduce
  beats FSDP's per-block gathers for the small models one trains on CPU).

The model's parameter names never change (FSDP2 swaps parameters for DTensors in place; DDP is only used for its
forward), so checkpoints, exports and optimizer groups use the same keys under every strategy.

Takes the ``train.strategy`` value and the ``compute_precision`` config section, never the whole config.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from dinov2.config import ComputePrecisionConfig, ConfigError, ModulePrecisionConfig, StudentPrecisionConfig
from dinov2.distributed.env import DistEnv
from dinov2.layers import Block
from dinov2.models.distillation import precision_module, split_key
from dinov2.models.student_teacher import StudentTeacher

logger = logging.getLogger("dinov2")

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "NO_SHARD": False}


def resolve_strategy(strategy: str, env: DistEnv, device: torch.device) -> str:
    """``strategy`` (``train.strategy``) with ``auto`` resolved; ``fsdp``/``ddp`` need a process group (any world size).

    Raises:
        ConfigError: ``fsdp`` or ``ddp`` asked for in a process that joined no process group.
    """
    if strategy == "auto":
        if env.world_size == 1:
            return "none"
        return "fsdp" if device.type == "cuda" else "ddp"
    if strategy in ("fsdp", "ddp") and not dist.is_initialized():
        raise ConfigError(f"train.strategy: {strategy} needs a process group (torchrun, srun, or world size > 1)")
    return strategy


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _precision_policy(precision: ModulePrecisionConfig, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()  # fp32 everywhere
    mixed = precision.mixed_precision
    param_dtype = TORCH_DTYPES[mixed.param_dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=TORCH_DTYPES[mixed.reduce_dtype])


def computes_in_fp16(model: StudentTeacher, precision: StudentPrecisionConfig, device: torch.device) -> bool:
    """True when FSDP2 casts a student module's parameters to fp16 (the official default on CUDA): the gradients
    then need a loss scaler even without fp16 autocast.

    Args:
        precision: ``compute_precision.student``.
    """
    if device.type != "cuda" or not is_sharded(model):
        return False
    return any(getattr(precision, precision_module(split_key(name)[1])).mixed_precision.param_dtype == "fp16"
               for name in model.student)


def _roles(model: nn.Module) -> tuple[str, ...]:
    """The module dicts to shard: student and (EMA) teacher, plus a distillation run's frozen teacher."""
    return ("student", "teacher", "frozen_teacher") if hasattr(model, "frozen_teacher") else ("student", "teacher")


def shard_student_teacher(model: StudentTeacher, precision: ComputePrecisionConfig, device: torch.device) -> None:
    """Applies FSDP2 in place: each ``Block``, then each backbone and head root, of the student and the teacher,
    with the mixed precision and resharding of ``precision.<role>.<module>`` (a distillation run's frozen teacher
    takes the teacher's; a distillation key ``<student>__dino_head`` reads ``<role>.dino_head``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for role in _roles(model):
        role_precision = getattr(precision, "student" if role == "student" else "teacher")
        for name, module in getattr(model, role).items():
            module_precision: ModulePrecisionConfig = getattr(role_precision, precision_module(split_key(name)[1]))
            # Teachers never run backward, so only a resharding forward returns them to local shards for the EMA.
            reshard = True if role != "student" else _RESHARD_AFTER_FORWARD[module_precision.sharding_strategy]
            policy = _precision_policy(module_precision, device)
            for block in [m for m in module.modules() if isinstance(m, Block)]:
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)


def wrap_student_teacher(model: StudentTeacher, strategy: str, precision: ComputePrecisionConfig, env: DistEnv,
                         device: torch.device) -> nn.Module:
    """Applies ``strategy`` to ``model`` (already on ``device``).

    Args:
        strategy: ``none``, ``ddp`` or ``fsdp``, as :func:`resolve_strategy` returns it.
        precision: ``compute_precision``, read by ``fsdp`` only.

    Returns:
        The module to call for the training forward: ``model`` itself (``none``, ``fsdp``: sharded in place) or a
        DDP wrapper around it (``ddp``). Everything else (optimizer, EMA, checkpoints) keeps using ``model``.
    """
    logger.info("parallel strategy: %s (world size %d)", strategy, env.world_size)
    if strategy == "fsdp":
        shard_student_teacher(model, precision, device)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    return model


def reshard_teacher(model: StudentTeacher) -> None:
    """Frees gathered teacher weights (FSDP2 keeps a root module's weights gathered after forward)."""
    from torch.distributed.fsdp import FSDPModule

    for role in _roles(model)[1:]:
        for module in getattr(model, role).modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@torch.no_grad()
def update_teacher(model: StudentTeacher, momentum: float) -> None:
    """EMA ``teacher <- m * teacher + (1 - m) * student`` on local shards (identical to ``model.update_teacher``
    when nothing is sharded: student and teacher shards have the same layout, so the update is elementwise)."""
    teacher_params, student_params = [], []
    for name, teacher_module in model.teacher.items():
        teacher_params.extend(local(p) for p in teacher_module.parameters())
        student_params.extend(local(p) for p in model.student[name].parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


def clip_grad_norms(groups: dict[str, list[nn.Parameter]], max_norm: float) -> dict[str, torch.Tensor]:
    """Per-submodule clipping (official recipe); each norm is the global one, over all shards.

    ``clip_grad_norm_`` on DTensor gradients returns a DTensor whose value is already the all-reduced norm; it is
    returned as a plain scalar tensor so the non-finite guard and the metrics read one value on every rank.
    """
    from torch.distributed.tensor import DTensor

    norms = {}
    for name, params in groups.items():
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norms[name] = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return norms


def average_gradients(groups: dict[str, list[nn.Parameter]], env: DistEnv) -> None:
    """Strategy ``none`` at world size > 1: every rank ends the backward with the mean gradient."""
    grads = [p.grad for params in groups.values() for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


__all__ = [
    "average_gradients",
    "clip_grad_norms",
    "computes_in_fp16",
    "is_sharded",
    "local",
    "resolve_strategy",
    "reshard_teacher",
    "shard_student_teacher",
    "update_teacher",
    "wrap_student_teacher",
]
