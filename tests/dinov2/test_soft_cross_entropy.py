"""The hand-written backward of ``soft_cross_entropy`` against autograd through log_softmax."""

import pytest
import torch
import torch.nn.functional as F

from dinov2.loss.soft_cross_entropy import soft_cross_entropy


def _reference(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    return -(targets * F.log_softmax(logits / temp, dim=-1)).sum(-1)


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape", "target_mass"),
    [((6, 50), (6, 50), 1.0), ((3, 4, 50), (4, 50), 2.0)],  # iBOT/DINO rows; local crops against t_1 + t_2
)
def test_values_and_gradients_match_autograd(logits_shape, targets_shape, target_mass):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(logits_shape, generator=gen, dtype=torch.float64)
    targets = target_mass * torch.softmax(torch.randn(targets_shape, generator=gen, dtype=torch.float64) / 0.3, -1)
    weights = torch.rand(logits_shape[:-1], generator=gen, dtype=torch.float64)  # a non-uniform upstream gradient
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = soft_cross_entropy(ours_in, targets, 0.1)
    ref = _reference(ref_in, targets, 0.1)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert ours.shape == ref.shape == logits_shape[:-1]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)


def test_low_precision_logits_get_a_gradient_of_their_dtype():
    logits = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 32), dim=-1)
    loss = soft_cross_entropy(logits, targets, 0.1)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, _reference(logits.float(), targets, 0.1))


def test_targets_with_a_gradient_are_refused():
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(torch.randn(2, 5), torch.rand(2, 5, requires_grad=True), 0.1)
