"""DINOHead: official key layout, init, equivalence with the legacy weight_norm head, norm bound, deepcopy, grads."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov2.models.dino_head import DINOHead, WeightNormLinear


def _legacy_last_layer(bottleneck: int, out_dim: int) -> nn.Module:
    """The official construction: the deprecated hook-based weight_norm around a bias-free Linear."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))


def test_state_dict_keys_and_shapes_nlayers3():
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (24, 12),
        "mlp.0.bias": (24,),
        "mlp.2.weight": (24, 24),
        "mlp.2.bias": (24,),
        "mlp.4.weight": (8, 24),
        "mlp.4.bias": (8,),
        "last_layer.weight_g": (40, 1),
        "last_layer.weight_v": (40, 8),
    }


def test_state_dict_keys_other_depths_and_options():
    assert set(DINOHead(6, 10, nlayers=1, bottleneck_dim=4).state_dict()) == {
        "mlp.weight",
        "mlp.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    assert set(DINOHead(6, 10, nlayers=0, bottleneck_dim=4).state_dict()) == {
        "mlp.weight",
        "mlp.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    no_bias = DINOHead(6, 10, nlayers=2, hidden_dim=8, bottleneck_dim=4, mlp_bias=False)
    assert set(no_bias.state_dict()) == {"mlp.0.weight", "mlp.2.weight", "last_layer.weight_g", "last_layer.weight_v"}
    with_bn = DINOHead(6, 10, use_bn=True, nlayers=3, hidden_dim=8, bottleneck_dim=4)
    assert isinstance(with_bn.mlp[1], nn.BatchNorm1d) and isinstance(with_bn.mlp[3], nn.Linear)
    assert "mlp.1.running_mean" in with_bn.state_dict() and "mlp.6.weight" in with_bn.state_dict()


def test_init():
    torch.manual_seed(0)
    head = DINOHead(64, 100, hidden_dim=256, bottleneck_dim=64)
    for idx in (0, 2, 4):
        layer = head.mlp[idx]
        assert torch.all(layer.bias == 0)
        assert abs(layer.weight.std().item() - 0.02) < 0.002
    assert torch.all(head.last_layer.weight_g == 1)
    assert head.last_layer.weight_g.requires_grad
    # weight_v keeps nn.Linear's default init (uniform in ±1/sqrt(in)), not the trunc-normal of the MLP
    bound = 1 / 64**0.5
    assert head.last_layer.weight_v.abs().max() <= bound
    assert abs(head.last_layer.weight_v.std().item() - bound / 3**0.5) < 0.005  # uniform std, not 0.02


def test_matches_legacy_weight_norm_head():
    torch.manual_seed(0)
    head = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 3.0)
    legacy = nn.ModuleDict({"mlp": copy.deepcopy(head.mlp), "last_layer": _legacy_last_layer(8, 30)})
    legacy.load_state_dict(head.state_dict(), strict=True)  # same keys and shapes as the official module
    x = torch.randn(5, 16)
    z = F.normalize(legacy["mlp"](x), dim=-1, eps=1e-12)
    torch.testing.assert_close(head(x), legacy["last_layer"](z), rtol=1e-6, atol=1e-6)
    # and the other way: an official-layout state dict loads strictly into ours
    head2 = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8)
    head2.load_state_dict(legacy.state_dict(), strict=True)
    torch.testing.assert_close(head2(x), head(x))


def test_output_bounded_by_weight_g():
    torch.manual_seed(1)
    head = DINOHead(10, 50, hidden_dim=16, bottleneck_dim=6)
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.randn(50, 1) * 5)
    logits = head(torch.randn(200, 10) * 100)
    bound = head.last_layer.weight_g.abs().squeeze(1)  # (K,)
    assert torch.all(logits.abs() <= bound * (1 + 1e-5))
    # the bound is attained when the input direction matches a prototype: cosine 1
    assert (logits.abs() / bound).max() > 0.5


def test_weight_norm_linear_is_row_normalised():
    torch.manual_seed(2)
    layer = WeightNormLinear(7, 5)
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [0.5], [3.0], [-1.0]]))
    norms = layer.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]))
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())


def test_deepcopy_is_independent_and_equal():
    torch.manual_seed(3)
    head = DINOHead(8, 12, hidden_dim=16, bottleneck_dim=4)
    clone = copy.deepcopy(head)
    x = torch.randn(4, 8)
    torch.testing.assert_close(clone(x), head(x))
    with torch.no_grad():
        clone.last_layer.weight_g.mul_(2)
    torch.testing.assert_close(clone(x), 2 * head(x))
    assert clone.last_layer.weight_g.data_ptr() != head.last_layer.weight_g.data_ptr()


def test_gradients_reach_every_parameter():
    torch.manual_seed(4)
    head = DINOHead(8, 12, hidden_dim=16, bottleneck_dim=4)
    target = torch.softmax(torch.randn(6, 12), dim=-1)
    loss = -(target * F.log_softmax(head(torch.randn(6, 8)) / 0.1, dim=-1)).sum(-1).mean()
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_finite(dtype):
    torch.manual_seed(5)
    head = DINOHead(8, 12, hidden_dim=16, bottleneck_dim=4).to(dtype)
    x = torch.randn(4, 8, dtype=dtype)
    x[0] = 0  # zero features: the mlp output is ~0 and the eps of the normalisation matters
    with torch.no_grad():
        for idx in (0, 2, 4):
            head.mlp[idx].bias.zero_()
    out = head(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.all(out[0] == 0)


def test_weight_norm_gradients_match_autograd():
    """The hand-written backward of the effective weight against autograd through g · v / ‖v‖ (fp64)."""
    torch.manual_seed(0)
    layer = WeightNormLinear(8, 30).double()
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 3.0)
    v = layer.weight_v.detach().clone().requires_grad_()
    g = layer.weight_g.detach().clone().requires_grad_()
    x, upstream = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    (F.linear(x, v * (g / v.norm(dim=1, keepdim=True))) * upstream).sum().backward()
    torch.testing.assert_close(layer.weight_v.grad, v.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight_g.grad, g.grad, rtol=1e-12, atol=1e-12)
