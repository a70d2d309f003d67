"""Distillation of a frozen pretrained teacher into one or more smaller students (DINOv2 paper, section "Distillation
of pretrained features"; the official repositories never released this code).

The paper's recipe: the large model is a frozen teacher; the objective stays DINO + iBOT + KoLeo; the students use
neither masking nor stochastic depth, and the iBOT loss covers every patch token of the two global crops; an EMA of
each student is kept and is the final model. Where the paper is silent, this module chooses:

- targets are computed by self-distillation's own function (``Objective.targets_from_rows``: teacher head, then
  centering or Sinkhorn-Knopp at the scheduled teacher temperature), with the one center EMA on the frozen
  teacher's outputs, started at zero;
- DINO pairs are the cross-view ones of the SSL objective (student crop 1 with teacher crop 2 and so on), so the
  objective is literally the same;
- every student has its own DINO (and iBOT) head, as wide as its own embedding, with the teacher's prototype count
  (the cross-entropy compares distributions over the same prototypes);
- the teacher runs once per batch and its targets are shared by all students; students never interact, so a run
  with several students trains each exactly as a run with that student alone would (same batches);
- ``feature_loss_weight`` > 0 (this project's, off by default) adds a feature term: each student's CLS and
  global-crop patch tokens, through its own linear projection to the teacher's width (part ``feature_head``),
  regress the frozen teacher's tokens by cosine distance (see ``dinov2/loss/feature_distillation_loss.py``);
- the spare EMA averages the student's iterates only, with the initial weights' share removed (the bias correction
  of Adam, Kingma & Ba 2015, section 3, applied to weights), at a constant momentum 1 - 1/H, H = ``ema_horizon`` x
  the run's iterations (default 10%), rather than the teacher-momentum schedule. That schedule serves the
  self-distillation teacher, which must settle; as an average its cosine rise to 1 stops taking in the student once
  1/(1 - m_t) exceeds the iterations left, about 45% into a 300-iteration run (m 0.99 -> 1) and 95% into the
  paper's 625k: a short distillation's final model was then its student from mid-run (bench/distill.py on photos,
  feature term on: kNN 89.2% against 93.8% for the live student; 92.9% with the constant momentum).
  In self-distillation the EMA *is* the teacher and must start equal to the student; here it only has to be the
  final model, and a plain EMA started at the random initialisation keeps prod(m_t) of it, 0.74 after 60 steps of
  the 0.99 -> 1 cosine schedule (a distilled student then scores like an untrained one). Over the paper's 625k
  iterations that share is 0 and the two EMAs are the same.

Interface: the same as :class:`~dinov2.models.student_teacher.StudentTeacher`, so the training loop is shared:
``forward(batch, teacher_temp)`` returns named loss terms (``<student>/<term>``, their sum ``total_loss`` and the
teacher's ``dino_teacher_entropy``), ``student`` holds every trained part and ``teacher`` the EMA copy of each (the
role the EMA teacher plays in the loop: momentum update, export, kNN), keyed ``<student>__<part>`` (``backbone``,
``dino_head``, ``ibot_head``, ``feature_head``). The large pretrained model is ``frozen_teacher``.
"""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn

from dinov2.config import DinoConfig, IbotConfig, StudentConfig
from dinov2.loss import DINOLoss, FeatureDistillationLoss, KoLeoLoss, dino_crop_losses, iBOTPatchLoss
from dinov2.models.registry import build_backbone
from dinov2.models.student_teacher import (
    Objective,
    backbone_kwargs,
    build_heads,
    ibot_prototypes,
    target_entropy,
)

SEPARATOR = "__"  # between a student's name and its part in the keys of ``student`` / ``teacher``
FEATURE_HEAD = "feature_head"  # each student's projection to the teacher's width, with distillation's feature term


def part_key(name: str, part: str) -> str:
    """``<name>__<part>``: the key of one student's part (``backbone``, ``dino_head``, ``ibot_head``)."""
    return f"{name}{SEPARATOR}{part}"


def split_key(key: str) -> tuple[str, str]:
    """(student name, part) of a part key; ("", key) for the plain keys of self-distillation."""
    name, _, part = key.rpartition(SEPARATOR)
    return name, part


def precision_module(part: str) -> str:
    """The ``compute_precision`` module whose settings a part takes: its own, or the DINO head's for the feature
    projection (a head-sized linear layer outside the official model)."""
    return "dino_head" if part == FEATURE_HEAD else part


def split_by_student(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A ``teacher`` (EMA) state dict, ``<name>__<part>.<param>``, as one ``<part>.<param>`` dict per student."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, rest = key.partition(SEPARATOR)  # names never contain the separator
        out.setdefault(name, {})[rest] = value
    return out


def student_seed(seed: int, name: str) -> int:
    """Each student's initialisation stream: from the run seed and its name only, so adding a student to a run does
    not change how another is initialised."""
    return seed + zlib.crc32(name.encode())


class Distillation(Objective):
    """A frozen teacher (backbone + heads) and students with their EMA copies; no backward, FSDP or device handling.

    Args:
        teacher: the teacher backbone's architecture (the ``student`` section of the teacher's own config).
        teacher_dino: the teacher's DINO head settings (its config's ``dino`` section).
        teacher_ibot: the teacher's iBOT head settings (its config's ``ibot`` section).
        students: name -> architecture of each student; stochastic depth is never used here.
        dino: the students' DINO heads and the loss weights (DINO, KoLeo) of this run.
        ibot: the students' iBOT heads and loss weight of this run.
        img_size: global crop size; every backbone is built for it.
        n_local_crops: local crops per image (students only; the teacher sees the global crops).
        centering: ``centering`` or ``sinkhorn_knopp``, applied to the frozen teacher's logits.
        feature_loss_weight: weight of the feature term; 0 (default) builds no projection and leaves the paper's
            objective exactly.
        spare_ema_momentum: the spare EMA's constant momentum; None follows the scheduled teacher momentum.
        seed: base of each student's initialisation stream (see :func:`student_seed`).

    Raises:
        ValueError: teacher and student prototype counts differ, or the teacher lacks a head the objective needs.
    """

    def __init__(self, teacher: StudentConfig, teacher_dino: DinoConfig, teacher_ibot: IbotConfig,
                 students: dict[str, StudentConfig], dino: DinoConfig, ibot: IbotConfig, *, img_size: int,
                 n_local_crops: int, centering: str, feature_loss_weight: float = 0.0,
                 spare_ema_momentum: float | None = None, seed: int = 0) -> None:
        super().__init__(dino, ibot, n_local_crops=n_local_crops, centering=centering)
        self.student_names = list(students)
        self.student_ibot_head = "ibot_head" if ibot.separate_head else "dino_head"
        self.teacher_ibot_head = "ibot_head" if teacher_ibot.separate_head else "dino_head"

        teacher_backbone = build_backbone(teacher.arch, **backbone_kwargs(teacher, img_size))
        teacher_parts = {"backbone": teacher_backbone, **build_heads(teacher_backbone.embed_dim, teacher_dino,
                                                                     teacher_ibot)}
        self.frozen_teacher = nn.ModuleDict(teacher_parts)
        if self.do_dino and "dino_head" not in teacher_parts:
            raise ValueError("the teacher config builds no DINO head (its dino.loss_weight is 0) but DINO is on")
        if self.do_ibot and self.teacher_ibot_head not in teacher_parts:
            raise ValueError("the teacher config builds no iBOT head (its ibot.loss_weight is 0) but iBOT is on")
        if self.do_dino and teacher_dino.head_n_prototypes != dino.head_n_prototypes:
            raise ValueError(f"dino.head_n_prototypes: {dino.head_n_prototypes} differs from the teacher's "
                             f"{teacher_dino.head_n_prototypes}")
        if self.do_ibot and ibot_prototypes(teacher_dino, teacher_ibot) != ibot_prototypes(dino, ibot):
            raise ValueError(f"ibot.head_n_prototypes: {ibot_prototypes(dino, ibot)} differs from the teacher's "
                             f"{ibot_prototypes(teacher_dino, teacher_ibot)}")

        parts: dict[str, nn.Module] = {}
        for name, arch in students.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(student_seed(seed, name))
                # the paper's recipe: no stochastic depth for the students (and no masking, see forward)
                backbone = build_backbone(arch.arch, **backbone_kwargs(arch, img_size))
                # nothing is masked, so the mask token is never used: not trained (DDP needs a gradient for every
                # trained parameter), it keeps its initial value in the exports
                backbone.mask_token.requires_grad = False
                parts[part_key(name, "backbone")] = backbone
                for head_name, head in build_heads(backbone.embed_dim, dino, ibot).items():
                    parts[part_key(name, head_name)] = head
                if feature_loss_weight > 0:  # built last: the other parts' initialisation does not change
                    projection = nn.Linear(backbone.embed_dim, teacher_backbone.embed_dim)
                    nn.init.trunc_normal_(projection.weight, std=0.02)  # as the heads' linear layers
                    nn.init.zeros_(projection.bias)
                    parts[part_key(name, FEATURE_HEAD)] = projection
        self.student = nn.ModuleDict(parts)
        self.teacher = nn.ModuleDict({key: copy.deepcopy(module) for key, module in parts.items()})  # the EMAs
        for param in [*self.frozen_teacher.parameters(), *self.teacher.parameters()]:
            param.requires_grad = False

        # prod of the momenta so far: the share of the initial weights a plain EMA would still hold (float64: it
        # is divided by 1 - share, which fp32 rounds badly once momenta are within 1e-7 of 1)
        self.register_buffer("ema_init_share", torch.ones((), dtype=torch.float64))
        # no Sinkhorn-Knopp queue: with one, the targets of a batch of 32 were no better than the official ones
        # (bench/distill.py, README "Distillation")
        self.dino_loss = DINOLoss(dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes(dino, ibot))
        self.koleo_loss = KoLeoLoss()
        self.feature_loss_weight = feature_loss_weight
        self.spare_ema_momentum = spare_ema_momentum
        self.feature_loss = FeatureDistillationLoss()

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.frozen_teacher.eval()
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_outputs(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor | None]:
        """The frozen teacher's outputs, once per batch: ``dino_targets`` (2B, K) of the global crops in the natural
        crop order, ``ibot_targets`` (2B·N, K) of every patch token of the global crops (image-major, then token),
        and with the feature term its tokens ``cls`` (2B, D_t) and ``patches`` (2B, N, D_t); None where unused."""
        out = self.frozen_teacher["backbone"](batch["collated_global_crops"], is_training=True)
        dino_logits = ibot_logits = None
        if self.do_dino:
            dino_logits = self.frozen_teacher["dino_head"](out["x_norm_clstoken"]).float()  # (2B, K)
        if self.do_ibot:
            patches = out["x_norm_patchtokens"].flatten(0, 1)  # (2B*N, D)
            ibot_logits = self.frozen_teacher[self.teacher_ibot_head](patches).float()  # (2B*N, K)
        dino_targets, ibot_targets = self.targets_from_rows(dino_logits, ibot_logits, teacher_temp)
        features = self.feature_loss_weight > 0
        return {"dino_targets": dino_targets, "ibot_targets": ibot_targets,
                "cls": out["x_norm_clstoken"] if features else None,
                "patches": out["x_norm_patchtokens"] if features else None}

    def student_losses(self, name: str, batch: dict,
                       teacher: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """One student's loss terms against the shared teacher outputs (see :meth:`teacher_outputs`); ``total_loss``
        is their weighted sum."""
        dino_targets, ibot_targets = teacher["dino_targets"], teacher["ibot_targets"]
        global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
        has_locals = self.n_local_crops > 0 and local_crops.shape[0] > 0
        crops = [global_crops, local_crops] if has_locals else [global_crops]
        outputs = self.student[part_key(name, "backbone")](crops, masks=[None] * len(crops), is_training=True)
        global_out = outputs[0]
        global_cls = global_out["x_norm_clstoken"]  # (2B, D)

        losses: dict[str, torch.Tensor] = {}
        total = global_cls.new_zeros((), dtype=torch.float32)
        if self.do_dino:
            cls_tokens = [global_cls] + ([outputs[1]["x_norm_clstoken"]] if has_locals else [])
            logits = self.student[part_key(name, "dino_head")](torch.cat(cls_tokens)).float()  # (2B + n_local*B, K)
            global_logits, local_logits = logits[: global_cls.shape[0]], logits[global_cls.shape[0] :]
            for term, value in dino_crop_losses(global_logits, local_logits, dino_targets,
                                                self.dino_loss.student_temp).items():
                losses[term] = value
                total = total + self.dino_loss_weight * value
        if self.do_koleo:
            losses["koleo_loss"] = self.koleo_loss_weight * sum(self.koleo_loss(c) for c in global_cls.chunk(2))
            total = total + losses["koleo_loss"]
        patch_tokens = global_out["x_norm_patchtokens"]  # (2B, N, D_s): nothing masked
        if self.do_ibot:
            logits = self.student[part_key(name, self.student_ibot_head)](patch_tokens.flatten(0, 1)).float()
            every_token = torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=logits.device)  # (2B, N)
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(logits, ibot_targets, every_token)
            total = total + self.ibot_loss_weight * losses["ibot_loss"]
        if self.feature_loss_weight > 0:
            projection = self.student[part_key(name, FEATURE_HEAD)]
            losses["feature_cls_loss"] = self.feature_loss(projection(global_cls), teacher["cls"])
            losses["feature_patch_loss"] = self.feature_loss(projection(patch_tokens.flatten(0, 1)),
                                                             teacher["patches"].flatten(0, 1))
            total = total + self.feature_loss_weight * (losses["feature_cls_loss"] + losses["feature_patch_loss"])
        losses["total_loss"] = total
        return losses

    def forward(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``<student>/<term>`` per student, ``total_loss`` (their sum, what is
        back-propagated; students share no parameter, so each gets exactly its own gradient) and
        ``dino_teacher_entropy`` (the frozen teacher's target entropy, see ``StudentTeacher.forward``).

        Args:
            batch: the collated batch of the SSL trainer; its iBOT masks are not used (students see whole crops).
            teacher_temp: the teacher temperature of this iteration.
        """
        teacher = self.teacher_outputs(batch, teacher_temp)
        losses: dict[str, torch.Tensor] = {}
        total = None
        for name in self.student_names:
            terms = self.student_losses(name, batch, teacher)
            losses.update({f"{name}/{term}": value for term, value in terms.items()})
            total = terms["total_loss"] if total is None else total + terms["total_loss"]
        if self.do_dino:
            losses["dino_teacher_entropy"] = target_entropy(teacher["dino_targets"])
        losses["total_loss"] = total
        return losses

    @torch.no_grad()
    def ema_momentum(self, momentum: float) -> float:
        """The momentum of this step's EMA update for the scheduled ``momentum`` (replaced by ``spare_ema_momentum``
        when set: m_t below); call once per update.

        With P_t = m_1 ... m_t, the EMA e_t = m'_t e_(t-1) + (1 - m'_t) s_t with m'_t = m_t (1 - P_(t-1)) / (1 - P_t)
        is the plain EMA started at zero divided by 1 - P_t: the same weights on the student iterates s_t, none on
        the initialisation (m'_1 = 0: the first update copies the student). m'_t -> m_t once P_t is negligible.
        """
        if self.spare_ema_momentum is not None:
            momentum = self.spare_ema_momentum
        before = float(self.ema_init_share)
        after = before * momentum
        self.ema_init_share.fill_(after)
        if after >= 1.0:  # momentum 1 from the start: nothing to average yet, the EMA stays put
            return momentum
        return momentum * (1.0 - before) / (1.0 - after)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of every student part with the initialisation's share removed (see :meth:`ema_momentum`):
        ema <- m' * ema + (1 - m') * student (the frozen teacher never changes)."""
        momentum = self.ema_momentum(momentum)
        ema = [p for module in self.teacher.values() for p in module.parameters()]
        live = [p for key in self.teacher for p in self.student[key].parameters()]
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, live, alpha=1 - momentum)


__all__ = ["Distillation", "FEATURE_HEAD", "SEPARATOR", "part_key", "precision_module", "split_by_student", "split_key",
           "student_seed"]
