"""Layout detection, key conversion and file reading on official-named state dicts (no model needed)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.weights import BackboneSpec, detect_layout, extract_backbone, infer_spec, official_shapes, read_weights
from dinov2.weights.export import export_backbone, main
from dinov2.weights.formats import chunk, hf_to_hub, hub_to_hf, hub_to_timm, is_chunked, timm_to_hub, unchunk
from dinov2.weights.load import load_state, resize_pos_embed

REPO = Path(__file__).resolve().parents[2]

SMALL = BackboneSpec(embed_dim=384, depth=12, num_heads=6, patch_size=14, img_size=518)
# Official head width is 64, so the inferred head count is embed_dim // 64.
TINY = BackboneSpec(embed_dim=64, depth=4, num_heads=1, patch_size=14, img_size=56)
TINY_REG = BackboneSpec(embed_dim=64, depth=4, num_heads=1, patch_size=14, img_size=56, num_register_tokens=4)
TINY_G = BackboneSpec(embed_dim=128, depth=4, num_heads=2, patch_size=14, img_size=42, ffn_layer="swiglufused")


def random_state(spec: BackboneSpec, block_chunks: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-named random weights for ``spec`` (official key order; chunked names when block_chunks > 0)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) for k, shape in official_shapes(spec).items()}
    return chunk(state, block_chunks)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("embed_dim", "depth", "ffn", "n_keys", "n_params"),
    [
        (384, 12, "mlp", 175, 22_056_576),
        (768, 12, "mlp", 175, 86_580_480),
        (1024, 24, "mlp", 343, 304_368_640),
        (1536, 40, "swiglufused", 567, 1_136_480_768),
    ],
)
def test_official_shapes_match_spec_tables(embed_dim, depth, ffn, n_keys, n_params):
    spec = BackboneSpec(embed_dim, depth, embed_dim // 64, 14, 518, ffn_layer=ffn)
    shapes = official_shapes(spec)
    assert len(shapes) == n_keys
    assert sum(torch.Size(s).numel() for s in shapes.values()) == n_params
    reg = official_shapes(
        BackboneSpec(embed_dim, depth, embed_dim // 64, 14, 518, num_register_tokens=4, ffn_layer=ffn)
    )
    assert list(reg)[:4] == ["cls_token", "pos_embed", "register_tokens", "mask_token"]
    assert reg["register_tokens"] == (1, 4, embed_dim)


def test_vit_small_key_table():
    shapes = official_shapes(SMALL)
    assert list(shapes)[:6] == [
        "cls_token",
        "pos_embed",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
    ]
    assert shapes["pos_embed"] == (1, 1370, 384)
    assert shapes["blocks.11.attn.qkv.weight"] == (1152, 384)
    assert shapes["blocks.3.mlp.fc1.weight"] == (1536, 384)
    assert list(shapes)[-2:] == ["norm.weight", "norm.bias"]
    giant = official_shapes(BackboneSpec(1536, 40, 24, 14, 518, ffn_layer="swiglufused"))
    assert giant["blocks.0.mlp.w12.weight"] == (8192, 1536)
    assert giant["blocks.39.mlp.w3.weight"] == (1536, 4096)


@pytest.mark.parametrize("spec", [SMALL, TINY, TINY_REG, TINY_G], ids=["small", "tiny", "tiny_reg", "tiny_g"])
def test_infer_spec_recovers_architecture(spec):
    state = {k: torch.empty(s, device="meta") for k, s in official_shapes(spec).items()}
    assert infer_spec(state, num_heads=spec.num_heads) == spec
    if spec.embed_dim not in (384, 768, 1024, 1536):  # the weights alone cannot tell its head count
        with pytest.raises(ValueError, match="num-heads"):
            infer_spec(state)
    else:
        assert infer_spec(state) == spec
    kwargs = spec.model_kwargs()
    assert kwargs["init_values"] == 1.0 and kwargs["block_chunks"] == 0
    if spec.num_register_tokens:
        assert (kwargs["interpolate_offset"], kwargs["interpolate_antialias"]) == (0.0, True)
    else:
        assert (kwargs["interpolate_offset"], kwargs["interpolate_antialias"]) == (0.1, False)
    assert SMALL.arch == "vit_small" and TINY.arch == "vit_custom"


def test_chunk_names_keep_global_block_index():
    large = BackboneSpec(1024, 24, 16, 14, 518)
    state = {k: torch.empty(s, device="meta") for k, s in official_shapes(large).items()}
    chunked = chunk(state, 4)
    assert "blocks.1.6.norm1.weight" in chunked and "blocks.3.23.ls2.gamma" in chunked
    assert "blocks.0.5.attn.qkv.weight" in chunked and "blocks.6.norm1.weight" not in chunked
    assert is_chunked(chunked) and not is_chunked(state)
    assert list(unchunk(chunked)) == list(state)


def test_extract_backbone_from_every_container():
    canonical = random_state(TINY_REG)
    teacher_ckpt = {"teacher": {**{"backbone." + k: v for k, v in chunk(canonical, 2).items()}}}
    teacher_ckpt["teacher"]["dino_head.mlp.0.weight"] = torch.zeros(8, 32)
    teacher_ckpt["teacher"]["ibot_head.last_layer.weight_g"] = torch.zeros(8, 1)
    assert_same(extract_backbone(teacher_ckpt), canonical)
    assert_same(extract_backbone(canonical), canonical)
    compiled = {"module._orig_mod." + k: v for k, v in canonical.items()}
    assert_same(extract_backbone(compiled), canonical)

    student = random_state(TINY_REG, seed=1)
    ours = {
        "model": {
            **{"student.backbone." + k: v for k, v in student.items()},
            **{"teacher.backbone." + k: v for k, v in chunk(canonical, 4).items()},
            "teacher.dino_head.mlp.0.weight": torch.zeros(8, 32),
            "dino_loss.center": torch.zeros(1, 8),
        },
        "optimizer": {"state": {}, "param_groups": []},
        "iteration": 9,
    }
    assert_same(extract_backbone(ours), canonical)
    assert_same(extract_backbone(ours, which="student"), student)
    with pytest.raises(ValueError, match="no student"):
        extract_backbone(teacher_ckpt, which="student")


def test_timm_layout_round_trip_and_folding():
    for spec in (TINY, TINY_G):
        state = random_state(spec)
        timm = hub_to_timm(state)
        assert "mask_token" not in timm and detect_layout(timm) == "timm"
        assert_same(timm_to_hub(timm), {**state, "mask_token": torch.zeros_like(state["mask_token"])})
    g_timm = hub_to_timm(random_state(TINY_G))
    assert g_timm["blocks.0.mlp.fc1.weight"].shape == (2 * 344, 128) and "blocks.0.mlp.w12.weight" not in g_timm

    reg = random_state(TINY_REG)
    timm = hub_to_timm(reg)
    assert torch.equal(timm["reg_token"], reg["register_tokens"])
    assert torch.equal(timm["cls_token"], reg["cls_token"] + reg["pos_embed"][:, :1])
    assert timm["pos_embed"].shape[1] == reg["pos_embed"].shape[1] - 1
    back = timm_to_hub(timm)
    assert torch.equal(back["pos_embed"][:, 1:], reg["pos_embed"][:, 1:])
    assert torch.count_nonzero(back["pos_embed"][:, 0]) == 0
    assert_same(hub_to_timm(back), timm)  # the timm tensors themselves round-trip exactly


def test_hf_layout_round_trip():
    for spec in (TINY, TINY_REG, TINY_G):
        state = random_state(spec)
        hf = hub_to_hf(state)
        assert detect_layout(hf) == "hf"
        qkv = state["blocks.2.attn.qkv.weight"]
        assert torch.equal(
            hf["encoder.layer.2.attention.attention.key.weight"], qkv[spec.embed_dim : 2 * spec.embed_dim]
        )
        assert torch.equal(hf["encoder.layer.1.layer_scale2.lambda1"], state["blocks.1.ls2.gamma"])
        assert torch.equal(hf["embeddings.position_embeddings"], state["pos_embed"])
        assert_same(hf_to_hub(hf), state)
        assert_same(extract_backbone({"dinov2." + k: v for k, v in hf.items()}), state)
    assert "embeddings.register_tokens" in hub_to_hf(random_state(TINY_REG))
    assert "encoder.layer.0.mlp.weights_in.weight" in hub_to_hf(random_state(TINY_G))


def test_unknown_hf_key_is_named():
    hf = hub_to_hf(random_state(TINY))
    hf["classifier.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match="classifier.weight"):
        hf_to_hub(hf)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("fmt", ["hub", "timm"])
def test_export_files_round_trip(tmp_path, fmt, suffix):
    state = random_state(TINY_G)
    source = {"backbone." + k: v for k, v in chunk(state, 2).items()}
    path = export_backbone(source, tmp_path / f"w{suffix}", fmt, num_heads=TINY_G.num_heads)
    loaded = read_weights(path)
    if fmt == "hub":
        assert_same(loaded, state)
    else:
        assert "blocks.0.mlp.fc1.weight" in loaded and "mask_token" not in loaded
    assert_same(load_state(path), {**state, "mask_token": loaded.get("mask_token", torch.zeros(1, 128))})


def test_hf_export_writes_config(tmp_path):
    import json

    state = random_state(TINY_REG)
    export_backbone(state, tmp_path / "hf", "hf", num_heads=TINY_REG.num_heads)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "dinov2_with_registers" and config["num_register_tokens"] == 4
    assert (config["hidden_size"], config["num_hidden_layers"], config["image_size"]) == (64, 4, 56)
    assert config["layer_norm_eps"] == 1e-6 and config["use_swiglu_ffn"] is False
    assert config["mlp_ratio"] == 4 and isinstance(config["mlp_ratio"], int)  # transformers 5 refuses 4.0
    assert_same(load_state(tmp_path / "hf"), state)


def test_cli_exports_student_and_teacher(tmp_path):
    teacher, student = random_state(TINY), random_state(TINY, seed=3)
    ckpt = {"model": {**{"teacher.backbone." + k: v for k, v in teacher.items()}}}
    ckpt["model"].update({"student.backbone." + k: v for k, v in student.items()})
    torch.save(ckpt, tmp_path / "ckpt.pth")
    hf_args = ["--weights", str(tmp_path / "ckpt.pth"), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main(hf_args) == 2  # width 64 and no architecture record: the head count must be named
    assert main([*hf_args, "--num-heads", "1"]) == 0
    assert_same(load_state(tmp_path / "hf"), teacher)
    args = ["--weights", str(tmp_path / "ckpt.pth"), "--format", "hub", "--out", str(tmp_path / "s.safetensors"),
            "--num-heads", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "dinov2.weights.export", *args, "--student"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert_same(read_weights(tmp_path / "s.safetensors"), student)
    assert main(["--weights", str(tmp_path / "missing.pth"), "--format", "hub", "--out", str(tmp_path / "x")]) == 2


class _Payload:
    """Pickles to a call that would create a file: proof of code execution if loading ran it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_weights_only_rejects_code(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": _Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()


def test_urls_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        read_weights("https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth")
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unrecognised"):
        extract_backbone({"foo.weight": torch.zeros(2)})


def test_resize_pos_embed_modes():
    state = random_state(TINY)  # grid 4
    same = resize_pos_embed(state, 4, interpolate_offset=0.0)
    assert torch.equal(same["pos_embed"], state["pos_embed"])
    offset = resize_pos_embed(state, 7, interpolate_offset=0.1)
    sized = resize_pos_embed(state, 7, interpolate_offset=0.0)
    assert offset["pos_embed"].shape == sized["pos_embed"].shape == (1, 50, 64)
    assert torch.equal(offset["pos_embed"][:, 0], state["pos_embed"][:, 0])
    assert not torch.allclose(offset["pos_embed"], sized["pos_embed"])  # scale_factor vs size: the official offset path
    assert infer_spec(offset, num_heads=1).img_size == 7 * 14
