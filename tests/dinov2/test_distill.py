"""Distillation mode on tiny ViTs: a 48-d teacher trained here by SSL, distilled into 32-d students on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dinov2.config import ConfigError, load_config, save_config
from dinov2.data import build_train_loader
from dinov2.distributed.env import DistEnv
from dinov2.models.registry import ARCHS
from dinov2.train.distill import build_distillation, flops_per_image, plan_distillation
from dinov2.train.highres import init_phase_from
from dinov2.train.train import build_student_teacher, train

REPO = Path(__file__).resolve().parents[2]


def common(data: Path, out: Path, max_iter: int) -> list[str]:
    return [
        f"train.dataset_path={data}", f"train.output_dir={out}", "student.arch=vit_custom", "student.depth=2",
        "student.num_heads=2", "student.patch_size=8", "student.layerscale=1.0", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "dino.head_n_prototypes=64",
        "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=64",
        "train.batch_size_per_gpu=4", "train.num_workers=0", f"train.max_iter={max_iter}",
        "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
        "teacher.warmup_teacher_temp_epochs=1", "train.device=cpu", "train.log_period=1", "train.checkpoint_period=3",
        "evaluation.eval_period_iterations=3", "train.autocast_dtype=fp32", "train.deterministic=true",
    ]


def distill(data: Path, out: Path, max_iter: int, teacher: Path | str, *extra: str) -> list[str]:
    # ema_horizon 0.5: a spare EMA over ~3 of these 6-iteration runs (the default 10% would be the student itself)
    return common(data, out, max_iter) + [
        "student.embed_dim=32", "distillation.enabled=true", f"distillation.checkpoint_path={teacher}",
        "distillation.ema_horizon=0.5", *extra,
    ]


def checkpoint(out: Path, iteration: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"iter_{iteration:07d}" / "state.pth", weights_only=True)["model"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(image_folder, tmp_path_factory) -> Path:
    """The project's own trained teacher, scaled down: SSL on a 48-d ViT, 3 iterations, with its config.yaml."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, common(image_folder, out, 3) + ["student.embed_dim=48"])
    save_config(cfg, out / "config.yaml")  # what python -m dinov2.train writes
    train(cfg, DistEnv())
    return out


@pytest.fixture(scope="module")
def distilled(image_folder, teacher_run, tmp_path_factory) -> Path:
    """6 iterations of distillation into the 32-d student, straight through."""
    out = tmp_path_factory.mktemp("distilled")
    train(load_config(None, distill(image_folder, out, 6, teacher_run)), DistEnv())
    return out


def test_teacher_frozen_bitwise_and_gradients_reach_students_only(image_folder, teacher_run, distilled, tmp_path):
    cfg = load_config(None, distill(image_folder, tmp_path, 1, teacher_run))
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=True))
    model.train()
    saved = checkpoint(teacher_run, 2)  # the teacher run's EMA teacher (backbone and heads) is the frozen teacher
    frozen = {f"teacher.{k}": v for k, v in model.frozen_teacher.state_dict().items()}
    assert frozen.keys() <= saved.keys() and all(torch.equal(saved[k], v) for k, v in frozen.items())

    batch = next(iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)))
    losses = model(batch, teacher_temp=0.04)
    assert {"student/dino_global_crops_loss", "student/dino_local_crops_loss", "student/koleo_loss",
            "student/ibot_loss", "dino_teacher_entropy", "total_loss"} <= set(losses)
    losses["total_loss"].backward()
    trained = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    assert [n for n, p in trained if p.grad is None or not p.grad.abs().sum() > 0] == []
    # nothing is masked in distillation: the mask token is the one student parameter that is not trained
    assert [n for n, p in model.student.named_parameters() if not p.requires_grad] == ["student__backbone.mask_token"]
    assert all(p.grad is None and not p.requires_grad for p in model.frozen_teacher.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())  # the EMA copies

    # through the loop: the frozen teacher never moves, the EMA lags the student, both differ from the teacher
    first, last = checkpoint(distilled, 2), checkpoint(distilled, 5)
    # batch 4: the small-batch regime, without its Sinkhorn-Knopp queue in distillation
    assert cfg.small_batch.mode == "auto" and not any("queue" in key for key in last)
    assert json.loads((distilled / "training_metrics.json").read_text().splitlines()[0])["teacher_temp"] == 0.02
    teacher_keys = [k for k in last if k.startswith("frozen_teacher.")]
    assert teacher_keys and all(torch.equal(first[k], last[k]) for k in teacher_keys)
    assert all(torch.equal(last[k], frozen[k.replace("frozen_teacher.", "teacher.")]) for k in teacher_keys)
    student, ema = last["student.student__backbone.cls_token"], last["teacher.student__backbone.cls_token"]
    assert student.shape == (1, 1, 32) and not torch.equal(student, ema)
    # per-student exports: official layout with heads, and the hub backbone, of the EMA
    folder = distilled / "students" / "student" / "eval" / "training_5"
    exported = torch.load(folder / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert torch.equal(exported["backbone.cls_token"], ema) and "dino_head.mlp.0.weight" in exported
    assert torch.equal(torch.load(folder / "teacher_backbone_hub.pth", weights_only=True)["cls_token"], ema)
    rows = metrics(distilled)
    assert [r["iteration"] for r in rows] == list(range(6)) and all(np.isfinite(r["total_loss"]) for r in rows)
    assert rows[0]["tflops"] > 0


def test_spare_ema_is_the_average_of_the_student_iterates_not_of_its_initialisation(image_folder, teacher_run,
                                                                                    tmp_path):
    """The scored model is the students' EMA: it must hold the trained weights, whatever the run length. A plain EMA
    started at the random initialisation keeps prod(m_t) of it (0.74 after the bench's 60 steps): the bias-corrected
    EMA weighs the iterates s_t by (1 - m_t) prod_(u>t) m_u, normalised, and the initialisation by 0."""
    cfg = load_config(None, distill(image_folder, tmp_path, 1, teacher_run, "distillation.ema_horizon=0"))
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=True))
    assert model.spare_ema_momentum is None  # the scheduled momenta below are used as given
    backbone = model.student["student__backbone"]
    momenta = [0.99, 0.995, 0.999, 1.0]  # the cosine schedule's kind of values, its final 1 included
    iterates, weights = [], []
    for step, momentum in enumerate(momenta):
        with torch.no_grad():
            for param in model.student.parameters():
                param.add_(torch.randn_like(param))  # a student step
        iterates.append(backbone.cls_token.detach().clone())
        weights = [w * momentum for w in weights] + [1.0 - momentum]
        model.update_teacher(momentum)
        if step == 0:  # the first update copies the student
            assert all(torch.equal(model.teacher[k].state_dict()[n], v) for k in model.teacher
                       for n, v in model.student[k].state_dict().items())
    want = sum(w * s for w, s in zip(weights, iterates)) / sum(weights)
    torch.testing.assert_close(model.teacher["student__backbone"].cls_token, want, rtol=1e-5, atol=1e-6)
    assert float(model.ema_init_share) == pytest.approx(float(np.prod(momenta)))

    # through the loop: after one step the exported (scored) EMA is exactly the trained student
    train(cfg, DistEnv())
    state = checkpoint(tmp_path, 0)
    students = [k for k in state if k.startswith("student.student__")]
    assert students and all(torch.equal(state[k], state[k.replace("student.", "teacher.", 1)]) for k in students)
    hub = torch.load(tmp_path / "students" / "student" / "eval" / "training_0" / "teacher_backbone_hub.pth",
                     weights_only=True)
    assert all(torch.equal(v, state[f"student.student__backbone.{k}"]) for k, v in hub.items())


def test_spare_ema_momentum_is_constant_over_a_horizon_of_the_run(image_folder, teacher_run, tmp_path):
    """distillation.ema_horizon h: the spare EMA's momentum is 1 - 1/(h T) whatever the teacher schedule says, so the
    final model averages about the last h T iterates; in a short run the scheduled momentum's rise to 1 would freeze
    it mid-run."""
    from dinov2.train.distill import spare_ema_momentum

    cfg = load_config(None, distill(image_folder, tmp_path, 40, teacher_run, "distillation.ema_horizon=0.25"))
    assert spare_ema_momentum(cfg) == pytest.approx(0.9)
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=True))
    momenta = [model.ema_momentum(scheduled) for scheduled in (0.99, 0.995, 1.0, 1.0)]
    # bias-corrected constant 0.9: m'_t = 0.9 (1 - 0.9^(t-1)) / (1 - 0.9^t)
    assert momenta == pytest.approx([0.0, 0.9 * 0.1 / 0.19, 0.9 * 0.19 / 0.271, 0.9 * 0.271 / 0.3439])
    assert float(model.ema_init_share) == pytest.approx(0.9**4)
    assert spare_ema_momentum(load_config(None, distill(image_folder, tmp_path, 4, teacher_run,
                                                        "distillation.ema_horizon=0.1"))) == 0.0  # < 1 iteration
    with pytest.raises(ConfigError, match="distillation.ema_horizon"):
        load_config(None, distill(image_folder, tmp_path, 4, teacher_run, "distillation.ema_horizon=2"))


class StopAt:
    """A preemption source (the SLURM handler's interface) that asks to stop after ``iteration``."""

    def __init__(self, iteration: int) -> None:
        self.iteration, self.calls, self.requeued = iteration, 0, False

    def should_stop(self, env: DistEnv) -> bool:
        self.calls += 1
        return self.calls == self.iteration + 1

    def requeue(self, env: DistEnv) -> None:
        self.requeued = True


def test_preemption_then_resume_is_bitwise(image_folder, teacher_run, distilled, tmp_path):
    stop = StopAt(1)  # not a checkpoint period: the preemption path saves
    first = train(load_config(None, distill(image_folder, tmp_path, 6, teacher_run)), DistEnv(), preemption=stop)
    assert first["stopped_for_preemption"] and first["iteration"] == 1 and stop.requeued
    train(load_config(None, distill(image_folder, tmp_path, 6, teacher_run)), DistEnv())  # the requeued job
    assert [r["total_loss"] for r in metrics(tmp_path)] == [r["total_loss"] for r in metrics(distilled)]
    a, b = checkpoint(distilled, 5), checkpoint(tmp_path, 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preemption_then_resume_is_bitwise_with_the_feature_term(image_folder, teacher_run, tmp_path):
    feature = "distillation.feature_loss_weight=1"
    train(load_config(None, distill(image_folder, tmp_path / "straight", 4, teacher_run, feature)), DistEnv())
    stop = StopAt(1)
    run = distill(image_folder, tmp_path / "resumed", 4, teacher_run, feature)
    assert train(load_config(None, run), DistEnv(), preemption=stop)["stopped_for_preemption"]
    train(load_config(None, run), DistEnv())
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["student/feature_cls_loss"] for r in resumed] == [r["student/feature_cls_loss"] for r in straight]
    a, b = checkpoint(tmp_path / "straight", 3), checkpoint(tmp_path / "resumed", 3)
    assert "student.student__feature_head.weight" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_students_in_one_run_equal_two_single_runs(image_folder, teacher_run, tmp_path):
    small = "{name: small, embed_dim: 32}"
    deep = "{name: deep, embed_dim: 16, depth: 3, num_heads: 1}"
    runs = {"both": f"[{small}, {deep}]", "small": f"[{small}]", "deep": f"[{deep}]"}
    for name, students in runs.items():
        train(load_config(None, distill(image_folder, tmp_path / name, 3, teacher_run,
                                        f"distillation.students={students}")), DistEnv())
    both = metrics(tmp_path / "both")
    state = checkpoint(tmp_path / "both", 2)
    for name in ("small", "deep"):
        alone = metrics(tmp_path / name)
        for term in ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"):
            assert [r[f"{name}/{term}"] for r in both] == [r[f"{name}/{term}"] for r in alone]
        single = checkpoint(tmp_path / name, 2)
        own = [k for k in single if f".{name}__" in k]  # student, EMA and nothing else of this student
        assert own and all(torch.equal(state[k], single[k]) for k in own)
        export = tmp_path / "both" / "students" / name / "eval" / "training_2" / "teacher_backbone_hub.pth"
        assert export.is_file()
    assert state["student.deep__backbone.cls_token"].shape == (1, 1, 16)
    assert [r["dino_teacher_entropy"] for r in both] == [r["dino_teacher_entropy"] for r in metrics(tmp_path / "small")]


def test_released_backbone_teacher_fits_heads_then_distils(image_folder, teacher_run, tmp_path):
    released = teacher_run / "eval" / "training_2" / "teacher_backbone_hub.pth"  # backbone only, no heads
    extra = (f"distillation.full_cfg_path={teacher_run / 'config.yaml'}", "distillation.head_fit_iters=2")
    summary = train(load_config(None, distill(image_folder, tmp_path, 3, released, *extra)), DistEnv())
    assert summary["iteration"] == 2 and all(np.isfinite(summary["losses"]))
    fit = tmp_path / "teacher_heads"
    assert [r["iteration"] for r in metrics(fit)] == [0, 1]
    fitted = checkpoint(fit, 1)
    backbone = torch.load(released, weights_only=True)
    state = checkpoint(tmp_path, 2)
    # the released backbone, untouched by the head fit, is the frozen teacher's; its heads are the fitted EMA heads
    assert all(torch.equal(state[f"frozen_teacher.backbone.{k}"], v) for k, v in backbone.items())
    assert all(torch.equal(fitted[f"teacher.backbone.{k}"], v) for k, v in backbone.items())
    heads = [k for k in fitted if k.startswith("teacher.dino_head.")]
    assert heads and all(torch.equal(state["frozen_" + k], fitted[k]) for k in heads)
    fit_cfg = load_config(fit / "config.yaml")  # written by the distillation run
    assert fit_cfg.train.head_warmup_iters == fit_cfg.train.max_iter == 2 and fit_cfg.student.embed_dim == 48
    torch.manual_seed(fit_cfg.train.seed)  # as the loop does before building: the heads' initial values
    initial = build_student_teacher(fit_cfg).state_dict()
    assert not torch.equal(fitted["teacher.dino_head.mlp.0.weight"], initial["teacher.dino_head.mlp.0.weight"])
    # a longer run resumes the distillation and reuses the finished head fit
    train(load_config(None, distill(image_folder, tmp_path, 4, released, *extra)), DistEnv())
    assert [r["iteration"] for r in metrics(fit)] == [0, 1] and [r["iteration"] for r in metrics(tmp_path)][-1] == 3


def test_official_teacher_checkpoint_with_heads_is_a_teacher(image_folder, teacher_run, tmp_path):
    official = teacher_run / "eval" / "training_2" / "teacher_checkpoint.pth"  # config.yaml found two levels up
    cfg = load_config(None, distill(image_folder, tmp_path, 1, official))
    plan = plan_distillation(cfg, resume=True, is_main=True)
    assert plan.head_fit is None and plan.teacher.student.embed_dim == 48
    model = build_distillation(cfg, plan)
    heads = torch.load(official, weights_only=True)["teacher"]
    assert all(torch.equal(model.frozen_teacher.state_dict()[k], v) for k, v in heads.items())


def test_incompatible_pairings_are_one_line_errors(image_folder, teacher_run, tmp_path):
    def error(*extra: str) -> str:
        cfg = load_config(None, distill(image_folder, tmp_path, 1, teacher_run, *extra))
        with pytest.raises(ConfigError) as caught:
            plan_distillation(cfg, resume=True, is_main=True)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    # patch 16 at 32 px: a 2x2 grid against the teacher's 4x4 (crops are multiples of both)
    assert "distillation.students[0].patch_size" in error("distillation.students=[{name: s, patch_size: 16}]",
                                                          "crops.local_crops_size=16")
    assert "student.patch_size" in error("student.patch_size=4")
    feature = error("student.patch_size=4", "ibot.loss_weight=0", "distillation.feature_loss_weight=1")
    assert "student.patch_size" in feature and "feature term" in feature
    with pytest.raises(ConfigError, match="distillation.feature_loss_weight"):
        load_config(None, distill(image_folder, tmp_path, 1, teacher_run, "distillation.feature_loss_weight=-1"))
    assert "dino.head_n_prototypes" in error("dino.head_n_prototypes=32", "ibot.separate_head=true")
    assert "full_cfg_path" in error(f"distillation.checkpoint_path={tmp_path / 'released.pth'}")
    with pytest.raises(ConfigError, match=r"distillation.students\[0\].arch: 'vit_tiny'"):
        load_config(None, distill(image_folder, tmp_path, 1, teacher_run, "distillation.students=[{name: s, "
                                  "arch: vit_tiny}]"))
    with pytest.raises(ConfigError, match=r"unknown config key 'distillation.students\[0\].archx'"):
        load_config(None, distill(image_folder, tmp_path, 1, teacher_run, "distillation.students=[{name: s, "
                                  "archx: vit_small}]"))
    with pytest.raises(ConfigError, match="student.arch"):
        load_config(None, ["student.arch=vit_tiny"])
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, distill(image_folder, tmp_path, 1, teacher_run, "train.init_from=x"))
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        load_config(None, distill(image_folder, tmp_path, 1, teacher_run, "train.grad_accum_steps=2"))
    # the command line: exit status 2 and one line
    overrides = [o for o in distill(image_folder, tmp_path, 1, teacher_run, "student.patch_size=4")
                 if not o.startswith("train.output_dir")]
    done = subprocess.run([sys.executable, "-m", "dinov2.train", "--output-dir", str(tmp_path / "cli"), *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "student.patch_size" in done.stderr and "Traceback" not in done.stderr


def test_arch_names_match_the_registry():
    from dinov2.config import BACKBONE_ARCHS

    assert set(BACKBONE_ARCHS) == set(ARCHS)


def test_518_phase_on_a_distilled_student(image_folder, distilled, tmp_path):
    export = distilled / "students" / "student" / "eval" / "training_5" / "teacher_checkpoint.pth"
    overrides = common(image_folder, tmp_path, 2) + [
        "student.embed_dim=32", "crops.global_crops_size=64", f"train.init_from={export}",
    ]
    summary = train(load_config(None, overrides), DistEnv())
    assert all(np.isfinite(summary["losses"]))
    exported = torch.load(export, weights_only=True)["teacher"]
    cfg = load_config(None, overrides)
    model = build_student_teacher(cfg)
    assert init_phase_from(model, cfg.train, resume=False)
    state = model.state_dict()
    assert state["student.backbone.pos_embed"].shape == (1, 1 + 8 * 8, 32)  # 4x4 -> 8x8
    for role in ("student", "teacher"):  # both roles start from the distilled EMA, heads included
        assert torch.equal(state[f"{role}.dino_head.mlp.0.weight"], exported["dino_head.mlp.0.weight"])
        key = "backbone.blocks.1.mlp.fc2.weight"
        assert torch.equal(state[f"{role}.{key}"], exported[key])


WORKER = """
import json, sys
from dinov2.config import load_config
from dinov2.distributed.env import DistEnv, destroy, init_distributed
from dinov2.train.train import train

env = init_distributed(DistEnv.from_environment())
for overrides in json.loads(sys.argv[1]):
    train(load_config(None, overrides), env)
destroy(env)
"""


def launch_world_2(runs: list[list[str]]) -> None:
    """Two processes joined through torchrun-style variables run ``train`` once per override list."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        environ = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(runs)], cwd=REPO, env=environ,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


def test_world_2_ddp_fsdp_and_manual_all_reduce_agree(image_folder, teacher_run, tmp_path):
    """With the feature term on, so that its projections are sharded and reduced like the heads."""
    outs = {strategy: tmp_path / strategy for strategy in ("none", "ddp", "fsdp")}
    students = "distillation.students=[{name: a, embed_dim: 32}, {name: b, embed_dim: 16, num_heads: 1}]"
    launch_world_2([distill(image_folder, out, 3, teacher_run, f"train.strategy={strategy}", students,
                            "optim.clip_grad=0.05", "distillation.feature_loss_weight=1")
                    for strategy, out in outs.items()])
    reference = metrics(outs["none"])
    assert [r["iteration"] for r in reference] == [0, 1, 2]
    assert all(r["grad_norm_a__backbone"] > 0.05 for r in reference)  # clipping is active: norms must be global
    for strategy in ("ddp", "fsdp"):
        rows = metrics(outs[strategy])
        for key in ("total_loss", "a/ibot_loss", "b/total_loss", "grad_norm_b__dino_head", "a/feature_patch_loss",
                    "grad_norm_b__feature_head"):
            np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in reference], rtol=1e-4)
    # the sharded checkpoints: every rank wrote its part; each student's EMA was exported from the gathered state
    for out in outs.values():
        assert (out / "checkpoints" / "iter_0000002" / "COMMITTED").is_file()
        for name in ("a", "b"):
            assert (out / "students" / name / "eval" / "training_2" / "teacher_checkpoint.pth").is_file()
    exported = {s: torch.load(outs[s] / "students" / "b" / "eval" / "training_2" / "teacher_checkpoint.pth",
                              weights_only=True)["teacher"] for s in outs}
    for key, value in exported["none"].items():
        torch.testing.assert_close(exported["fsdp"][key], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(exported["ddp"][key], value, rtol=1e-4, atol=1e-6)


def test_nonfinite_step_is_skipped(image_folder, teacher_run, tmp_path, monkeypatch):
    from dinov2.models.distillation import Distillation

    original, snapshots = Distillation.forward, []

    def forward(self, batch, teacher_temp):
        snapshots.append({k: v.clone() for k, v in self.state_dict().items()})
        losses = original(self, batch, teacher_temp)
        return {**losses, "total_loss": losses["total_loss"] * float("nan")} if len(snapshots) == 2 else losses

    monkeypatch.setattr(Distillation, "forward", forward)
    summary = train(load_config(None, distill(image_folder, tmp_path, 3, teacher_run)), DistEnv())
    assert summary["skipped_steps"] == 1 and [r["iteration"] for r in metrics(tmp_path)] == [0, 2]
    # students, EMAs, centers: the state entering iteration 2 is the one that entered the skipped iteration 1
    assert all(torch.equal(snapshots[2][k], v) for k, v in snapshots[1].items())
    assert not all(torch.equal(snapshots[1][k], v) for k, v in snapshots[0].items())


def test_vitg14_distillation_config_pairs(tmp_path):
    from dinov2.train.distill import check_pairing

    cfg = load_config(REPO / "configs" / "train" / "vits14_distill_vitg14.yaml",
                      [f"distillation.checkpoint_path={tmp_path / 'dinov2_vitg14_pretrain.pth'}"])
    teacher = load_config(REPO / cfg.distillation.full_cfg_path)
    students = cfg.distillation.student_configs(cfg.student)
    assert {n: s.arch for n, s in students.items()} == {"vits14": "vit_small", "vitb14": "vit_base"}
    assert teacher.student.arch == "vit_giant2" and all(s.patch_size == 14 for s in students.values())
    # heads fitted on a released backbone: the recipe adds the feature term; the trainer's default is the paper's
    assert cfg.distillation.feature_loss_weight == 10.0 and load_config(None).distillation.feature_loss_weight == 0.0
    check_pairing(cfg, teacher, students)  # raises on any mismatch, the feature term's equal token grids included


@pytest.mark.parametrize("feature_weight", [0.0, 1.0])
def test_flops_per_image_matches_the_counted_step(image_folder, teacher_run, tmp_path, feature_weight):
    """The FLOP counter of the training log against the matmul FLOPs PyTorch counts in one distillation step: the
    frozen teacher's forward, both students' forward and backward, the iBOT heads on every global patch token (and
    the feature term's projections)."""
    students = "distillation.students=[{name: a, embed_dim: 32}, {name: b, embed_dim: 16, num_heads: 1}]"
    cfg = load_config(None, distill(image_folder, tmp_path, 1, teacher_run, students,
                                    f"distillation.feature_loss_weight={feature_weight}"))
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=False)).train()
    batch = next(iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # math SDPA: counted products
        model(batch, teacher_temp=0.04)["total_loss"].backward()
    counted = counter.get_total_flops() / cfg.train.batch_size_per_gpu
    assert flops_per_image(model, cfg.crops, torch.device("cpu")) == pytest.approx(counted, rel=0.01)


def test_feature_distillation_loss_is_the_mean_cosine_distance():
    from dinov2.loss import FeatureDistillationLoss

    loss = FeatureDistillationLoss()
    x = torch.randn(5, 8)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(3 * x, x).item() == pytest.approx(0.0, abs=1e-6)  # blind to the norms
    assert loss(-x, x).item() == pytest.approx(2.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert loss(a, b).item() == pytest.approx((1.0 + (1.0 - 2**-0.5)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        loss(x, x[:, :4])


def test_feature_term_trains_a_projection_that_matches_the_teacher_tokens(image_folder, teacher_run, tmp_path):
    """distillation.feature_loss_weight: each student gets a projection to the teacher's width, the loss terms are
    logged, gradients reach it and the student (never the teacher), and minimising the term alone moves the
    student's projected tokens towards the teacher's; checkpoints keep the projection, exports leave it out."""
    cfg = load_config(None, distill(image_folder, tmp_path / "one", 1, teacher_run,
                                    "distillation.feature_loss_weight=1.0"))
    model = build_distillation(cfg, plan_distillation(cfg, resume=True, is_main=True)).train()
    assert tuple(model.student["student__feature_head"].weight.shape) == (48, 32)  # student 32-d -> teacher 48-d
    off = load_config(None, distill(image_folder, tmp_path / "off", 1, teacher_run))
    plain = build_distillation(off, plan_distillation(off, resume=True, is_main=True))
    assert not any("feature_head" in key for key in plain.state_dict())  # off: the paper's model exactly
    assert all(torch.equal(plain.student[k].state_dict()[p], v) for k in plain.student  # same initialisation
               for p, v in model.student[k].state_dict().items())

    batch = next(iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)))
    losses = model(batch, teacher_temp=0.04)
    assert 0 < losses["student/feature_cls_loss"].item() < 2 and 0 < losses["student/feature_patch_loss"].item() < 2
    losses["total_loss"].backward()
    trained = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    assert [n for n, p in trained if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert all(p.grad is None for p in [*model.frozen_teacher.parameters(), *model.teacher.parameters()])

    model.zero_grad()
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=3e-3)
    terms = []
    for _ in range(30):
        out = model(batch, teacher_temp=0.04)
        term = out["student/feature_cls_loss"] + out["student/feature_patch_loss"]
        terms.append(term.item())
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    assert terms[-1] < 0.5 * terms[0]

    train(load_config(None, distill(image_folder, tmp_path / "run", 3, teacher_run,
                                    "distillation.feature_loss_weight=1.0")), DistEnv())
    rows = metrics(tmp_path / "run")
    assert all(np.isfinite(r["student/feature_patch_loss"]) for r in rows)
    state = checkpoint(tmp_path / "run", 2)
    assert {"student.student__feature_head.weight", "teacher.student__feature_head.weight"} <= state.keys()
    folder = tmp_path / "run" / "students" / "student" / "eval" / "training_2"
    exported = torch.load(folder / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert "dino_head.mlp.0.weight" in exported and not any(k.startswith("feature_head") for k in exported)
