"""Student and EMA teacher (backbone + DINO head + optional iBOT head) and the assembly of the DINOv2 objective.

``forward(batch, teacher_temp)`` returns a dict of named loss terms; it never calls backward. The teacher sees the two
global crops only; the student sees all crops in one packed multi-crop forward.

Takes the ``student``, ``dino`` and ``ibot`` config sections plus three plain values (crop size, number of local
crops, centering mode); the teacher's schedules reach it as per-step arguments.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.autograd.profiler import record_function

from dinov2.config import DinoConfig, IbotConfig, StudentConfig
from dinov2.loss import DINOLoss, KoLeoLoss, dino_crop_losses, iBOTPatchLoss
from dinov2.models.dino_head import DINOHead
from dinov2.models.registry import build_backbone


def target_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the probabilities along the last dim (rows of (n, K) targets, or one (K,) distribution),
    averaged over rows; the collapse monitors' measure (ln K: uniform, 0: one prototype)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()


def masked_patch_tokens(out: dict, batch: dict) -> torch.Tensor:
    """The normalised patch tokens (M, D) of the global crops at the batch's masked positions (iBOT's rows)."""
    patches = out["x_norm_patchtokens"].flatten(0, 1)  # (2B*N, D)
    return patches.index_select(0, batch["mask_indices_list"])


def backbone_kwargs(student: StudentConfig, img_size: int) -> dict:
    """Constructor arguments shared by the student and the teacher backbone."""
    kwargs = dict(
        img_size=img_size,
        patch_size=student.patch_size,
        init_values=student.layerscale,
        ffn_layer=student.ffn_layer,
        block_chunks=student.block_chunks,
        qkv_bias=student.qkv_bias,
        proj_bias=student.proj_bias,
        ffn_bias=student.ffn_bias,
        num_register_tokens=student.num_register_tokens,
        interpolate_antialias=student.interpolate_antialias,
        interpolate_offset=student.interpolate_offset,
        attn_backend=student.attn_backend,
    )
    if student.arch == "vit_custom":
        kwargs.update(embed_dim=student.embed_dim, depth=student.depth, num_heads=student.num_heads)
    return kwargs


def build_backbones(student: StudentConfig, img_size: int) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) backbones for ``img_size`` crops (``crops.global_crops_size``); only the student has
    stochastic depth."""
    kwargs = backbone_kwargs(student, img_size)
    student_backbone = build_backbone(
        student.arch,
        drop_path_rate=student.drop_path_rate,
        drop_path_uniform=student.drop_path_uniform,
        **kwargs,
    )
    teacher_backbone = build_backbone(student.arch, **kwargs)
    return student_backbone, teacher_backbone


def build_heads(embed_dim: int, dino: DinoConfig, ibot: IbotConfig) -> dict[str, DINOHead]:
    """The heads the objective needs: ``dino_head`` when DINO is on or iBOT shares it (unlike the official code,
    iBOT alone with a shared head works), ``ibot_head`` when iBOT has its own."""
    heads = {}
    do_ibot = ibot.loss_weight > 0
    if dino.loss_weight > 0 or (do_ibot and not ibot.separate_head):
        heads["dino_head"] = DINOHead(embed_dim, dino.head_n_prototypes, nlayers=dino.head_nlayers,
                                      hidden_dim=dino.head_hidden_dim, bottleneck_dim=dino.head_bottleneck_dim)
    if do_ibot and ibot.separate_head:
        heads["ibot_head"] = DINOHead(embed_dim, ibot.head_n_prototypes, nlayers=ibot.head_nlayers,
                                      hidden_dim=ibot.head_hidden_dim, bottleneck_dim=ibot.head_bottleneck_dim)
    return heads


def ibot_prototypes(dino: DinoConfig, ibot: IbotConfig) -> int:
    """Prototype count of the iBOT head (its own, or the shared DINO head's)."""
    return ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes


class Objective(nn.Module):
    """The settings of the DINOv2 objective that self-distillation (:class:`StudentTeacher`) and distillation
    (``Distillation``) both compute: which terms are on, their weights, the teacher's centering mode (``centering``
    or ``sinkhorn_knopp``) and the number of local crops per image."""

    # Built by each subclass (self-distillation adds a Sinkhorn-Knopp queue to DINO's, distillation does not).
    dino_loss: DINOLoss
    ibot_patch_loss: iBOTPatchLoss

    def __init__(self, dino: DinoConfig, ibot: IbotConfig, *, n_local_crops: int, centering: str) -> None:
        super().__init__()
        self.do_dino = dino.loss_weight > 0
        self.do_koleo = dino.koleo_loss_weight > 0
        self.do_ibot = ibot.loss_weight > 0
        self.dino_loss_weight = dino.loss_weight
        self.koleo_loss_weight = dino.koleo_loss_weight
        self.ibot_loss_weight = ibot.loss_weight
        self.centering = centering
        self.n_local_crops = n_local_crops

    @torch.no_grad()
    def targets_from_rows(
        self, dino_logits: torch.Tensor | None, ibot_logits: torch.Tensor | None, teacher_temp: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher target probabilities from fp32 teacher logits, DINO (n, K) CLS rows and iBOT (m, K) patch rows,
        either may be None: softmax with the EMA center, then one center update from these rows (``centering``),
        or Sinkhorn-Knopp (``sinkhorn_knopp``), at ``teacher_temp``. The one place both objectives turn logits into
        targets, so self-distillation and distillation cannot drift apart."""
        dino_targets = ibot_targets = None
        if dino_logits is not None:
            if self.centering == "centering":
                dino_targets = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
                self.dino_loss.update_center(dino_logits)
            else:
                dino_targets = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
        if ibot_logits is not None:
            if self.centering == "centering":
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(ibot_logits[None], teacher_temp)[0]
                self.ibot_patch_loss.update_center(ibot_logits[None])
            else:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp)
        return dino_targets, ibot_targets


class StudentTeacher(Objective):
    """The DINOv2 meta-architecture (official ``SSLMetaArch``) without backward, FSDP or device handling.

    Args:
        student: the backbone architecture (official ``cfg.student``), shared by the teacher.
        dino: DINO head and loss weights (``loss_weight`` 0 turns DINO off); ``koleo_loss_weight`` too.
        ibot: iBOT head and loss weight; ``separate_head`` builds its own head instead of sharing DINO's.
        img_size: the global crop size the backbones are built for (``crops.global_crops_size``).
        n_local_crops: local crops per image (``crops.local_crops_number``).
        centering: ``centering`` (softmax with an EMA center) or ``sinkhorn_knopp`` (``train.centering``).
    """

    def __init__(self, student: StudentConfig, dino: DinoConfig, ibot: IbotConfig, *, img_size: int,
                 n_local_crops: int, centering: str) -> None:
        super().__init__(dino, ibot, n_local_crops=n_local_crops, centering=centering)
        self.separate_ibot_head = ibot.separate_head

        student_backbone, teacher_backbone = build_backbones(student, img_size)
        heads = build_heads(student_backbone.embed_dim, dino, ibot)
        self.student = nn.ModuleDict({"backbone": student_backbone, **heads})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone,
                                      **{name: copy.deepcopy(head) for name, head in heads.items()}})
        # Teacher = student at initialisation (as official prepare_for_distributed_training).
        self.teacher.load_state_dict(self.student.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False

        queue = dino.sinkhorn_queue_size if self.centering == "sinkhorn_knopp" else 0
        self.dino_loss = DINOLoss(dino.head_n_prototypes, queue_size=queue)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes(dino, ibot))
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses stochastic depth
        return self

    @property
    def ibot_head_name(self) -> str:
        return "ibot_head" if self.separate_ibot_head else "dino_head"

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher head outputs, fp32: DINO (2B, K) of the global crops (crop-major), iBOT (M, K) of masked tokens."""
        out = self.teacher["backbone"](batch["collated_global_crops"], is_training=True)
        # natural crop order; dino_crop_losses pairs student crop 1 with teacher crop 2 and vice versa
        cls = out["x_norm_clstoken"] if self.do_dino else None
        masked = None
        if self.do_ibot:
            masked = masked_patch_tokens(out, batch)  # (M, D)
        dino_logits, ibot_logits = self._heads(self.teacher, cls, masked)
        return (
            dino_logits.float() if dino_logits is not None else None,
            ibot_logits.float() if ibot_logits is not None else None,
        )

    def _heads(
        self, role: nn.ModuleDict, cls: torch.Tensor | None, masked: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Head outputs of ``role`` (student or teacher) for CLS tokens (DINO head) and masked patch tokens (iBOT
        head); either input may be None. A shared head runs once on both sets of rows, as the official
        ``SSLMetaArch`` does: its weight-normalised prototype layer (K x bottleneck) is then built, cast by autocast,
        and back-propagated through once per step instead of twice."""
        if cls is not None and masked is not None and not self.separate_ibot_head:
            logits = role["dino_head"](torch.cat((cls, masked)))
            return logits[: cls.shape[0]], logits[cls.shape[0] :]
        dino = role["dino_head"](cls) if cls is not None else None
        ibot = role[self.ibot_head_name](masked) if masked is not None else None
        return dino, ibot

    @torch.no_grad()
    def targets_from_logits(
        self, logits: list[tuple[torch.Tensor | None, torch.Tensor | None]], teacher_temp: float
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Teacher targets of one optimizer step's micro-batches, computed over all of them at once.

        ``logits`` holds ``teacher_logits`` of each micro-batch. The rows of all micro-batches are concatenated, so
        centering (softmax with the center, then one center update from all rows) and Sinkhorn-Knopp see the whole
        step's batch, exactly as one large batch would; the targets are then split back per micro-batch. With one
        micro-batch this is the official step unchanged.
        """
        dino_parts = [d for d, _ in logits if d is not None]
        ibot_parts = [i for _, i in logits if i is not None]
        dino_all = None
        if dino_parts:  # crop-major over all images (crop 1 of every image, then crop 2), the large batch's order
            by_crop = [d.unflatten(0, (2, -1)) for d in dino_parts]  # (2, B_i, K) each
            dino_all = dino_parts[0] if len(dino_parts) == 1 else torch.cat(by_crop, dim=1).flatten(0, 1)
        ibot_all = (ibot_parts[0] if len(ibot_parts) == 1 else torch.cat(ibot_parts)) if ibot_parts else None
        dino_targets, ibot_targets = self.targets_from_rows(dino_all, ibot_all, teacher_temp)
        if len(logits) == 1:
            return [(dino_targets, ibot_targets)]
        dino_split = None
        if dino_targets is not None:
            per_crop = dino_targets.unflatten(0, (2, -1)).split([len(d) // 2 for d in dino_parts], dim=1)
            dino_split = [t.flatten(0, 1) for t in per_crop]
        ibot_split = ibot_targets.split([len(i) for i in ibot_parts]) if ibot_targets is not None else None
        return [
            (dino_split[k] if dino_split is not None else None, ibot_split[k] if ibot_split is not None else None)
            for k in range(len(logits))
        ]

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher target probabilities: DINO (2B, K) of the global crops (crop-major), iBOT (M, K) masked tokens."""
        return self.targets_from_logits([self.teacher_logits(batch)], teacher_temp)[0]

    def forward(
        self,
        batch: dict,
        teacher_temp: float,
        targets: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one step. ``total_loss`` is exactly what is back-propagated.

        With DINO on, ``dino_teacher_entropy`` (no gradient, nats) is the mean entropy of the teacher's targets,
        logged beside the losses as the DINO paper's collapse monitor: it tends to ln K when centering dominates
        sharpening (each cross-entropy pair is then ≥ ln K, so the DINO terms stall near (pairs / T)·ln K), and to 0
        when every image gets one prototype. ``dino_teacher_marginal_entropy`` is the entropy of the batch-mean
        target: near 0 when every image gets the same prototype(s), which low per-image entropy alone does not show.

        Args:
            batch: the collated batch (``collated_global_crops`` (2B,3,G,G) crop-major, ``collated_local_crops``
                (n_local*B,3,L,L), ``collated_masks`` (2B,N) bool, ``mask_indices_list`` (M,), ``masks_weight``
                (M,), ``n_masked_patches`` (1,)).
            teacher_temp: the teacher softmax / Sinkhorn-Knopp temperature of this iteration.
            targets: precomputed (DINO, iBOT) teacher targets of this batch (gradient accumulation computes them for
                all micro-batches first, see ``targets_from_logits``); None computes them here.
        """
        if targets is None:
            with record_function("teacher_forward"):
                targets = self.teacher_targets(batch, teacher_temp)
        dino_targets, ibot_targets = targets
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"]
        has_locals = self.n_local_crops > 0 and local_crops.shape[0] > 0
        crops = [global_crops, local_crops] if has_locals else [global_crops]
        crop_masks = [masks if self.do_ibot else None, None] if has_locals else [masks if self.do_ibot else None]
        with record_function("student_forward"):
            outputs = self.student["backbone"](crops, masks=crop_masks, is_training=True)
        with record_function("heads_losses"):
            return self._student_losses(batch, outputs, has_locals, dino_targets, ibot_targets)

    def _student_losses(
        self,
        batch: dict,
        outputs: list[dict],
        has_locals: bool,
        dino_targets: torch.Tensor | None,
        ibot_targets: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The student heads on the backbone ``outputs`` (global crops, then locals) and the loss terms."""
        masks = batch["collated_masks"]
        global_out = outputs[0]
        global_cls = global_out["x_norm_clstoken"]  # (2B, D)
        cls = None
        if self.do_dino:
            cls = torch.cat([global_cls, outputs[1]["x_norm_clstoken"]]) if has_locals else global_cls
        masked = None
        if self.do_ibot:
            masked = masked_patch_tokens(global_out, batch)  # (M, D)
        dino_logits, ibot_logits = self._heads(self.student, cls, masked)

        losses: dict[str, torch.Tensor] = {}
        total = global_cls.new_zeros((), dtype=torch.float32)
        if self.do_dino:
            logits = dino_logits.float()  # (2B + n_local*B, K)
            global_logits, local_logits = logits[: global_cls.shape[0]], logits[global_cls.shape[0] :]
            dino_terms = dino_crop_losses(global_logits, local_logits, dino_targets, self.dino_loss.student_temp)
            for name, value in dino_terms.items():
                losses[name] = value
                total = total + self.dino_loss_weight * value
            # A collapse monitor, not a loss: ln K means uniform targets (centering wins), 0 one-hot ones.
            losses["dino_teacher_entropy"] = target_entropy(dino_targets)
            losses["dino_teacher_marginal_entropy"] = target_entropy(dino_targets.mean(0))
        if self.do_koleo:
            koleo = sum(self.koleo_loss(chunk) for chunk in global_cls.chunk(2))
            losses["koleo_loss"] = self.koleo_loss_weight * koleo
            total = total + losses["koleo_loss"]
        if self.do_ibot:
            ibot_loss = self.ibot_patch_loss.forward_masked(
                ibot_logits.float(),  # (M, K)
                ibot_targets,
                student_masks_flat=masks,
                n_masked_patches=int(batch["n_masked_patches"].item()),
                masks_weight=batch["masks_weight"],
            )
            losses["ibot_loss"] = ibot_loss
            total = total + self.ibot_loss_weight * ibot_loss
        losses["total_loss"] = total
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, over every parameter of every teacher submodule."""
        teacher_params, student_params = [], []
        for name, teacher_module in self.teacher.items():
            teacher_params.extend(teacher_module.parameters())
            student_params.extend(self.student[name].parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
