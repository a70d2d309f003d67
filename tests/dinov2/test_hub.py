"""Hub entry points: official constructor values, local weights only, and ``torch.hub.load(..., source="local")``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dinov2.hub as hub
from dinov2.weights import BackboneSpec, official_shapes

REPO = Path(__file__).resolve().parents[2]

ENTRIES = {
    "dinov2_vits14": (384, 12, "mlp"),
    "dinov2_vitb14": (768, 12, "mlp"),
    "dinov2_vitl14": (1024, 24, "mlp"),
    "dinov2_vitg14": (1536, 40, "swiglufused"),
}


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_entries_have_official_configuration(entry, registers):
    dim, depth, ffn = ENTRIES[entry]
    name = entry + ("_reg" if registers else "")
    with torch.device("meta"):
        model = getattr(hub, name)(pretrained=False)
    spec = BackboneSpec(dim, depth, dim // 64, 14, 518, num_register_tokens=4 if registers else 0, ffn_layer=ffn)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(spec)
    assert list(model.state_dict()) == list(official_shapes(spec))  # block_chunks=0 naming and official order
    expected = (0.0, True) if registers else (0.1, False)
    assert (model.interpolate_offset, model.interpolate_antialias) == expected
    gamma = model.state_dict()["blocks.0.ls1.gamma"]
    assert gamma.shape == (dim,)


def test_layerscale_init_is_one():
    model = hub.dinov2_vits14_reg(pretrained=False)
    assert all(torch.all(block.ls1.gamma == 1.0) and torch.all(block.ls2.gamma == 1.0) for block in model.real_blocks())
    assert model.register_tokens.shape == (1, 4, 384)


def test_downloads_are_refused():
    with pytest.raises(ValueError, match="never downloads"):
        hub.dinov2_vitb14(weights="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth")
    with pytest.raises(ValueError, match="never downloaded"):
        hub.dinov2_vitb14_reg(pretrained=True)
    with pytest.raises(ValueError, match="official download"):
        hub.dinov2_vitb14(weights="LVD142M")


@pytest.mark.parametrize("entry", ["dinov2_vits14", "dinov2_vitg14_reg"])
def test_no_weights_is_an_error_unless_random_init_is_asked_for(entry, tmp_path):
    # The official entry points download pretrained weights; a silent random init would look like a working model.
    with pytest.raises(ValueError, match="pretrained=False") as info:
        getattr(hub, entry)()
    assert len(str(info.value).splitlines()) == 1 and entry in str(info.value)
    with pytest.raises(ValueError, match="drop one"):
        getattr(hub, entry)(weights=tmp_path / "w.pth", pretrained=False)
    with torch.device("meta"):
        assert getattr(hub, entry)(pretrained=False).training  # explicit random init: built, not loaded


def _small_hub_file(path: Path, img_size: int = 518, registers: int = 0) -> dict[str, torch.Tensor]:
    spec = BackboneSpec(384, 12, 6, 14, img_size, num_register_tokens=registers)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.05 for k, s in official_shapes(spec).items()}
    torch.save(state, path)
    return state


def test_torch_hub_load_local(tmp_path):
    state = _small_hub_file(tmp_path / "dinov2_vits14_pretrain.pth")
    model = torch.hub.load(
        str(REPO), "dinov2_vits14", source="local", weights=str(tmp_path / "dinov2_vits14_pretrain.pth")
    )
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 28, 28))
    assert out["x_norm_clstoken"].shape == (1, 384) and out["x_norm_patchtokens"].shape == (1, 4, 384)


def test_checkpoint_grid_is_kept_and_wrong_arch_is_named(tmp_path):
    _small_hub_file(tmp_path / "w224.pth", img_size=224, registers=4)
    model = hub.dinov2_vits14_reg(weights=tmp_path / "w224.pth")
    assert model.pos_embed.shape == (1, 257, 384)  # built with the checkpoint's 16x16 grid, nothing resized
    with pytest.raises(ValueError, match="register_tokens"):
        hub.dinov2_vits14(weights=tmp_path / "w224.pth")
