"""Gradient accumulation: n micro-batches of B images reproduce one step at batch n*B (targets, centers, update)."""

import json
from pathlib import Path

import pytest
import torch

from dinov2.config import load_config
from dinov2.data import build_train_loader, split_micro_batches
from dinov2.distributed.env import DistEnv
from dinov2.train.train import build_student_teacher, train


def accum_overrides(data: Path, out: Path, max_iter: int, batch: int, accum: int, centering: str) -> list[str]:
    """A tiny fp32 deterministic run without the two parts that are per micro-batch by design: stochastic depth
    draws and KoLeo's nearest neighbours (within a GPU's batch officially, within a micro-batch here)."""
    return [
        f"train.dataset_path={data}", f"train.output_dir={out}", "student.arch=vit_custom", "student.embed_dim=32",
        "student.depth=2", "student.num_heads=2", "student.patch_size=8", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "dino.head_n_prototypes=64",
        "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=64",
        "train.num_workers=0", f"train.max_iter={max_iter}", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=3",
        "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0", "teacher.warmup_teacher_temp_epochs=1",
        "train.device=cpu", "train.log_period=1", "train.autocast_dtype=fp32", "train.deterministic=true",
        f"train.batch_size_per_gpu={batch}", f"train.grad_accum_steps={accum}", f"train.centering={centering}",
        "student.drop_path_rate=0", "dino.koleo_loss_weight=0", "ibot.separate_head=true",
        "train.checkpoint_period=100",
        # the official centering modes as named: the small-batch regime would turn both into its own Sinkhorn-Knopp
        "small_batch.mode=never",
    ]


def test_split_micro_batches_partitions_images_crops_and_masks(image_folder, tmp_path):
    cfg = load_config(None, accum_overrides(image_folder, tmp_path, 1, 6, 1, "centering"))
    batch = next(iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)))
    parts = split_micro_batches(batch, 3)
    assert [p["sample_keys"] for p in parts] == [batch["sample_keys"][i : i + 2] for i in (0, 2, 4)]
    for name in ("collated_global_crops", "collated_masks"):  # crop-major: crop 1 of all images, then crop 2
        whole = batch[name].view(2, 6, *batch[name].shape[1:])
        for i, part in enumerate(parts):
            assert torch.equal(part[name], whole[:, 2 * i : 2 * i + 2].flatten(0, 1))
    local = batch["collated_local_crops"].view(2, 6, *batch["collated_local_crops"].shape[1:])
    assert torch.equal(parts[1]["collated_local_crops"], local[:, 2:4].flatten(0, 1))
    assert sum(int(p["n_masked_patches"]) for p in parts) == int(batch["n_masked_patches"])
    assert sorted(torch.cat([p["masks_weight"] for p in parts]).tolist()) == sorted(batch["masks_weight"].tolist())
    for part in parts:
        assert torch.equal(part["mask_indices_list"], part["collated_masks"].flatten().nonzero().flatten())
    with pytest.raises(ValueError, match="4 equal micro-batches"):
        split_micro_batches(batch, 4)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_targets_over_micro_batches_equal_the_large_batch(image_folder, tmp_path, centering):
    cfg = load_config(None, accum_overrides(image_folder, tmp_path, 1, 6, 1, centering))
    batch = next(iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1)))
    torch.manual_seed(0)
    large = build_student_teacher(cfg)
    small = build_student_teacher(cfg)
    small.load_state_dict(large.state_dict())
    for model in (large, small):
        model.dino_loss.center.normal_(generator=torch.Generator().manual_seed(1))  # a non-trivial center
    (dino, ibot), = large.targets_from_logits([large.teacher_logits(batch)], 0.05)
    parts = split_micro_batches(batch, 3)
    targets = small.targets_from_logits([small.teacher_logits(p) for p in parts], 0.05)
    # the large batch's rows are crop-major over 6 images; each micro-batch's over its 2
    dino_parts = torch.stack([d.view(2, 2, -1) for d, _ in targets], 1).flatten(0, 2)
    torch.testing.assert_close(dino_parts, dino, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([i for _, i in targets]).sum(0), ibot.sum(0), rtol=1e-5, atol=1e-6)
    large.dino_loss.apply_center_update()
    small.dino_loss.apply_center_update()
    torch.testing.assert_close(small.dino_loss.center, large.dino_loss.center, rtol=1e-6, atol=1e-7)
    large.ibot_patch_loss.apply_center_update()
    small.ibot_patch_loss.apply_center_update()
    torch.testing.assert_close(small.ibot_patch_loss.center, large.ibot_patch_loss.center, rtol=1e-6, atol=1e-7)


def _state(out: Path, iteration: int) -> dict:
    return torch.load(out / "checkpoints" / f"iter_{iteration:07d}" / "state.pth", weights_only=True)


# the small-batch regime: its Sinkhorn-Knopp with a queue (8 rows: fewer than a step's 12, so rows are evicted)
SMALL_BATCH_REGIME = ("small_batch.mode=always", "small_batch.sinkhorn_queue_size=8")


@pytest.mark.parametrize(("centering", "extra"), [("centering", ()), ("sinkhorn_knopp", ()),
                                                  ("centering", SMALL_BATCH_REGIME)])
def test_accumulated_run_equals_large_batch_run(image_folder, tmp_path, centering, extra):
    large_out, accum_out = tmp_path / "large", tmp_path / "accum"
    large_cfg = load_config(None, [*accum_overrides(image_folder, large_out, 3, 6, 1, centering), *extra])
    accum_cfg = load_config(None, [*accum_overrides(image_folder, accum_out, 3, 2, 3, centering), *extra])
    large = train(large_cfg, DistEnv())
    accum = train(accum_cfg, DistEnv())
    torch.testing.assert_close(torch.tensor(accum["losses"]), torch.tensor(large["losses"]), rtol=1e-6, atol=1e-6)
    a, b = _state(large_out, 2), _state(accum_out, 2)
    for key, value in a["model"].items():  # student, EMA teacher and both centers
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for index, state in a["optimizer"]["state"].items():  # the same Adam moments: the same gradients
        torch.testing.assert_close(b["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-7)
    lines = [json.loads(x) for x in (accum_out / "training_metrics.json").read_text().splitlines()]
    large_lines = [json.loads(x) for x in (large_out / "training_metrics.json").read_text().splitlines()]
    for got, want in zip(lines, large_lines):
        for name in ("dino_global_crops_loss", "ibot_loss", "dino_teacher_entropy", "lr"):
            assert got[name] == pytest.approx(want[name], rel=1e-5), name


def test_accumulated_run_resumes_bitwise(image_folder, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    overrides = ["train.checkpoint_period=2"]
    full = train(load_config(None, accum_overrides(image_folder, straight, 4, 2, 2, "centering") + overrides),
                 DistEnv())
    first = train(load_config(None, accum_overrides(image_folder, split, 2, 2, 2, "centering") + overrides),
                  DistEnv())
    second = train(load_config(None, accum_overrides(image_folder, split, 4, 2, 2, "centering") + overrides),
                   DistEnv())
    assert first["losses"] + second["losses"] == full["losses"]
    a, b = _state(straight, 3)["model"], _state(split, 3)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
