"""Backbone structure: state-dict layout and parameter counts, shapes, registry, intermediate layers, attention."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from dinov2.layers import Attention, eager_attention, resolve_backend
from dinov2.models import ARCHS, DinoVisionTransformer, build_backbone, vit_custom

# (arch, ffn_layer, state-dict tensors, parameter count) for hub builds at 518/14 (the released checkpoints).
OFFICIAL = [
    ("vit_small", "mlp", 175, 22_056_576),
    ("vit_base", "mlp", 175, 86_580_480),
    ("vit_large", "mlp", 343, 304_368_640),
    ("vit_giant2", "swiglufused", 567, 1_136_480_768),
]


def tiny(**kwargs) -> DinoVisionTransformer:
    torch.manual_seed(kwargs.pop("seed", 0))
    defaults = dict(embed_dim=32, depth=4, num_heads=4, patch_size=8, img_size=32, init_values=1.0, block_chunks=0)
    return vit_custom(**{**defaults, **kwargs}).eval()


@pytest.mark.parametrize("arch,ffn,n_keys,n_params", OFFICIAL)
def test_official_sizes_on_meta(arch, ffn, n_keys, n_params):
    with torch.device("meta"):
        model = build_backbone(arch, patch_size=14, img_size=518, init_values=1.0, ffn_layer=ffn, block_chunks=0)
    sd = model.state_dict()
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert list(sd)[:3] == ["cls_token", "pos_embed", "mask_token"]
    assert sd["pos_embed"].shape == (1, 1370, model.embed_dim)


def test_vit_small_key_table():
    with torch.device("meta"):
        model = build_backbone("vit_small", patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    sd = model.state_dict()
    per_block = [
        ("norm1.weight", (384,)), ("norm1.bias", (384,)), ("attn.qkv.weight", (1152, 384)), ("attn.qkv.bias", (1152,)),
        ("attn.proj.weight", (384, 384)), ("attn.proj.bias", (384,)), ("ls1.gamma", (384,)), ("norm2.weight", (384,)),
        ("norm2.bias", (384,)), ("mlp.fc1.weight", (1536, 384)), ("mlp.fc1.bias", (1536,)),
        ("mlp.fc2.weight", (384, 1536)), ("mlp.fc2.bias", (384,)), ("ls2.gamma", (384,)),
    ]  # fmt: skip
    expected = [
        ("cls_token", (1, 1, 384)), ("pos_embed", (1, 1370, 384)), ("mask_token", (1, 384)),
        ("patch_embed.proj.weight", (384, 3, 14, 14)), ("patch_embed.proj.bias", (384,)),
    ]  # fmt: skip
    expected += [(f"blocks.{i}.{k}", s) for i in range(12) for k, s in per_block]
    expected += [("norm.weight", (384,)), ("norm.bias", (384,))]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected


def test_registers_and_giant_ffn_keys():
    with torch.device("meta"):
        model = build_backbone("vit_giant2", patch_size=14, img_size=518, init_values=1.0, ffn_layer="swiglufused",
                               block_chunks=0, num_register_tokens=4)  # fmt: skip
    sd = model.state_dict()
    assert list(sd)[:4] == ["cls_token", "pos_embed", "register_tokens", "mask_token"]
    assert sd["register_tokens"].shape == (1, 4, 1536)
    assert sd["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
    assert sd["blocks.39.mlp.w3.weight"].shape == (1536, 4096)


@pytest.mark.parametrize("arch", ["vit_small", "vit_base", "vit_large", "vit_giant2"])
@pytest.mark.parametrize("patch_size", [14, 16])
@pytest.mark.parametrize("regs", [0, 4])
def test_output_shapes_every_arch_on_meta(arch, patch_size, regs):
    with torch.device("meta"):
        model = build_backbone(arch, patch_size=patch_size, num_register_tokens=regs, init_values=1.0, img_size=224)
        out = model.forward_features(torch.empty(2, 3, 224, 224))
    N, D = (224 // patch_size) ** 2, model.embed_dim
    assert out["x_norm_clstoken"].shape == (2, D)
    assert out["x_norm_regtokens"].shape == (2, regs, D)
    assert out["x_norm_patchtokens"].shape == (2, N, D)
    assert out["x_prenorm"].shape == (2, 1 + regs + N, D)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu", "swiglufused", "identity"])
@pytest.mark.parametrize("regs", [0, 3])
def test_tiny_forward_shapes_real(ffn, regs):
    model = tiny(ffn_layer=ffn, num_register_tokens=regs)
    x = torch.randn(2, 3, 32, 48)  # non-square
    masks = torch.rand(2, 24) < 0.5
    out = model.forward_features(x, masks=masks)
    assert out["x_norm_patchtokens"].shape == (2, 24, 32) and out["x_norm_regtokens"].shape == (2, regs, 32)
    assert out["masks"] is masks and torch.isfinite(out["x_prenorm"]).all()
    cls = model(x)
    assert cls.shape == (2, 32)
    torch.testing.assert_close(cls, model.forward_features(x)["x_norm_clstoken"])
    assert model(x, is_training=True).keys() == out.keys()


def test_masks_replace_patches_with_mask_token():
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    plain = model.prepare_tokens_with_masks(x)
    pos = model.pos_embed[:, 1 + 3]
    torch.testing.assert_close(tokens[0, 1 + 3], model.mask_token[0] + pos[0])  # pos-embed still added
    torch.testing.assert_close(tokens[1], plain[1])


def test_init_matches_spec():
    model = tiny(num_register_tokens=2)
    assert torch.count_nonzero(model.mask_token) == 0
    assert model.cls_token.abs().max() < 1e-4 and model.register_tokens.abs().max() < 1e-4
    assert 0.01 < model.pos_embed.std() < 0.03
    blk = model.blocks[0]
    assert torch.count_nonzero(blk.attn.qkv.bias) == 0 and 0.01 < blk.mlp.fc1.weight.std() < 0.03
    assert torch.all(blk.ls1.gamma == 1.0)


def test_block_chunks_key_naming_and_same_weights():
    plain = tiny(block_chunks=0)
    chunked = tiny(block_chunks=2)
    keys = list(chunked.state_dict())
    assert "blocks.0.1.attn.qkv.weight" in keys and "blocks.1.2.attn.qkv.weight" in keys
    assert not any(k.startswith("blocks.1.0.") or k.startswith("blocks.0.2.") for k in keys)
    renamed = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in chunked.state_dict().items()}
    assert list(renamed) == list(plain.state_dict())
    plain.load_state_dict(renamed, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), chunked(x))
    default = vit_custom(embed_dim=16, depth=2, num_heads=2, patch_size=8, img_size=32, init_values=1.0)
    assert "blocks.0.1.ls2.gamma" in default.state_dict()  # constructor default block_chunks=1


def test_registry():
    assert set(ARCHS) >= {"vit_small", "vit_base", "vit_large", "vit_giant2", "vit_custom"}
    with pytest.raises(ValueError, match="vit_small"):
        build_backbone("vit_tiny")
    model = build_backbone("vit_custom_memeff", embed_dim=16, depth=1, num_heads=2, patch_size=8, img_size=16)
    assert isinstance(model, DinoVisionTransformer)
    with pytest.raises(ValueError, match="ffn_layer"):
        tiny(ffn_layer="geglu")
    with pytest.raises(ValueError, match="backend"):
        tiny(attn_backend="flash")


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_get_intermediate_layers(block_chunks):
    model = tiny(block_chunks=block_chunks, num_register_tokens=2)
    x = torch.randn(2, 3, 32, 48)
    outs = model.get_intermediate_layers(x, n=2)
    assert len(outs) == 2 and outs[0].shape == (2, 24, 32)
    torch.testing.assert_close(outs[-1], model.forward_features(x)["x_norm_patchtokens"])
    pairs = model.get_intermediate_layers(x, n=[0, 3], reshape=True, return_class_token=True)
    assert pairs[0][0].shape == (2, 32, 4, 6) and pairs[0][1].shape == (2, 32)
    torch.testing.assert_close(pairs[1][0], outs[1].reshape(2, 4, 6, 32).permute(0, 3, 1, 2))
    raw = model.get_intermediate_layers(x, n=[3], norm=False)[0]
    torch.testing.assert_close(raw, model.forward_features(x)["x_prenorm"][:, 3:])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=[4])


def test_sdpa_equals_naive_attention():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, backend="sdpa").eval()
    x = torch.randn(3, 7, 32)
    B, N, D = x.shape
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    naive = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    expected = naive.transpose(1, 2).reshape(B, N, D) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)
    out, weights = eager_attention(q, k, v)
    torch.testing.assert_close(out, naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, 4, N))


def test_eager_backend_equals_sdpa(monkeypatch):
    x = torch.randn(2, 3, 32, 40)
    sdpa = tiny(attn_backend="sdpa", num_register_tokens=1)
    eager = tiny(attn_backend="eager", num_register_tokens=1)
    torch.testing.assert_close(sdpa(x), eager(x), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("DINOV2_ATTN_BACKEND", "eager")
    assert resolve_backend("sdpa", torch.device("cpu")) == "eager"
    torch.testing.assert_close(sdpa(x), eager(x), atol=1e-5, rtol=1e-5)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("DINOV2_ATTN_BACKEND", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("xformers", cpu) == "sdpa"  # no CPU kernels: never chosen on CPU
    monkeypatch.setenv("XFORMERS_DISABLED", "0")  # any value disables, as official
    assert resolve_backend("auto", cuda) == "sdpa" and resolve_backend("xformers", cuda) == "sdpa"
    monkeypatch.setenv("DINOV2_ATTN_BACKEND", "nope")
    with pytest.raises(ValueError):
        resolve_backend("auto", cpu)


def test_last_self_attention():
    model = tiny(num_register_tokens=2)
    x = torch.randn(2, 3, 32, 40)
    attn = model.get_last_self_attention(x)
    T = 1 + 2 + 20
    assert attn.shape == (2, 4, T, T) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, T))
    # The maps are the ones the last block uses: attn @ v reproduces its attention output.
    blocks = model.real_blocks()
    h = model.prepare_tokens_with_masks(x)
    for blk in blocks[:-1]:
        h = blk(h)
    last = blocks[-1]
    y = last.norm1(h)
    v = last.attn.qkv(y).view(2, T, 3, 4, 8)[:, :, 2].transpose(1, 2)
    out = F.linear((attn @ v).transpose(1, 2).reshape(2, T, 32), last.attn.proj.weight, last.attn.proj.bias)
    torch.testing.assert_close(out, last.attn(y), atol=1e-5, rtol=1e-5)
