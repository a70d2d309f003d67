"""The small-batch regime: resolved from the total batch (official values untouched at large batch), the
Sinkhorn-Knopp queue, and the collapse monitor."""

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from dinov2.config import ConfigError, load_config, scaled_lr
from dinov2.data import build_train_loader
from dinov2.distributed.env import DistEnv
from dinov2.loss import DINOLoss, sinkhorn_knopp
from dinov2.train.collapse import CollapseMonitor
from dinov2.train.regime import resolve_regime
from dinov2.train.schedules import build_schedules
from dinov2.train.train import build_student_teacher, train


def tiny(data: Path, out: Path, max_iter: int, *extra: str) -> list[str]:
    return [
        f"train.dataset_path={data}", f"train.output_dir={out}", "student.arch=vit_custom", "student.embed_dim=32",
        "student.depth=2", "student.num_heads=2", "student.patch_size=8", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "dino.head_n_prototypes=64",
        "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=64",
        "train.batch_size_per_gpu=4", "train.num_workers=0", f"train.max_iter={max_iter}",
        "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
        "teacher.warmup_teacher_temp_epochs=1", "train.device=cpu", "train.log_period=1", "train.checkpoint_period=5",
        "train.autocast_dtype=fp32", "train.deterministic=true", *extra,
    ]


@contextlib.contextmanager
def dinov2_log():
    """The text the trainer logs while inside (its logger may not propagate to the root)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("dinov2")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


# --- the regime resolver -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_gpu", "world", "accum"), [(64, 16, 1), (32, 32, 2), (256, 8, 1), (1024, 1, 1)])
def test_large_total_batch_resolves_to_the_official_config_itself(per_gpu, world, accum):
    cfg = load_config(None, [f"train.batch_size_per_gpu={per_gpu}", f"train.grad_accum_steps={accum}"])
    resolved, regime = resolve_regime(cfg, world)
    assert resolved is cfg and regime.name == "official" and regime.changes == {}
    # the official values (dinov2/configs/ssl_default_config.yaml)
    assert (resolved.train.centering, resolved.dino.sinkhorn_queue_size) == ("centering", 0)
    assert (resolved.teacher.warmup_teacher_temp, resolved.teacher.teacher_temp) == (0.04, 0.07)
    assert regime.total_batch == per_gpu * world * accum >= 1024


def test_large_batch_model_has_the_official_state_dict_keys():
    overrides = ["student.arch=vit_custom", "student.embed_dim=32", "student.depth=1", "student.num_heads=2",
                 "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
                 "ibot.head_n_prototypes=64", "train.batch_size_per_gpu=512", "train.centering=sinkhorn_knopp"]
    cfg, _ = resolve_regime(load_config(None, overrides), 2)
    assert not any("queue" in key for key in build_student_teacher(cfg).state_dict())


def test_regime_is_on_by_default_below_the_threshold_in_distillation_too():
    _, regime = resolve_regime(load_config(None, ["train.batch_size_per_gpu=8"]), 1)
    assert regime.name == "small_batch"
    distill = ["distillation.enabled=true", "distillation.checkpoint_path=/weights/teacher.pth"]
    resolved, regime = resolve_regime(load_config(None, ["train.batch_size_per_gpu=8", *distill]), 1)
    assert regime.name == "small_batch" and resolved.teacher.teacher_temp == 0.02
    assert resolved.optim.scaling_min_total_batch == 256 and resolved.dino.sinkhorn_queue_size == 0
    large = load_config(None, ["train.batch_size_per_gpu=512", *distill])
    resolved, regime = resolve_regime(large, 2)
    assert regime.name == "official" and resolved is large


def test_small_total_batch_resolves_to_the_small_batch_recipe():
    small = ["train.batch_size_per_gpu=16", "train.grad_accum_steps=2", "small_batch.mode=auto"]
    cfg = load_config(None, small)
    resolved, regime = resolve_regime(cfg, 2)
    assert regime.name == "small_batch" and regime.total_batch == 64
    assert resolved is not cfg and cfg.teacher.teacher_temp == 0.07  # the input is not modified
    assert resolved.teacher.warmup_teacher_temp == resolved.teacher.teacher_temp == 0.02
    assert resolved.train.centering == "sinkhorn_knopp" and resolved.dino.sinkhorn_queue_size == 2048
    assert regime.changes == {"teacher.warmup_teacher_temp": (0.04, 0.02), "teacher.teacher_temp": (0.07, 0.02),
                              "train.centering": ("centering", "sinkhorn_knopp"),
                              "dino.sinkhorn_queue_size": (0, 2048), "optim.scaling_min_total_batch": (0, 256)}
    assert "small_batch" in regime.describe() and "teacher.teacher_temp=0.02 (was 0.07)" in regime.describe()
    kept, _ = resolve_regime(load_config(None, [*small, "small_batch.centering=keep"]), 2)
    assert kept.train.centering == "centering" and kept.dino.sinkhorn_queue_size == 0  # kept: no queue
    sk_overrides = ["train.batch_size_per_gpu=16", "train.centering=sinkhorn_knopp", "small_batch.mode=auto",
                    "small_batch.centering=keep"]
    sk, _ = resolve_regime(load_config(None, sk_overrides), 1)
    assert sk.train.centering == "sinkhorn_knopp" and sk.dino.sinkhorn_queue_size == 2048  # SK gets its queue


def test_regime_is_overridable_by_config_keys():
    never, regime = resolve_regime(load_config(None, ["train.batch_size_per_gpu=8", "small_batch.mode=never"]), 1)
    assert regime.name == "official" and never.teacher.teacher_temp == 0.07
    always, regime = resolve_regime(load_config(None, ["small_batch.mode=always"]), 32)
    assert regime.name == "small_batch" and always.teacher.teacher_temp == 0.02
    overrides = ["small_batch.mode=auto", "small_batch.teacher_temp=0.05", "small_batch.sinkhorn_queue_size=64",
                 "small_batch.below_total_batch=4096", "train.batch_size_per_gpu=64", "train.centering=sinkhorn_knopp"]
    tuned, _ = resolve_regime(load_config(None, overrides), 32)
    assert tuned.teacher.teacher_temp == 0.05 and tuned.dino.sinkhorn_queue_size == 64
    sk, _ = resolve_regime(load_config(None, ["small_batch.mode=auto", "small_batch.centering=sinkhorn_knopp"]), 1)
    assert sk.train.centering == "sinkhorn_knopp" and sk.dino.sinkhorn_queue_size == 2048


def test_lr_scaling_stops_shrinking_at_the_regime_floor():
    official = load_config(None, ["train.batch_size_per_gpu=32", "optim.base_lr=0.002"])
    assert scaled_lr(official.optim, 32) == pytest.approx(0.002 * math.sqrt(32 / 1024))  # the official sqrt rule
    small, _ = resolve_regime(load_config(None, ["train.batch_size_per_gpu=32", "optim.base_lr=0.002",
                                                 "small_batch.mode=auto"]), 1)
    assert small.optim.scaling_min_total_batch == 256
    assert scaled_lr(small.optim, 32) == pytest.approx(0.002 * math.sqrt(256 / 1024))  # 1e-3, not 3.5e-4
    assert scaled_lr(small.optim, 512) == pytest.approx(0.002 * math.sqrt(512 / 1024))  # above the floor: the rule
    small.optim.scaling_rule = "linear_wrt_256"
    assert scaled_lr(small.optim, 64) == pytest.approx(0.002)


def ema_time_constants(cfg) -> float:
    """sum_t (1 - m_t) over the run's scheduled iterations, from the trainer's own momentum schedule."""
    schedules = build_schedules(cfg.optim, cfg.teacher, cfg.train.OFFICIAL_EPOCH_LENGTH, 1e-3)
    return sum(1 - schedules.momentum(it) for it in range(cfg.scheduled_iters))


def test_short_run_teacher_momentum_is_lowered_to_reach_the_time_constants():
    short = ["train.batch_size_per_gpu=32", "train.OFFICIAL_EPOCH_LENGTH=30", "optim.epochs=20",
             "teacher.momentum_teacher=0.99"]
    cfg = load_config(None, short)
    assert ema_time_constants(cfg) == pytest.approx(3.0, abs=0.02)  # 600 iterations from 0.99: a 5% share of init
    resolved, regime = resolve_regime(cfg, 1)
    assert resolved.teacher.momentum_teacher == 0.98
    assert regime.changes["teacher.momentum_teacher"] == (0.99, 0.98)
    assert ema_time_constants(resolved) == pytest.approx(6.0, abs=0.02)
    eight, _ = resolve_regime(load_config(None, [*short, "small_batch.teacher_ema_time_constants=8"]), 1)
    assert ema_time_constants(eight) == pytest.approx(8.0, abs=0.02)
    kept, regime = resolve_regime(load_config(None, [*short, "small_batch.teacher_ema_time_constants=0"]), 1)
    assert kept.teacher.momentum_teacher == 0.99 and "teacher.momentum_teacher" not in regime.changes
    fast, _ = resolve_regime(load_config(None, [*short, "teacher.momentum_teacher=0.9"]), 1)
    assert fast.teacher.momentum_teacher == 0.9  # lowered, never raised
    tiny_run, _ = resolve_regime(load_config(None, [*short, "optim.epochs=1", "optim.warmup_epochs=0",
                                                      "train.OFFICIAL_EPOCH_LENGTH=4"]), 1)
    assert tiny_run.teacher.momentum_teacher == 0.0  # clamped: the teacher follows its student


def test_teacher_momentum_is_kept_in_long_runs_at_large_batch_in_distillation_and_from_weights():
    long_run, regime = resolve_regime(load_config(None, ["train.batch_size_per_gpu=32"]), 1)  # 125k iterations
    assert regime.name == "small_batch" and long_run.teacher.momentum_teacher == 0.992
    short = ["train.OFFICIAL_EPOCH_LENGTH=30", "optim.epochs=20", "teacher.momentum_teacher=0.99"]
    large = load_config(None, ["train.batch_size_per_gpu=1024", *short])
    assert resolve_regime(large, 1)[0] is large  # official regime: nothing changes, short run or not
    distill = ["distillation.enabled=true", "distillation.checkpoint_path=/weights/teacher.pth"]
    students, _ = resolve_regime(load_config(None, ["train.batch_size_per_gpu=32", *short, *distill]), 1)
    assert students.teacher.momentum_teacher == 0.99
    for start in ("train.init_from=/runs/phase1", "MODEL.WEIGHTS=/weights/b.pth", "student.pretrained_weights=/w.pth"):
        continued, _ = resolve_regime(load_config(None, ["train.batch_size_per_gpu=32", *short, start]), 1)
        assert continued.teacher.momentum_teacher == 0.99  # trained weights: no random init to forget


def test_bad_small_batch_value_is_a_one_line_error_naming_the_key():
    with pytest.raises(ConfigError, match="small_batch.mode") as error:
        load_config(None, ["small_batch.mode=sometimes"])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="small_batch.sinkhorn_queue_size"):
        load_config(None, ["small_batch.sinkhorn_queue_size=-1"])
    with pytest.raises(ConfigError, match="small_batch.teacher_ema_time_constants"):
        load_config(None, ["small_batch.teacher_ema_time_constants=-1"])


# --- the Sinkhorn-Knopp queue --------------------------------------------------------------------------------------


def test_queue_targets_are_sinkhorn_knopp_over_queue_and_batch_and_the_queue_is_fifo():
    torch.manual_seed(0)
    loss = DINOLoss(16, queue_size=10)
    steps = [torch.randn(4, 16) for _ in range(4)]
    for step, logits in enumerate(steps):
        past = torch.cat(steps[:step][::-1]) if step else torch.zeros(0, 16)  # newest first
        want = sinkhorn_knopp(torch.cat((past[:10], logits)), 0.05)[len(past[:10]) :]
        torch.testing.assert_close(loss.sinkhorn_knopp_teacher(logits, 0.05), want)
        assert int(loss.queue_filled) == min(10, 4 * (step + 1))
    assert torch.equal(loss.queue, torch.cat((steps[3], steps[2], steps[1][:2])))
    # the queue sharpens what a small batch alone must spread: 4 rows over 16 prototypes force >= ln 4 nats
    alone = sinkhorn_knopp(steps[3], 0.05)
    entropy = lambda p: float(-(p * p.log()).sum(-1).mean())  # noqa: E731
    assert entropy(alone) >= math.log(16 / 4) - 1e-3


def test_queue_is_saved_and_restored_with_the_model():
    loss = DINOLoss(8, queue_size=6)
    loss.sinkhorn_knopp_teacher(torch.randn(4, 8), 0.1)
    state = loss.state_dict()
    assert int(state["queue_filled"]) == 4
    other = DINOLoss(8, queue_size=6)
    other.load_state_dict(state)
    logits = torch.randn(4, 8)
    assert torch.equal(other.sinkhorn_knopp_teacher(logits, 0.1), loss.sinkhorn_knopp_teacher(logits, 0.1))


def test_small_batch_run_with_queue_resumes_bitwise(image_folder, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ("small_batch.mode=auto", "small_batch.centering=sinkhorn_knopp", "small_batch.sinkhorn_queue_size=20",
             "train.checkpoint_period=3")
    full = train(load_config(None, tiny(image_folder, straight, 6, *extra)), DistEnv())
    first = train(load_config(None, tiny(image_folder, split, 3, *extra)), DistEnv())
    with dinov2_log() as log:
        second = train(load_config(None, tiny(image_folder, split, 6, *extra)), DistEnv())
    assert first["losses"] + second["losses"] == full["losses"]
    a = torch.load(straight / "checkpoints" / "iter_0000005" / "state.pth", weights_only=True)["model"]
    b = torch.load(split / "checkpoints" / "iter_0000005" / "state.pth", weights_only=True)["model"]
    assert int(a["dino_loss.queue_filled"]) == 20 and a["dino_loss.queue"].abs().sum() > 0
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "regime: small_batch (total batch 4)" in log.getvalue()


# --- the collapse monitor ------------------------------------------------------------------------------------------


def test_monitor_warns_once_after_patience_uniform_periods():
    monitor = CollapseMonitor(n_prototypes=1024, log_period=2, patience=3)
    ln_k = math.log(1024)
    events = [monitor.update(i, 0.97 * ln_k) for i in range(5)]  # two full periods: not yet
    assert events == [None] * 5
    event = monitor.update(5, 0.97 * ln_k)
    assert event["kind"] == "uniform" and event["period_mean_entropies"] == [round(0.97 * ln_k, 4)] * 3
    assert event["fraction_of_ln_k"] == pytest.approx(0.97) and "small_batch.teacher_temp" in event["advice"]
    assert all(monitor.update(i, 0.97 * ln_k) is None for i in range(6, 20))  # once


def test_monitor_streak_breaks_on_a_healthy_period_and_sees_one_hot_targets():
    monitor = CollapseMonitor(n_prototypes=100, log_period=1, patience=2)
    ln_k = math.log(100)
    assert monitor.update(0, 0.95 * ln_k) is None
    assert monitor.update(1, 0.5 * ln_k) is None  # healthy: the streak restarts
    assert monitor.update(2, 0.95 * ln_k) is None
    assert monitor.update(3, 0.01 * ln_k) is None  # a different state restarts it too
    assert monitor.update(4, 0.0)["kind"] == "one_hot"
    assert CollapseMonitor(100, 1, patience=0).update(0, ln_k) is None  # 0 disables


def test_uniform_targets_are_reported_in_training_metrics_and_the_log(image_folder, tmp_path):
    # a teacher temperature of 50 makes every target uniform: what a collapsed small-batch run looks like
    extra = ("small_batch.mode=never", "teacher.warmup_teacher_temp=50", "teacher.teacher_temp=50",
             "train.collapse_patience=3")
    with dinov2_log() as log:
        train(load_config(None, tiny(image_folder, tmp_path, 5, *extra)), DistEnv())
    lines = [json.loads(x) for x in (tmp_path / "training_metrics.json").read_text().splitlines()]
    events = [x for x in lines if x.get("event") == "collapse_warning"]
    assert len(events) == 1 and events[0]["iteration"] == 2 and events[0]["kind"] == "uniform"
    assert events[0]["fraction_of_ln_k"] > 0.99
    assert log.getvalue().count("DINO teacher targets uniform") == 1


def test_a_learning_run_gets_no_warning(image_folder, tmp_path):
    # LayerScale 1.0: with the official 1e-5 every toy image has the same CLS token at init, so targets are uniform
    extra = ("train.collapse_patience=2", "student.layerscale=1.0")
    train(load_config(None, tiny(image_folder, tmp_path, 4, *extra)), DistEnv())
    lines = (tmp_path / "training_metrics.json").read_text()
    assert "collapse_warning" not in lines


def test_batch_mean_target_entropy_tells_one_shared_prototype_from_sharp_diverse_targets(image_folder, tmp_path):
    cfg = load_config(None, tiny(image_folder, tmp_path, 1))
    model = build_student_teacher(cfg)
    batch = next(iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)))
    dino_targets, ibot_targets = model.teacher_targets(batch, 0.04)
    rows, k = dino_targets.shape
    shared = torch.zeros(rows, k)
    shared[:, 3] = 1.0  # every image on one prototype: sharp, and collapsed
    diverse = torch.eye(k)[:rows]  # every image on its own prototype: sharp, and healthy
    for targets, marginal in ((shared, 0.0), (diverse, math.log(rows))):
        losses = model(batch, 0.04, targets=(targets, ibot_targets))
        assert float(losses["dino_teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)  # per image both look the same
        assert float(losses["dino_teacher_marginal_entropy"]) == pytest.approx(marginal, abs=1e-5)
    losses = model(batch, 0.04)  # real targets: the mean's entropy is at least the mean entropy (concavity)
    assert losses["dino_teacher_marginal_entropy"] >= losses["dino_teacher_entropy"] - 1e-5
