"""Strict loading of official-named weights into real (tiny) backbones and exact export → import round trips."""

from __future__ import annotations

import pytest
import torch

from dinov2.models.registry import build_backbone
from dinov2.weights import (
    BackboneSpec,
    export_backbone,
    load_backbone,
    load_backbone_weights,
    load_into,
    official_shapes,
    resize_pos_embed,
)
from dinov2.weights.arch import build_from_spec
from dinov2.weights.formats import chunk, unchunk

TINY = BackboneSpec(embed_dim=64, depth=3, num_heads=1, patch_size=14, img_size=56)
TINY_REG = BackboneSpec(embed_dim=64, depth=3, num_heads=1, patch_size=14, img_size=56, num_register_tokens=4)
TINY_G = BackboneSpec(embed_dim=128, depth=2, num_heads=2, patch_size=14, img_size=42, ffn_layer="swiglufused")
SPECS = {"mlp": TINY, "reg4": TINY_REG, "swiglu": TINY_G}


def random_state(spec: BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-named random weights; LayerNorm and LayerScale randomised too, so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.2 for k, s in official_shapes(spec).items()}


def features(model: torch.nn.Module, spec: BackboneSpec, size: int | None = None, seed: int = 1) -> dict:
    side = size or spec.img_size
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model.eval().forward_features(x)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def assert_features_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) and "x_norm_clstoken" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("block_chunks", [0, 2])
def test_model_keys_match_official_table(name, block_chunks):
    spec = SPECS[name]
    model = build_from_spec(spec, block_chunks=block_chunks)
    shapes = {k: tuple(v.shape) for k, v in unchunk(model.state_dict()).items()}
    assert shapes == official_shapes(spec)
    if block_chunks == 0:
        assert list(shapes) == list(official_shapes(spec))  # same order too
    else:
        assert any(k.startswith("blocks.1.") and k.count(".") >= 3 for k in model.state_dict())


def test_big_archs_on_meta_match_table():
    with torch.device("meta"):
        giant = build_backbone(
            "vit_giant2", patch_size=14, img_size=518, init_values=1.0, ffn_layer="swiglufused", block_chunks=0,
            num_register_tokens=4,
        )  # fmt: skip
    spec = BackboneSpec(1536, 40, 24, 14, 518, num_register_tokens=4, ffn_layer="swiglufused")
    assert {k: tuple(v.shape) for k, v in giant.state_dict().items()} == official_shapes(spec)


@pytest.mark.parametrize("name", list(SPECS))
def test_strict_load_hub_and_training_layouts(name, tmp_path):
    spec = SPECS[name]
    state = random_state(spec)
    torch.save(state, tmp_path / "hub.pth")
    model = load_backbone(tmp_path / "hub.pth", num_heads=spec.num_heads)  # raw files record no architecture
    assert_state_equal(unchunk(model.state_dict()), state)
    reference = features(model, spec)

    # Official teacher_checkpoint.pth: chunked names under backbone., plus heads that must be ignored.
    teacher = {"backbone." + k: v for k, v in chunk(state, 2).items()}
    teacher.update({"dino_head.mlp.0.weight": torch.zeros(16, spec.embed_dim), "ibot_head.mlp.0.bias": torch.zeros(16)})
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    official = load_backbone(tmp_path / "teacher_checkpoint.pth", num_heads=spec.num_heads)
    assert_features_equal(features(official, spec), reference)
    chunked_model = load_backbone(tmp_path / "hub.pth", num_heads=spec.num_heads, block_chunks=2)
    assert any(k.startswith("blocks.1.") and k.split(".")[2].isdigit() for k in chunked_model.state_dict())
    assert_features_equal(features(chunked_model, spec), reference)


def assert_state_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(("fmt", "out"), [("hub", "w.pth"), ("hub", "w.safetensors"), ("timm", "w.pth"), ("hf", "hf")])
def test_export_import_round_trip(name, fmt, out, tmp_path):
    spec = SPECS[name]
    model = build_from_spec(spec, block_chunks=2)
    load_into(model, random_state(spec))
    path = export_backbone(model, tmp_path / out, fmt)
    back = load_backbone(path.parent if fmt == "hf" else path)
    for size in (spec.img_size, 28, 70):  # native grid and both interpolation directions
        assert_features_equal(features(back, spec, size), features(model, spec, size))
    original, restored = unchunk(model.state_dict()), back.state_dict()
    folded = fmt == "timm" and spec.num_register_tokens > 0
    for key in original:
        if folded and key in ("cls_token", "pos_embed", "mask_token"):
            continue  # timm folds the CLS position into cls_token; checked below
        if fmt == "timm" and key == "mask_token":
            assert torch.count_nonzero(restored[key]) == 0  # timm drops it; restored to the official zeros
            continue
        assert torch.equal(original[key], restored[key]), key
    if folded:
        assert torch.equal(restored["cls_token"], original["cls_token"] + original["pos_embed"][:, :1])
        assert torch.equal(restored["pos_embed"][:, 1:], original["pos_embed"][:, 1:])
    second = export_backbone(back, tmp_path / ("again" + ("" if fmt == "hf" else path.suffix)), layout=fmt)
    from dinov2.weights import read_weights

    assert_state_equal(read_weights(second), read_weights(path))  # exported tensors are a fixed point


def test_wrong_key_and_shape_are_named():
    state = random_state(TINY)
    model = build_from_spec(TINY)
    bad = dict(state)
    bad["blocks.1.attn.qkv_typo.weight"] = bad.pop("blocks.1.attn.qkv.weight")
    with pytest.raises(ValueError) as info:
        load_into(model, bad)
    message = str(info.value)
    assert "blocks.1.attn.qkv.weight" in message and "blocks.1.attn.qkv_typo.weight" in message
    assert len(message.splitlines()) == 1
    bad = dict(state, **{"blocks.2.mlp.fc2.bias": torch.zeros(65)})
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.fc2\.bias \(checkpoint \(65,\), model \(64,\)\)"):
        load_into(model, bad)
    before = model.state_dict()["norm.weight"].clone()
    with pytest.raises(ValueError, match="pos_embed"):
        load_into(model, resize_pos_embed(state, 5))
    assert torch.equal(model.state_dict()["norm.weight"], before)  # nothing loaded on failure


@pytest.mark.parametrize("name", ["mlp", "reg4"])
def test_resize_pos_embed_matches_model_interpolation(name):
    spec = SPECS[name]
    model = load_backbone(random_state(spec), num_heads=spec.num_heads)
    for rows, cols in ((2, 2), (6, 6), (9, 9), (3, 5)):  # rows = image height // patch (official "w")
        resized = resize_pos_embed(
            unchunk(model.state_dict()), (rows, cols), model.interpolate_offset, model.interpolate_antialias
        )
        tokens = torch.zeros(1, 1 + rows * cols, spec.embed_dim)
        with torch.no_grad():
            expected = model.interpolate_pos_encoding(tokens, rows * spec.patch_size, cols * spec.patch_size)
        assert torch.equal(resized["pos_embed"], expected)
    resized_model = load_backbone(resize_pos_embed(unchunk(model.state_dict()), 6, 0.0, True), num_heads=1)
    assert resized_model.pos_embed.shape[1] == 37


def test_inferred_hub_defaults():
    plain = load_backbone(random_state(TINY), num_heads=1)
    reg = load_backbone(random_state(TINY_REG), num_heads=1)
    assert (plain.interpolate_offset, plain.interpolate_antialias) == (0.1, False)
    assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
    assert not plain.training


def test_our_training_checkpoint_teacher_and_student(tmp_path):
    from dinov2.config import load_config
    from dinov2.train.train import build_student_teacher

    overrides = [
        "student.arch=vit_custom", "student.embed_dim=64", "student.depth=2", "student.num_heads=1",
        "student.patch_size=14", "student.block_chunks=2", "student.layerscale=1.0", "student.drop_path_rate=0.0",
        "crops.global_crops_size=56", "crops.local_crops_size=28", "dino.head_n_prototypes=16",
        "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.separate_head=true",
        "ibot.head_n_prototypes=16", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    ]  # fmt: skip
    model = build_student_teacher(load_config(overrides=overrides))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.student.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # student != teacher, so picking the wrong one would show
    torch.save({"model": model.state_dict(), "iteration": 3}, tmp_path / "ckpt.pth")
    spec = BackboneSpec(64, 2, 1, 14, 56)
    for role in ("teacher", "student"):
        loaded = load_backbone(tmp_path / "ckpt.pth", which=role, num_heads=1)
        expected = getattr(model, role)["backbone"]
        assert_features_equal(features(loaded, spec, 42), features(expected, spec, 42))


def test_load_backbone_weights_into_training_grid():
    state = random_state(TINY_REG)  # grid 4
    model = build_from_spec(TINY_REG, img_size=28, block_chunks=2)  # grid 2, like 518-px weights into 224 training
    with pytest.raises(ValueError, match="pos_embed grid differs"):
        load_backbone_weights(model, state)
    load_backbone_weights(model, state, resize_pos_embed_to_model=True)
    expected = resize_pos_embed(state, 2, interpolate_offset=0.0, interpolate_antialias=True)["pos_embed"]
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(unchunk(model.state_dict())["blocks.2.mlp.fc1.weight"], state["blocks.2.mlp.fc1.weight"])
