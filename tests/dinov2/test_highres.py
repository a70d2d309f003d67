"""The high-resolution phase on a tiny ViT: 56 px run -> 112 px phase (patch 14: grid 4x4 -> 8x8)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.config import ConfigError, load_config
from dinov2.data import build_train_loader
from dinov2.distributed.env import DistEnv
from dinov2.train.highres import init_phase_from
from dinov2.train.regime import resolve_regime
from dinov2.train.train import build_student_teacher, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_train):
    """``tiny(data, out, size, max_iter, *extra)``: the shared tiny run at patch 14, ``size`` px global crops, batch 2
    and 4-iteration epochs, with a checkpoint every iteration."""

    def overrides(data: Path, out: Path, size: int, max_iter: int, *extra: str) -> list[str]:
        return tiny_train(data, max_iter, out, "student.patch_size=14", f"crops.global_crops_size={size}",
                          "crops.local_crops_size=28", "crops.local_crops_number=1", "train.batch_size_per_gpu=2",
                          "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=2", "train.checkpoint_period=1",
                          "train.max_to_keep=10",
                          "small_batch.mode=never",  # the official objective (EMA centers the phase carries over)
                          *extra)

    return overrides


def independent_resize(pos: torch.Tensor, new_grid: int, offset: float = 0.1) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + g*g, D) with the official bicubic call, written out here on its own."""
    side = math.isqrt(pos.shape[1] - 1)
    patches = pos[0, 1:].reshape(side, side, -1).permute(2, 0, 1)[None]  # (1, D, M, M)
    scale = (new_grid + offset) / side
    resized = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)  # (1, D, g, g)
    return torch.cat([pos[:, :1], resized[0].permute(1, 2, 0).reshape(1, new_grid * new_grid, -1)], dim=1)


def load_state(out: Path, iteration: int) -> dict:
    return torch.load(out / "checkpoints" / f"iter_{iteration:07d}" / "state.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def images(noise_images) -> Path:
    return noise_images(16, 120, 130)


@pytest.fixture(scope="module")
def low_res_run(images, tmp_path_factory, tiny) -> Path:
    """The '224 px' run, scaled down: 3 iterations at 56 px (grid 4x4)."""
    out = tmp_path_factory.mktemp("run56")
    summary = train(load_config(None, tiny(images, out, 56, 3)), DistEnv.from_environment())
    assert summary["iteration"] == 2
    return out


def test_phase_resizes_pos_embed_and_carries_heads_and_centers(images, low_res_run, tmp_path, tiny):
    cfg = load_config(None, tiny(images, tmp_path, 112, 3, f"train.init_from={low_res_run}"))
    model = build_student_teacher(cfg)
    assert init_phase_from(model, cfg.train)
    old = load_state(low_res_run, 2)  # the newest committed checkpoint of the run
    new = model.state_dict()
    for role in ("student", "teacher"):
        key = f"{role}.backbone.pos_embed"
        assert old[key].shape == (1, 1 + 4 * 4, 32) and new[key].shape == (1, 1 + 8 * 8, 32)
        torch.testing.assert_close(new[key], independent_resize(old[key], 8), rtol=0, atol=1e-6)
    untouched = [k for k in old if not k.endswith("pos_embed")]
    assert all(torch.equal(old[k], new[k]) for k in untouched)  # blocks, heads of both roles, loss centers
    assert not torch.equal(old["student.backbone.blocks.0.attn.qkv.weight"],
                           old["teacher.backbone.blocks.0.attn.qkv.weight"])  # roles really kept apart
    assert "dino_loss.center" in untouched and old["dino_loss.center"].abs().sum() > 0


def test_phase_starts_its_own_sinkhorn_knopp_queue_whatever_the_regimes(images, low_res_run, tmp_path, tiny):
    # the 56 px run used the official objective (no queue); this phase runs the small-batch regime (a queue)
    cfg, _ = resolve_regime(load_config(None, tiny(images, tmp_path, 112, 3, f"train.init_from={low_res_run}",
                                                   "small_batch.mode=always", "small_batch.sinkhorn_queue_size=8")), 1)
    model = build_student_teacher(cfg)
    assert init_phase_from(model, cfg.train)
    old, new = load_state(low_res_run, 2), model.state_dict()
    assert int(new["dino_loss.queue_filled"]) == 0 and "dino_loss.queue" not in old
    assert torch.equal(new["teacher.dino_head.last_layer.weight_v"], old["teacher.dino_head.last_layer.weight_v"])


@pytest.fixture(scope="module")
def phase_run(images, low_res_run, tmp_path_factory, tiny) -> tuple[Path, dict]:
    """The '518 px' phase, scaled down: 3 iterations at 112 px (grid 8x8) from the 56 px run, uninterrupted."""
    out = tmp_path_factory.mktemp("phase112")
    cfg = load_config(None, tiny(images, out, 112, 3, f"train.init_from={low_res_run}"))
    return out, train(cfg, DistEnv.from_environment())


def test_phase_trains_with_finite_loss_and_8x8_masks(images, low_res_run, phase_run, tiny):
    out, summary = phase_run
    assert summary["iteration"] == 2 and all(np.isfinite(summary["losses"]))
    cfg = load_config(None, tiny(images, out, 112, 3, f"train.init_from={low_res_run}"))
    loader = build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["collated_global_crops"].shape[-2:] == (112, 112)
    assert batch["collated_masks"].shape == (2 * 2, 8 * 8)  # mask grid follows global_crops_size // patch_size
    # The phase is a new run: its own iteration counter, and the optimizer starts empty (step 1 after one update).
    state = torch.load(out / "checkpoints" / "iter_0000000" / "state.pth", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {1}


def test_resume_inside_phase_equals_straight_run(images, low_res_run, phase_run, tmp_path, tiny):
    straight, full = phase_run
    first = train(load_config(None, tiny(images, tmp_path, 112, 2, f"train.init_from={low_res_run}")),
                  DistEnv.from_environment())
    # A different init_from proves the second call resumes from its own checkpoint and ignores init_from.
    second = train(load_config(None, tiny(images, tmp_path, 112, 3, "train.init_from=/nonexistent")),
                   DistEnv.from_environment())
    assert first["losses"] + second["losses"] == full["losses"]
    a, b = load_state(straight, 2), load_state(tmp_path, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_heads_and_head_warmup_keep_backbone_frozen(images, low_res_run, tmp_path, tiny):
    hub = low_res_run / "eval" / "training_2" / "teacher_backbone_hub.pth"  # a backbone-only release file
    extra = (f"train.init_from={hub}", "train.init_heads=fresh", "train.head_warmup_iters=2")
    cfg = load_config(None, tiny(images, tmp_path, 112, 3, *extra))
    # same seed: fresh heads
    reference = build_student_teacher(load_config(None, tiny(images, tmp_path / "unused", 112, 3)))
    summary = train(cfg, DistEnv.from_environment())
    assert all(np.isfinite(summary["losses"]))
    released = torch.load(hub, weights_only=True)
    expected = dict(released, pos_embed=independent_resize(released["pos_embed"], 8))
    for it in (0, 1):  # warm-up: student and teacher backbones are exactly the released weights
        state = load_state(tmp_path, it)
        for role in ("student", "teacher"):
            for name, value in expected.items():
                torch.testing.assert_close(state[f"{role}.backbone.{name}"], value, rtol=0, atol=1e-6)
        head = "student.dino_head.mlp.0.weight"
        assert not torch.equal(state[head], reference.state_dict()[head])  # the heads do train
    after = load_state(tmp_path, 2)  # first iteration past the warm-up: the backbone moves
    assert not torch.equal(after["student.backbone.blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])
    # The heads started from the new initialisation, not from the 56 px run's trained heads.
    assert torch.equal(reference.state_dict()["teacher.dino_head.mlp.0.bias"],
                       build_student_teacher(cfg).state_dict()["teacher.dino_head.mlp.0.bias"])


def test_backbone_file_needs_fresh_heads(images, low_res_run, tmp_path, tiny):
    hub = low_res_run / "eval" / "training_2" / "teacher_backbone_hub.pth"
    cfg = load_config(None, tiny(images, tmp_path, 112, 1, f"train.init_from={hub}"))
    with pytest.raises(ValueError, match="init_heads=fresh"):
        init_phase_from(build_student_teacher(cfg), cfg.train)


def test_head_mismatch_and_bad_keys_are_clear_errors(images, low_res_run, tmp_path, tiny):
    cfg = load_config(None, tiny(images, tmp_path, 112, 1, f"train.init_from={low_res_run}",
                                 "dino.head_n_prototypes=32"))
    with pytest.raises(ValueError, match="heads .* do not match"):
        init_phase_from(build_student_teacher(cfg), cfg.train)
    with pytest.raises(ConfigError, match="train.init_heads"):
        load_config(None, ["train.init_heads=random"])
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, ["train.init_from=x", "MODEL.WEIGHTS=y"])


def test_highres518_config_is_the_paper_phase():
    cfg = load_config(REPO / "configs" / "train" / "vitl14_highres518.yaml")
    vitl14 = load_config(REPO / "configs" / "train" / "vitl14.yaml")
    assert cfg.max_iter == 10_000
    assert cfg.crops.global_crops_size // cfg.student.patch_size == 37 and cfg.crops.local_crops_size == 98
    assert cfg.optim.base_lr < vitl14.optim.base_lr and cfg.optim.warmup_epochs < vitl14.optim.warmup_epochs
    assert (cfg.student, cfg.dino, cfg.ibot) == (vitl14.student, vitl14.dino, vitl14.ibot)  # same model: loads strictly


def test_sharded_checkpoint_is_read_without_its_optimizer(low_res_run, tmp_path):
    import torch.distributed.checkpoint as dcp

    from dinov2.train.highres import read_model_state, resolve_init_source

    saved = torch.load(low_res_run / "checkpoints" / "iter_0000002" / "state.pth", weights_only=True)
    folder = tmp_path / "checkpoints" / "iter_0000005"  # the DCP layout a multi-rank run writes
    dcp.save({"model": saved["model"], "optimizer": {"x": torch.ones(3)}}, checkpoint_id=str(folder))
    (folder / "COMMITTED").write_text("ok\n")
    assert resolve_init_source(tmp_path) == folder
    state = read_model_state(folder)
    assert state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
