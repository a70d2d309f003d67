"""Training configuration: typed, validated dataclasses that use the official DINOv2 key names.

Every key of the official ``ssl_default_config.yaml`` exists here with its official default, so an official override
file (``vitl14.yaml`` style) loads unchanged. Keys we add are documented where they are declared. Loading merges, in
order: these defaults, ``configs/train/ssl_default.yaml`` (the same values, written out for users to read), the
user's override file, then ``key=value`` dot-list overrides (:mod:`dinov2.io.yaml_config`, shared with the
curation CLI). An unknown key or a value of the wrong type is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.io.atomic import write_text_atomic
from dinov2.io.yaml_config import ConfigError, load_typed_config

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "train" / "ssl_default.yaml"

DTYPES = ("fp32", "fp16", "bf16")
SHARDING_STRATEGIES = ("NO_SHARD", "SHARD_GRAD_OP", "FULL_SHARD")
PARALLEL_STRATEGIES = ("auto", "fsdp", "ddp", "none")  # train.strategy, see dinov2/distributed/parallel.py
# the names dinov2.models.registry builds (an official "_memeff" suffix is accepted); tests keep the two in step
BACKBONE_ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2", "vit_custom")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_range(key: str, pair: list[float], low: float = 0.0, high: float = 1.0) -> None:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ConfigError(f"{key}: expected [min, max] with {low} <= min <= max <= {high}, got {list(pair)}")


def _check_probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: expected a probability in [0, 1], got {value}")


def _check_finite(section: Any, prefix: str = "") -> None:
    """Every float (and list of floats) under ``section`` is finite; ConfigError naming the first key that is not."""
    for item in fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if is_dataclass(value):
            _check_finite(value, key + ".")
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key}: must be a finite number, got {value}")


# --- compute_precision: kept at the official depth so official files load; read by the FSDP strategy -------------


@dataclass
class MixedPrecisionConfig:
    param_dtype: str = "fp16"
    reduce_dtype: str = "fp16"
    buffer_dtype: str = "fp32"


@dataclass
class ModulePrecisionConfig:
    sharding_strategy: str = "SHARD_GRAD_OP"
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)


def _head_precision() -> ModulePrecisionConfig:
    # The official recipe reduces student head gradients in fp32.
    return ModulePrecisionConfig(mixed_precision=MixedPrecisionConfig(reduce_dtype="fp32"))


@dataclass
class TeacherPrecisionConfig:
    backbone: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)
    dino_head: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)
    ibot_head: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)


@dataclass
class StudentPrecisionConfig:
    backbone: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)
    dino_head: ModulePrecisionConfig = field(default_factory=_head_precision)
    ibot_head: ModulePrecisionConfig = field(default_factory=_head_precision)


@dataclass
class ComputePrecisionConfig:
    grad_scaler: bool = True
    teacher: TeacherPrecisionConfig = field(default_factory=TeacherPrecisionConfig)
    student: StudentPrecisionConfig = field(default_factory=StudentPrecisionConfig)

    def validate(self) -> None:
        for role in ("teacher", "student"):
            for module in ("backbone", "dino_head", "ibot_head"):
                prefix = f"compute_precision.{role}.{module}"
                cfg: ModulePrecisionConfig = getattr(getattr(self, role), module)
                _check_choice(f"{prefix}.sharding_strategy", cfg.sharding_strategy, SHARDING_STRATEGIES)
                for name in ("param_dtype", "reduce_dtype", "buffer_dtype"):
                    _check_choice(f"{prefix}.mixed_precision.{name}", getattr(cfg.mixed_precision, name), DTYPES)


# --- the sections users edit ------------------------------------------------------------------------------------


@dataclass
class ModelWeightsConfig:
    WEIGHTS: str = ""  # initial weights used only when the output directory holds no checkpoint


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1
    # ours: rows of earlier steps' teacher logits that Sinkhorn-Knopp also normalises over (SwAV's queue; 0 = none,
    # official). Set by the small-batch regime (see SmallBatchConfig); only read with train.centering=sinkhorn_knopp.
    sinkhorn_queue_size: int = 0

    def validate(self) -> None:
        _check_positive("dino.head_n_prototypes", self.head_n_prototypes)
        _check_positive("dino.sinkhorn_queue_size", self.sinkhorn_queue_size, allow_zero=True)


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class TrainSection:
    batch_size_per_gpu: int = 64
    dataset_path: str = "ImageNet:split=TRAIN"  # ours: an image folder, .tar shards (globs / braces) or a file list
    output_dir: str = "."
    saveckp_freq: int = 20  # accepted for compatibility; never read (as in the official code)
    seed: int = 0  # read here (the official code ignores it)
    num_workers: int = 10
    OFFICIAL_EPOCH_LENGTH: int = 1250
    cache_dataset: bool = True  # accepted for compatibility; never read (as in the official code)
    centering: str = "centering"
    # --- ours ---
    device: str = "auto"  # auto | cpu | cuda
    # auto | bf16 | fp16 | fp32: torch.autocast dtype; auto is bf16 on CUDA and on CPUs with native bf16 matmul (AMX,
    # AVX512-BF16; measured once per process), else fp32 (emulated bf16 is ~30x slower); the choice is logged
    autocast_dtype: str = "auto"
    checkpoint_period: int = 3750  # iterations between periodic checkpoints (official: 3 epochs)
    max_to_keep: int = 3  # periodic checkpoints retained (the newest valid one is never deleted)
    log_period: int = 10  # iterations between metric lines
    nonfinite_policy: str = "skip"  # skip | abort: what a NaN/inf loss or grad norm does
    max_consecutive_nonfinite: int = 3  # abort after this many non-finite steps in a row
    # a loss this many robust std devs above the median of the last loss_spike_window steps is logged with its batch
    # keys to logs/anomalies.jsonl (0 disables; logging only, see dinov2/train/anomaly.py)
    loss_spike_threshold: float = 8.0
    loss_spike_window: int = 100
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise resume checks
    max_iter: int = -1  # stop after this many iterations (-1: optim.epochs * OFFICIAL_EPOCH_LENGTH)
    tensorboard: bool = False  # also log to TensorBoard (JSON lines are always written)
    # auto | fsdp | ddp | none; auto: none at world size 1, else fsdp on CUDA, ddp on CPU (distributed/parallel.py)
    strategy: str = "auto"
    # Phase start (e.g. the 518 px adaptation, dinov2/train/highres.py), used only while output_dir has no checkpoint:
    # a run's output dir (its newest checkpoint), a checkpoint dir/file, or a backbone file in any supported layout.
    init_from: str = ""
    init_heads: str = "checkpoint"  # checkpoint | fresh: heads and loss centers from init_from, or newly initialised
    head_warmup_iters: int = 0  # first iterations train the heads only (backbone grads dropped, its EMA paused)
    # Micro-batches of batch_size_per_gpu per optimizer step: the total batch is world size x batch_size_per_gpu x
    # grad_accum_steps. Teacher targets (centers, Sinkhorn-Knopp) are computed over the whole step's images, as at
    # the larger batch; KoLeo's nearest neighbours stay within a micro-batch (as within a GPU's batch officially).
    grad_accum_steps: int = 1
    # Warn once (log + a collapse_warning line in training_metrics.json) when the DINO teacher targets stay uniform
    # or one-hot for this many consecutive log periods (dinov2/train/collapse.py); 0 disables.
    collapse_patience: int = 5

    def validate(self) -> None:
        _check_positive("train.batch_size_per_gpu", self.batch_size_per_gpu)
        _check_positive("train.num_workers", self.num_workers, allow_zero=True)
        _check_positive("train.OFFICIAL_EPOCH_LENGTH", self.OFFICIAL_EPOCH_LENGTH)
        _check_choice("train.centering", self.centering, ("centering", "sinkhorn_knopp"))
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("train.autocast_dtype", self.autocast_dtype, ("auto", *DTYPES))
        _check_positive("train.checkpoint_period", self.checkpoint_period)
        _check_positive("train.max_to_keep", self.max_to_keep)
        _check_positive("train.log_period", self.log_period)
        _check_choice("train.nonfinite_policy", self.nonfinite_policy, ("skip", "abort"))
        _check_positive("train.max_consecutive_nonfinite", self.max_consecutive_nonfinite)
        _check_positive("train.loss_spike_threshold", self.loss_spike_threshold, allow_zero=True)
        if self.loss_spike_window < 4:
            raise ConfigError(f"train.loss_spike_window: must be >= 4, got {self.loss_spike_window}")
        _check_choice("train.strategy", self.strategy, PARALLEL_STRATEGIES)
        _check_choice("train.init_heads", self.init_heads, ("checkpoint", "fresh"))
        if self.max_iter == 0 or self.max_iter < -1:
            raise ConfigError(f"train.max_iter: must be >= 1, or -1 for optim.epochs x OFFICIAL_EPOCH_LENGTH; got "
                              f"{self.max_iter}")
        _check_positive("train.head_warmup_iters", self.head_warmup_iters, allow_zero=True)
        _check_positive("train.grad_accum_steps", self.grad_accum_steps)
        _check_positive("train.collapse_patience", self.collapse_patience, allow_zero=True)


@dataclass
class StudentConfig:
    arch: str = "vit_large"
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: float = 1.0e-05
    drop_path_uniform: bool = True
    pretrained_weights: str = ""  # ours: any official/timm/HF/our layout, loaded strictly into student and teacher
    ffn_layer: str = "mlp"
    block_chunks: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    # --- ours ---
    attn_backend: str = "auto"  # auto | sdpa | xformers | eager (env DINOV2_ATTN_BACKEND overrides)
    # any-size ViT when arch is "vit_custom"
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6

    def validate(self) -> None:
        _check_choice("student.arch", self.arch.removesuffix("_memeff"), BACKBONE_ARCHS)
        _check_positive("student.patch_size", self.patch_size)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"student.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")
        _check_choice("student.ffn_layer", self.ffn_layer, ("mlp", "swiglu", "swiglufused", "identity"))
        _check_positive("student.block_chunks", self.block_chunks, allow_zero=True)
        _check_positive("student.num_register_tokens", self.num_register_tokens, allow_zero=True)
        _check_choice("student.attn_backend", self.attn_backend, ("auto", "sdpa", "xformers", "eager"))
        if self.arch == "vit_custom" and self.embed_dim % self.num_heads:
            raise ConfigError(f"student.embed_dim: {self.embed_dim} is not divisible by num_heads={self.num_heads}")


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30

    def validate(self) -> None:
        for key in ("momentum_teacher", "final_momentum_teacher"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"teacher.{key}: must be in [0, 1], got {getattr(self, key)}")
        _check_positive("teacher.warmup_teacher_temp", self.warmup_teacher_temp)
        _check_positive("teacher.teacher_temp", self.teacher_temp)


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004  # for a total batch of 1024
    lr: float = 0.0  # placeholder kept for compatibility; the scaled lr is derived by `scaled_lr`
    warmup_epochs: int = 10
    min_lr: float = 1.0e-06
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    scaling_rule: str = "sqrt_wrt_1024"
    # ours: the scaling rule treats a smaller total batch as this many images (0: off, the official rule). The sqrt
    # rule's peak lr at a total batch of 32 is 5.7x below its value at 1024 and a short run's student barely moves.
    scaling_min_total_batch: int = 0
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def validate(self) -> None:
        _check_positive("optim.epochs", self.epochs)
        _check_positive("optim.base_lr", self.base_lr, allow_zero=True)
        _check_positive("optim.clip_grad", self.clip_grad, allow_zero=True)
        _check_choice("optim.scaling_rule", self.scaling_rule, ("sqrt_wrt_1024", "linear_wrt_256", "none"))
        _check_positive("optim.scaling_min_total_batch", self.scaling_min_total_batch, allow_zero=True)
        # the official CosineScheduler cannot build a warm-up longer than the run (the last layer's freeze is a
        # zeroed prefix of the same schedule, so it needs no room of its own)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"optim.warmup_epochs: {self.warmup_epochs} is longer than optim.epochs={self.epochs}")


@dataclass
class CropsConfig:
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 96
    # ours: "intended" applies blur with probability 1.0 / 0.1 / 0.5 (global 1 / global 2 / local) as the official
    # code documents; "official" reproduces its inverted behaviour (0.0 / 0.9 / 0.5) that the released weights saw.
    blur_mode: str = "intended"

    def validate(self) -> None:
        _check_range("crops.global_crops_scale", self.global_crops_scale)
        _check_range("crops.local_crops_scale", self.local_crops_scale)
        _check_positive("crops.local_crops_number", self.local_crops_number, allow_zero=True)
        _check_positive("crops.global_crops_size", self.global_crops_size)
        _check_positive("crops.local_crops_size", self.local_crops_size)
        _check_choice("crops.blur_mode", self.blur_mode, ("intended", "official"))


@dataclass
class SmallBatchConfig:
    """ours: the small-batch regime, chosen from the total batch (world size x batch_size_per_gpu x grad_accum_steps).

    The official recipe was only ever run at a total batch of 1024-2048. Below ``below_total_batch`` (small data,
    small models, short runs) its teacher temperature (0.04 warming up to 0.07) is too high for the spread of the
    teacher's logits across images, and centering then leaves near-uniform targets; the sqrt lr rule also shrinks the
    peak lr 5.7x at a total batch of 32, and a short run's EMA teacher (momentum 0.992 -> 1) barely leaves its random
    init. When the regime is on, its values replace the official keys they name in the config the run uses (logged
    at start); at or above the threshold nothing changes, bit for bit. ``mode``: auto (on below the threshold; the
    default, measured in README "Small batches") | always | never (the official recipe).
    """

    mode: str = "auto"
    below_total_batch: int = 1024
    teacher_temp: float = 0.02  # -> teacher.warmup_teacher_temp and teacher.teacher_temp (constant, no warm-up)
    centering: str = "sinkhorn_knopp"  # keep | centering | sinkhorn_knopp -> train.centering
    # -> dino.sinkhorn_queue_size when Sinkhorn-Knopp is used: 2048 rows keeps K = 65536 prototypes at the official
    # ~32 per row (a batch of n rows alone forces every target over at least K / n prototypes)
    sinkhorn_queue_size: int = 2048
    # -> optim.scaling_min_total_batch: the lr scaling rule stops shrinking the peak lr below this total batch
    lr_scaling_min_total_batch: int = 256
    # -> teacher.momentum_teacher in runs too short for it: the start momentum is lowered (never raised) until the
    # EMA's momentum schedule sums to at least this many time constants, sum_t (1 - m_t) (the teacher then keeps a
    # share exp(-sum) of its random init). The official 0.992 -> 1 over 125k iterations sums to 500; the same start
    # over 600 iterations to 2.4. 0 keeps the configured momentum.
    teacher_ema_time_constants: float = 6.0

    def validate(self) -> None:
        _check_choice("small_batch.mode", self.mode, ("auto", "always", "never"))
        _check_positive("small_batch.below_total_batch", self.below_total_batch)
        _check_positive("small_batch.teacher_temp", self.teacher_temp)
        _check_choice("small_batch.centering", self.centering, ("keep", "centering", "sinkhorn_knopp"))
        _check_positive("small_batch.sinkhorn_queue_size", self.sinkhorn_queue_size, allow_zero=True)
        _check_positive("small_batch.lr_scaling_min_total_batch", self.lr_scaling_min_total_batch, allow_zero=True)
        _check_positive("small_batch.teacher_ema_time_constants", self.teacher_ema_time_constants, allow_zero=True)


@dataclass
class EvaluationConfig:
    eval_period_iterations: int = 12500  # teacher export (and kNN, when knn_train_dataset is set) period
    # ours: labelled image folders for a kNN check during training (empty: export only)
    knn_train_dataset: str = ""
    knn_val_dataset: str = ""

    def validate(self) -> None:
        _check_positive("evaluation.eval_period_iterations", self.eval_period_iterations)


STUDENT_NAME = re.compile(r"^[A-Za-z0-9]+([-_][A-Za-z0-9]+)*$")  # no "__": it separates name and part in the model


@dataclass
class DistillationConfig:
    """Distillation of a frozen pretrained teacher into smaller students (DINOv2 paper, "Distillation of pretrained
    features"; key names as the official DINOv3 ``distillation`` section). See ``dinov2/train/distill.py``.

    With ``enabled``, the ``student`` section (or each ``students`` entry) is a model trained from scratch against
    the frozen teacher with the same DINO + iBOT + KoLeo objective; ``dino``/``ibot`` describe the students' heads
    and loss weights (their prototype counts must equal the teacher's).
    """

    enabled: bool = False
    # the teacher's training config (its student/dino/ibot sections give the teacher's backbone and heads); "" reads
    # config.yaml of the run that checkpoint_path lies in (e.g. configs/train/vitg14.yaml for the released ViT-g)
    full_cfg_path: str = ""
    # the teacher's weights: a run dir (newest checkpoint), a checkpoint, an official teacher_checkpoint.pth, or a
    # backbone file in any layout dinov2.weights reads (released backbones: heads are fitted first, below)
    checkpoint_path: str = ""
    # ours: iterations of the head-only run that fits DINO/iBOT heads on a frozen teacher backbone without heads
    head_fit_iters: int = 1000
    # ours, not the paper's recipe (0 keeps it exactly): weight of a feature term in which each student's CLS and
    # global-crop patch tokens, through a linear projection to the teacher's width, regress the teacher's by cosine
    # distance (dinov2/loss/feature_distillation_loss.py); for teachers whose heads hold less than their features
    feature_loss_weight: float = 0.0
    # ours: the spare EMA (the final model) averages the student over about this fraction of the run, at the constant
    # momentum 1 - 1 / max(1, ema_horizon * train.max_iter); 0 follows the teacher-momentum schedule instead, whose
    # cosine rise to 1 freezes the EMA about halfway through a short run (see dinov2/models/distillation.py)
    ema_horizon: float = 0.1
    # ours: several students from one teacher forward per batch: [{name: vits14, arch: vit_small, ...}], each entry
    # overriding keys of the student section; empty: one student, the student section itself, named "student"
    students: list[dict[str, Any]] = field(default_factory=list)

    def student_configs(self, base: StudentConfig) -> dict[str, StudentConfig]:
        """Name -> the student's architecture: ``base`` with the entry's keys replaced (validated).

        Raises:
            ConfigError: a missing, malformed or repeated name, an unknown key, or an invalid value.
        """
        if not self.students:
            return {"student": base}
        known = {f.name for f in fields(StudentConfig)}
        out: dict[str, StudentConfig] = {}
        for index, entry in enumerate(self.students):
            prefix = f"distillation.students[{index}]"
            name = str(entry.get("name", ""))
            if not STUDENT_NAME.match(name):
                raise ConfigError(f"{prefix}.name: {name!r} must be letters/digits joined by single '-' or '_'")
            if name in out:
                raise ConfigError(f"{prefix}.name: {name!r} is used twice")
            unknown = sorted(set(entry) - known - {"name"})
            if unknown:
                raise ConfigError(f"unknown config key '{prefix}.{unknown[0]}' (a student section key was expected)")
            overrides = {k: v for k, v in entry.items() if k != "name"}
            try:
                merged = OmegaConf.merge(OmegaConf.structured(base), overrides)
                student = replace(base, **OmegaConf.to_container(merged))
                student.validate()
            except OmegaConfBaseException as error:
                raise ConfigError(f"bad value in {prefix} ({name}): {str(error).strip().splitlines()[0]}") from None
            except ConfigError as error:
                raise ConfigError(str(error).replace("student.", f"{prefix}.", 1)) from None
            out[name] = student
        return out

    def validate(self, cfg: TrainConfig) -> None:
        if not self.enabled:
            return
        if not self.checkpoint_path:
            raise ConfigError("distillation.checkpoint_path: the teacher's weights are required when enabled")
        _check_positive("distillation.head_fit_iters", self.head_fit_iters, allow_zero=True)
        _check_positive("distillation.feature_loss_weight", self.feature_loss_weight, allow_zero=True)
        if not 0.0 <= self.ema_horizon <= 1.0:
            raise ConfigError(f"distillation.ema_horizon: must be a fraction of the run in [0, 1], got "
                              f"{self.ema_horizon}")
        for key, value in (("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS), ("student.pretrained_weights",
                           cfg.student.pretrained_weights), ("train.init_from", cfg.train.init_from)):
            if value:
                raise ConfigError(f"{key}: not used in distillation (students start from scratch); leave it empty")
        if cfg.train.head_warmup_iters:
            raise ConfigError("train.head_warmup_iters: not used in distillation; the teacher's heads are fitted "
                              "by distillation.head_fit_iters")
        if cfg.train.grad_accum_steps > 1:
            # Accumulation splits the teacher pass from the student losses; the distillation model has no such split.
            raise ConfigError("train.grad_accum_steps: > 1 is not supported with distillation.enabled yet")
        for name, student in self.student_configs(cfg.student).items():
            for key in ("global_crops_size", "local_crops_size"):
                size = getattr(cfg.crops, key)
                if size % student.patch_size:
                    raise ConfigError(f"crops.{key}: {size} is not a multiple of student {name}'s patch_size "
                                      f"{student.patch_size}")


@dataclass
class TrainConfig:
    MODEL: ModelWeightsConfig = field(default_factory=ModelWeightsConfig)
    compute_precision: ComputePrecisionConfig = field(default_factory=ComputePrecisionConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    train: TrainSection = field(default_factory=TrainSection)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    small_batch: SmallBatchConfig = field(default_factory=SmallBatchConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_finite(self)  # first: a NaN passes every range check (all comparisons with it are False)
        self.compute_precision.validate()
        self.dino.validate()
        self.small_batch.validate()
        self.train.validate()
        self.student.validate()
        self.teacher.validate()
        self.optim.validate()
        self.crops.validate()
        self.evaluation.validate()
        if self.dino.loss_weight <= 0 and self.ibot.loss_weight <= 0:
            raise ConfigError("dino.loss_weight: DINO and iBOT are both disabled; nothing would be trained")
        _check_range("ibot.mask_ratio_min_max", self.ibot.mask_ratio_min_max)
        _check_probability("ibot.mask_sample_probability", self.ibot.mask_sample_probability)
        if self.train.init_from and (self.MODEL.WEIGHTS or self.student.pretrained_weights):
            raise ConfigError("train.init_from: set either it or MODEL.WEIGHTS / student.pretrained_weights, not both")
        # with a students list the student section is only the base their entries override (checked per student)
        for key in ("global_crops_size", "local_crops_size") if not self.distillation.students else ():
            size = getattr(self.crops, key)
            if size % self.student.patch_size:
                patch = self.student.patch_size
                raise ConfigError(f"crops.{key}: {size} is not a multiple of student.patch_size={patch}")
        self.distillation.validate(self)

    @property
    def scheduled_iters(self) -> int:
        """Iterations the lr, wd, momentum and temperature schedules span: epochs x the official epoch length."""
        return self.optim.epochs * self.train.OFFICIAL_EPOCH_LENGTH

    @property
    def max_iter(self) -> int:
        """Total iterations: ``train.max_iter`` when set (it may stop a run before its schedules end), else
        ``scheduled_iters``."""
        if self.train.max_iter > 0:
            return self.train.max_iter
        return self.scheduled_iters


def total_batch_size(train: TrainSection, world_size: int) -> int:
    """Images per optimizer step over all ranks: world size x ``batch_size_per_gpu`` x ``grad_accum_steps``."""
    return train.batch_size_per_gpu * train.grad_accum_steps * world_size


def scaled_lr(optim: OptimConfig, total_batch: int) -> float:
    """The peak learning rate after the batch-size scaling rule (official: base_lr * sqrt(B_total / 1024)).

    Args:
        optim: ``base_lr``, ``scaling_rule`` and ``scaling_min_total_batch`` are read.
        total_batch: images per optimizer step over all ranks (``total_batch_size``).
    """
    total_batch = max(total_batch, optim.scaling_min_total_batch)
    if optim.scaling_rule == "sqrt_wrt_1024":
        return optim.base_lr * math.sqrt(total_batch / 1024.0)
    if optim.scaling_rule == "linear_wrt_256":
        return optim.base_lr * total_batch / 256.0
    return optim.base_lr


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Merge defaults, ``ssl_default.yaml``, an override file and dot-list overrides into a validated TrainConfig.

    Raises:
        ConfigError: one line naming the key, for an unknown key, a wrong type or an invalid value, or the file, for
            a missing file or one that is not a YAML mapping.
    """
    files = [DEFAULT_CONFIG_PATH, *([config_file] if config_file else [])]
    return load_typed_config(TrainConfig, files, overrides or [])


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
