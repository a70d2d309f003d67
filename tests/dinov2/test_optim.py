"""Official parameter groups: layer-wise lr decay, patch-embed multiplier, weight-decay exclusions, last layer."""

import copy

import pytest
import torch

from dinov2.models.dino_head import DINOHead
from dinov2.models.registry import build_backbone
from dinov2.train.optim import apply_schedules, build_optimizer, build_param_groups, param_group_key


def _multipliers(backbone, head):
    table = {}
    for prefix, module in (("backbone", backbone), ("head", head)):
        n_blocks = getattr(module, "n_blocks", None)
        chunked = bool(getattr(module, "chunked_blocks", False))
        for name, _ in module.named_parameters():
            table[f"{prefix}.{name}"] = param_group_key(name, n_blocks, chunked, 0.9, 0.2)
    return table


@pytest.mark.parametrize("block_chunks", [0, 4])
def test_vit_small_multipliers_match_spec(block_chunks):
    with torch.device("meta"):
        backbone = build_backbone("vit_small", patch_size=14, block_chunks=block_chunks, init_values=1e-5)
        head = DINOHead(384, 1024, hidden_dim=64, bottleneck_dim=32)
    table = _multipliers(backbone, head)
    last_block = "blocks.11" if block_chunks == 0 else "blocks.3.11"
    first_block = "blocks.0" if block_chunks == 0 else "blocks.0.0"
    assert table["backbone.cls_token"].lr_multiplier == pytest.approx(0.9**13)
    assert table["backbone.pos_embed"].lr_multiplier == pytest.approx(0.25419, abs=1e-5)
    assert table["backbone.patch_embed.proj.weight"].lr_multiplier == pytest.approx(0.05084, abs=1e-5)
    assert table[f"backbone.{first_block}.attn.qkv.weight"].lr_multiplier == pytest.approx(0.28243, abs=1e-5)
    assert table[f"backbone.{last_block}.mlp.fc1.weight"].lr_multiplier == pytest.approx(0.9)
    assert table["backbone.norm.weight"].lr_multiplier == 1.0
    assert table["head.mlp.0.weight"].lr_multiplier == 1.0
    # weight decay: biases, norms and LayerScale gammas are excluded; tokens and weight_g are decayed (as official)
    assert table["backbone.cls_token"].wd_multiplier == 1.0
    assert table["backbone.mask_token"].wd_multiplier == 1.0
    assert table[f"backbone.{first_block}.ls1.gamma"].wd_multiplier == 0.0
    assert table[f"backbone.{first_block}.norm1.weight"].wd_multiplier == 0.0
    assert table[f"backbone.{first_block}.attn.qkv.bias"].wd_multiplier == 0.0
    assert table["head.last_layer.weight_g"].wd_multiplier == 1.0
    assert table["head.last_layer.weight_g"].is_last_layer and not table["head.mlp.0.weight"].is_last_layer


def test_groups_are_fused_and_scheduled():
    backbone = build_backbone("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
                              init_values=1e-5)
    head = DINOHead(32, 64, hidden_dim=16, bottleneck_dim=8)
    groups = build_param_groups({"backbone": backbone, "dino_head": head}, 0.9, 0.2)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(backbone.parameters())) + len(list(head.parameters()))
    keys = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}
    assert len(keys) == len(groups)  # fused: one group per distinct key
    optimizer = build_optimizer(groups, 0.9, 0.999)
    apply_schedules(optimizer, lr=1.0, wd=0.5, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.5 * group["wd_multiplier"])


def _model_and_twin():
    torch.manual_seed(0)
    backbone = build_backbone("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
                              init_values=1e-5)
    head = DINOHead(32, 64, hidden_dim=16, bottleneck_dim=8)
    modules = {"backbone": backbone, "dino_head": head}
    twin = {name: copy.deepcopy(m) for name, m in modules.items()}
    return modules, twin


def _set_grads(modules: dict, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for module in modules.values():
        for p in module.parameters():
            p.grad = torch.randn(p.shape, generator=g)


def test_optimizer_step_equals_per_parameter_adamw_bitwise():
    # The multi-tensor (foreach) AdamW the trainer builds gives exactly the per-parameter loop's numbers.
    modules, twin = _model_and_twin()
    fast = build_optimizer(build_param_groups(modules, 0.9, 0.2), 0.9, 0.999)
    groups = build_param_groups(twin, 0.9, 0.2)
    loop = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), foreach=False)
    for step in range(4):
        for opt, mods in ((fast, modules), (loop, twin)):
            apply_schedules(opt, lr=1e-3 * (step + 1), wd=0.04 + 0.01 * step, last_layer_lr=5e-4)
            _set_grads(mods, step)
            opt.step()
    for name in modules:
        for (pname, a), b in zip(modules[name].named_parameters(), twin[name].parameters()):
            assert torch.equal(a, b), f"{name}.{pname}"


def test_ema_update_equals_per_parameter_loop_bitwise():
    from dinov2.distributed.parallel import update_teacher
    from dinov2.models.student_teacher import StudentTeacher

    model = StudentTeacher.__new__(StudentTeacher)
    torch.nn.Module.__init__(model)
    student, teacher = _model_and_twin()
    model.student, model.teacher = torch.nn.ModuleDict(student), torch.nn.ModuleDict(teacher)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    expected = {}
    for name, module in model.teacher.items():
        for (pname, t), s in zip(module.named_parameters(), model.student[name].parameters()):
            expected[f"{name}.{pname}"] = t.detach().clone().mul_(0.992).add_(s.detach(), alpha=1 - 0.992)
    update_teacher(model, 0.992)
    for key, value in model.teacher.named_parameters():
        assert torch.equal(value, expected[key]), key
