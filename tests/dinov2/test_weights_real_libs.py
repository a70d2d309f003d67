"""Every export loads in the real libraries: timm and Hugging Face transformers give our features at the native size.

Tiny random models only, nothing downloaded (``from_pretrained`` of a local folder, ``pretrained=False`` in timm). Head
size 16 (not the official 64) so a config that dropped the head count would show. Interpolated sizes are not compared:
each library resamples positional embeddings its own way.
"""

from __future__ import annotations

import json

import pytest
import torch

from dinov2.weights import BackboneSpec, official_shapes, read_weights
from dinov2.weights.arch import build_from_spec, swiglu_hidden
from dinov2.weights.export import export_backbone
from dinov2.weights.load import load_into

timm = pytest.importorskip("timm", reason="timm is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

SPECS = {
    "mlp": BackboneSpec(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56),
    "mlp_reg4": BackboneSpec(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56, num_register_tokens=4),
    "swiglu": BackboneSpec(embed_dim=128, depth=2, num_heads=8, patch_size=14, img_size=42, ffn_layer="swiglufused"),
    "swiglu_reg4": BackboneSpec(
        embed_dim=128, depth=2, num_heads=8, patch_size=14, img_size=42, ffn_layer="swiglufused", num_register_tokens=4
    ),
}
TOL = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ours(spec: BackboneSpec) -> torch.nn.Module:
    """Our backbone with random weights everywhere (LayerNorm and LayerScale too, so every tensor matters)."""
    gen = torch.Generator().manual_seed(0)
    model = build_from_spec(spec)
    load_into(model, {k: torch.randn(s, generator=gen) * 0.2 for k, s in official_shapes(spec).items()})
    return model.eval()


def _images(spec: BackboneSpec) -> torch.Tensor:
    return torch.randn(2, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(1))


def _timm_model(spec: BackboneSpec) -> torch.nn.Module:
    """timm's DINOv2 ViT (``vit_*_patch14[_reg4]_dinov2`` family) at this spec's size, random init."""
    registers = spec.num_register_tokens > 0
    kwargs = dict(pretrained=False, num_classes=0, img_size=spec.img_size, patch_size=spec.patch_size,
                  embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)  # fmt: skip
    if spec.ffn_layer == "swiglufused":
        from timm.layers import SwiGLUPacked

        # timm's packed SwiGLU takes fc1's width (both halves) as mlp_ratio * D
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                      mlp_ratio=2 * swiglu_hidden(spec.embed_dim) / spec.embed_dim)  # fmt: skip
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    if registers:
        kwargs["reg_tokens"] = spec.num_register_tokens
    return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_export_loads_in_timm(name, suffix, tmp_path):
    spec = SPECS[name]
    ours = _ours(spec)
    path = export_backbone(ours, tmp_path / f"timm{suffix}", layout="timm")
    model = _timm_model(spec)
    model.load_state_dict(read_weights(path), strict=True)
    # timm's own converter of official hub files agrees with our timm layout
    hub = export_backbone(ours, tmp_path / f"hub{suffix}", layout="hub")
    from timm.models.vision_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(dict(read_weights(hub)), _timm_model(spec))
    theirs_state = model.state_dict()
    assert set(converted) == set(theirs_state)
    assert all(torch.equal(converted[k], theirs_state[k]) for k in converted)

    x = _images(spec)
    with torch.no_grad():
        expected = ours.forward_features(x)
        tokens = model.forward_features(x)  # final-normed [cls, registers, patches]
    torch.testing.assert_close(tokens[:, 0], expected["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(tokens[:, model.num_prefix_tokens :], expected["x_norm_patchtokens"], **TOL)
    if spec.num_register_tokens:
        torch.testing.assert_close(tokens[:, 1 : model.num_prefix_tokens], expected["x_norm_regtokens"], **TOL)


@pytest.mark.parametrize("name", list(SPECS))
def test_hf_export_loads_in_transformers(name, tmp_path):
    spec = SPECS[name]
    ours = _ours(spec)
    export_backbone(ours, tmp_path / "hf", layout="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert type(config["mlp_ratio"]) is int and config["num_attention_heads"] == spec.num_heads

    model, info = transformers.AutoModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    model.eval()
    registers = spec.num_register_tokens > 0
    assert type(model).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = _images(spec)
    with torch.no_grad():
        expected = ours.forward_features(x)
        hidden = model(pixel_values=x).last_hidden_state  # final-normed [cls, registers, patches]
    first_patch = 1 + spec.num_register_tokens
    torch.testing.assert_close(hidden[:, 0], expected["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(hidden[:, first_patch:], expected["x_norm_patchtokens"], **TOL)
