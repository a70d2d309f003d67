"""The whole DINOv2 objective over several optimisation steps against a from-scratch reference of the official step.

The unit tests check each loss on small tensors; this checks how ``StudentTeacher`` assembles them, which is where a
subtle bug would hide: the crop swap, the lag of the centers (a step uses the center built from earlier steps), the
pair normalisation, which tokens the iBOT head sees, KoLeo on the student's global CLS tokens, and the EMA over every
teacher submodule. The reference below is written out from the official ``SSLMetaArch.forward_backward`` in plain
tensor code (no ``dinov2.loss`` import) and is run on a deep copy of the same model, fed the same batches.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dinov2.config import load_config
from dinov2.data import build_train_loader
from dinov2.models.student_teacher import StudentTeacher

STUDENT_TEMP, CENTER_MOMENTUM = 0.1, 0.9


def reference_sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """The official algorithm as written (exp, then alternate prototype / sample normalisation); (n, K) -> (n, K)."""
    q = torch.exp(logits / temp).t()  # (K, n)
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


def reference_koleo(x: torch.Tensor) -> torch.Tensor:
    """−mean_i log ‖x̂_i − x̂_nn(i)‖ with a brute-force nearest neighbour on the sphere."""
    x = F.normalize(x, dim=-1, eps=1e-8)
    sims = x @ x.t() - 2 * torch.eye(len(x))
    nearest = sims.argmax(dim=1)
    return -torch.log(torch.linalg.vector_norm(x - x[nearest] + 1e-8, dim=-1) + 1e-8).mean()


class ReferenceStep:
    """One official training step's losses; the centers live here as plain tensors, updated after each use."""

    def __init__(self, model: StudentTeacher, cfg) -> None:
        self.model = model
        self.cfg = cfg
        self.dino_center = torch.zeros(cfg.dino.head_n_prototypes)
        self.ibot_center = torch.zeros(cfg.ibot.head_n_prototypes)

    def targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, new center): softmax with the center of the previous steps, or Sinkhorn-Knopp."""
        if self.cfg.train.centering == "sinkhorn_knopp":
            return reference_sinkhorn_knopp(logits, temp), center
        probs = torch.softmax((logits - center) / temp, dim=-1)
        return probs, center * CENTER_MOMENTUM + logits.mean(dim=0) * (1 - CENTER_MOMENTUM)

    def losses(self, batch: dict, temp: float) -> dict[str, torch.Tensor]:
        student, teacher, cfg = self.model.student, self.model.teacher, self.cfg
        global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
        masks, mask_indices = batch["collated_masks"], batch["mask_indices_list"]
        n_images, n_local = global_crops.shape[0] // 2, cfg.crops.local_crops_number

        with torch.no_grad():
            out = teacher["backbone"](global_crops, is_training=True)
            cls = out["x_norm_clstoken"]
            cls_swapped = torch.cat((cls[n_images:], cls[:n_images]))  # official: teacher crop order swapped
            teacher_dino, self.dino_center = self.targets(teacher["dino_head"](cls_swapped), self.dino_center, temp)
            teacher_patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
            teacher_ibot, self.ibot_center = self.targets(teacher["ibot_head"](teacher_patches), self.ibot_center, temp)

        outputs = student["backbone"]([global_crops, local_crops], masks=[masks, None], is_training=True)
        global_cls, local_cls = outputs[0]["x_norm_clstoken"], outputs[1]["x_norm_clstoken"]
        student_global = student["dino_head"](global_cls)
        student_local = student["dino_head"](local_cls)

        def cross_entropy(student_logits, target):
            return -(target * F.log_softmax(student_logits / STUDENT_TEMP, dim=-1)).sum(dim=-1).mean()

        n_terms = 2 + 2 * n_local
        global_loss = cross_entropy(student_global, teacher_dino) * 2 / n_terms
        local_loss = sum(
            cross_entropy(local, target)
            for local in student_local.chunk(n_local)
            for target in teacher_dino.chunk(2)
        ) / n_terms
        koleo = cfg.dino.koleo_loss_weight * sum(reference_koleo(c) for c in global_cls.chunk(2))
        student_patches = outputs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        token_ce = (teacher_ibot * F.log_softmax(student["ibot_head"](student_patches) / STUDENT_TEMP, dim=-1)).sum(-1)
        # official: forward_masked (Σ w_j ℓ_j / 2B) × loss_scales (2) × ibot_loss_scale (1 / n_global_crops)
        ibot = -(token_ce * batch["masks_weight"]).sum() / masks.shape[0] * 2 * (1 / 2)
        total = cfg.dino.loss_weight * (global_loss + local_loss) + koleo + cfg.ibot.loss_weight * ibot
        return {
            "dino_global_crops_loss": global_loss,
            "dino_local_crops_loss": local_loss,
            "koleo_loss": koleo,
            "ibot_loss": ibot,
            "total_loss": total,
            "dino_teacher_entropy": -(teacher_dino * torch.log(teacher_dino)).sum(dim=-1).mean(),
        }

    @torch.no_grad()
    def ema(self, momentum: float) -> None:
        student = dict(self.model.student.named_parameters())
        for name, param in self.model.teacher.named_parameters():
            param.mul_(momentum).add_(student[name], alpha=1 - momentum)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_objective_equals_reference_over_steps(image_folder, tmp_path, centering):
    overrides = [
        f"train.dataset_path={image_folder}", f"train.output_dir={tmp_path}", "student.arch=vit_custom",
        "student.embed_dim=32", "student.depth=2", "student.num_heads=2", "student.patch_size=8",
        "student.drop_path_rate=0", "student.layerscale=1.0", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=3", "dino.head_n_prototypes=48",
        "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=40",
        "ibot.separate_head=true", "train.batch_size_per_gpu=4", "train.num_workers=0", "train.device=cpu",
        f"train.centering={centering}", "dino.koleo_loss_weight=0.1", "ibot.loss_weight=1.0",
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    ours = StudentTeacher(cfg.student, cfg.dino, cfg.ibot, img_size=cfg.crops.global_crops_size,
                          n_local_crops=cfg.crops.local_crops_number, centering=cfg.train.centering)
    reference = ReferenceStep(copy.deepcopy(ours), cfg)
    ours.train()
    reference.model.train()
    optimizers = [torch.optim.SGD(m.student.parameters(), lr=0.1) for m in (ours, reference.model)]
    loader = iter(build_train_loader(cfg.train, cfg.crops, cfg.ibot, cfg.student.patch_size, rank=0, world_size=1))

    for step, (temp, momentum) in enumerate([(0.04, 0.9), (0.05, 0.8), (0.06, 0.9), (0.07, 0.7)]):
        batch = next(loader)
        assert batch["mask_indices_list"].numel() > 0  # iBOT has tokens to score
        got = ours(batch, temp)
        want = reference.losses(batch, temp)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=2e-5, atol=2e-6, msg=f"step {step} {name}")
        for optimizer, losses in zip(optimizers, (got, want)):
            optimizer.zero_grad()
            losses["total_loss"].backward()
            optimizer.step()
        ours.update_teacher(momentum)
        reference.ema(momentum)

    assert got["dino_local_crops_loss"] > 0 and got["ibot_loss"] > 0 and got["koleo_loss"] != 0
    assert 0 < got["dino_teacher_entropy"] <= math.log(cfg.dino.head_n_prototypes) + 1e-5
    for (name, a), b in zip(ours.teacher.state_dict().items(), reference.model.teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if centering == "centering":  # the lazily applied center equals the reference's eagerly updated one
        ours.dino_loss.apply_center_update()
        ours.ibot_patch_loss.apply_center_update()
        torch.testing.assert_close(ours.dino_loss.center.reshape(-1), reference.dino_center, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.ibot_patch_loss.center.reshape(-1), reference.ibot_center, rtol=1e-4,
                                   atol=1e-6)
        assert reference.dino_center.abs().sum() > 0
