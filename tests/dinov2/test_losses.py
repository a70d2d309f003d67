"""DINO, iBOT and KoLeo losses against explicit loop references; centering trajectory and checkpointing."""

import copy
import math

import pytest
import torch

from dinov2.loss import DINOLoss, KoLeoLoss, dino_crop_losses, iBOTPatchLoss


def _ce_loop(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    """−(1/n) Σ_i Σ_k t_ik log softmax(s_i/τ)_k with python loops over rows and prototypes."""
    total = 0.0
    for i in range(s.shape[0]):
        logits = [float(v) / temp for v in s[i]]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        total += sum(float(t[i, k]) * (logits[k] - log_norm) for k in range(len(logits)))
    return -total / s.shape[0]


def _probs(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(n, k, generator=gen) / 0.3, dim=-1)


# ---------------------------------------------------------------- DINO


def test_dino_forward_sums_all_pairs():
    gen = torch.Generator().manual_seed(0)
    students = [torch.randn(3, 5, generator=gen) for _ in range(2)]
    teachers = [_probs(3, 5, gen) for _ in range(3)]
    loss = DINOLoss(5, student_temp=0.1)(students, teachers)
    expected = sum(_ce_loop(s, t, 0.1) for s in students for t in teachers)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_forward_rejects_mismatched_shapes():
    loss = DINOLoss(5)
    with pytest.raises(ValueError):
        loss([torch.randn(3, 5)], [torch.rand(4, 5)])
    with pytest.raises(ValueError):
        loss([], [torch.rand(3, 5)])


@pytest.mark.parametrize("n_local", [8, 2])
def test_dino_crop_losses_with_local_crops(n_local):
    gen = torch.Generator().manual_seed(1)
    batch, k = 3, 6
    s_global = torch.randn(2 * batch, k, generator=gen)
    s_local = torch.randn(n_local * batch, k, generator=gen)
    teacher = _probs(2 * batch, k, gen)  # natural order: crop 1 rows then crop 2 rows
    out = dino_crop_losses(s_global, s_local, teacher, student_temp=0.1)

    s1, s2 = s_global[:batch], s_global[batch:]
    t1, t2 = teacher[:batch], teacher[batch:]
    n_terms = 2 * n_local + 2
    assert n_terms == (18 if n_local == 8 else n_terms)
    global_ref = (_ce_loop(s1, t2, 0.1) + _ce_loop(s2, t1, 0.1)) / n_terms  # crop swap: no same-view pair
    local_ref = 0.0
    for v in range(n_local):
        s_v = s_local[v * batch : (v + 1) * batch]
        local_ref += _ce_loop(s_v, t1, 0.1) + _ce_loop(s_v, t2, 0.1)
    local_ref /= n_terms
    assert out["dino_global_crops_loss"].item() == pytest.approx(global_ref, rel=1e-5)
    assert out["dino_local_crops_loss"].item() == pytest.approx(local_ref, rel=1e-5)
    # equals DINOLoss.forward on the same pairs with the official 2/T and 1/T factors
    dino = DINOLoss(k)
    swapped = torch.cat((t2, t1))
    assert out["dino_global_crops_loss"].item() == pytest.approx((dino([s_global], [swapped]) * 2 / n_terms).item())
    local_fwd = dino(list(s_local.chunk(n_local)), [t1, t2]) / n_terms
    assert out["dino_local_crops_loss"].item() == pytest.approx(local_fwd.item(), rel=1e-5)


def test_dino_crop_losses_official_normaliser_is_18_for_8_locals():
    # With identical uniform rows every pair costs log K, so the sum of both terms is exactly log K (a mean).
    batch, k, n_local = 2, 4, 8
    s_global, s_local = torch.zeros(2 * batch, k), torch.zeros(n_local * batch, k)
    teacher = torch.full((2 * batch, k), 1 / k)
    out = dino_crop_losses(s_global, s_local, teacher)
    assert out["dino_global_crops_loss"].item() == pytest.approx(2 * math.log(k) / 18)
    assert out["dino_local_crops_loss"].item() == pytest.approx(16 * math.log(k) / 18)


def test_dino_crop_losses_without_local_crops():
    gen = torch.Generator().manual_seed(2)
    batch, k = 4, 5
    s_global = torch.randn(2 * batch, k, generator=gen)
    teacher = _probs(2 * batch, k, gen)
    out = dino_crop_losses(s_global, None, teacher)
    assert set(out) == {"dino_global_crops_loss"}
    ref = (_ce_loop(s_global[:batch], teacher[batch:], 0.1) + _ce_loop(s_global[batch:], teacher[:batch], 0.1)) / 2
    assert out["dino_global_crops_loss"].item() == pytest.approx(ref, rel=1e-5)
    empty = dino_crop_losses(s_global, torch.zeros(0, k), teacher)
    assert set(empty) == {"dino_global_crops_loss"}
    assert empty["dino_global_crops_loss"].item() == pytest.approx(ref, rel=1e-5)


def test_dino_crop_losses_gradients_and_errors():
    s_global = torch.randn(4, 5, requires_grad=True)
    s_local = torch.randn(6, 5, requires_grad=True)
    out = dino_crop_losses(s_global, s_local, torch.full((4, 5), 0.2))
    sum(out.values()).backward()
    assert s_global.grad.abs().sum() > 0 and s_local.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        dino_crop_losses(torch.randn(3, 5), None, torch.rand(3, 5))  # odd row count
    with pytest.raises(ValueError):
        dino_crop_losses(torch.randn(4, 5), torch.randn(5, 5), torch.rand(4, 5))  # 5 not a multiple of B=2


def test_dino_centering_trajectory_is_lazy():
    gen = torch.Generator().manual_seed(3)
    k, temp, m = 7, 0.05, 0.9
    loss = DINOLoss(k, center_momentum=m)
    center = torch.zeros(1, k)
    for step in range(5):
        logits = torch.randn(6, k, generator=gen) * 2
        targets = loss.softmax_center_teacher(logits, temp)
        # the pending update of step−1 was applied by this call, nothing newer
        torch.testing.assert_close(loss.center, center)
        torch.testing.assert_close(targets, torch.softmax((logits - center) / temp, dim=-1))
        loss.update_center(logits)
        torch.testing.assert_close(loss.center, center)  # lazy: unchanged until the next teacher call
        if step == 0:
            expected_first = 0.1 * logits.mean(0, keepdim=True)
        center = m * center + (1 - m) * logits.mean(0, keepdim=True)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, center)
    assert expected_first.abs().sum() > 0


def test_dino_sinkhorn_mode_leaves_center_alone():
    loss = DINOLoss(6)
    out = loss.sinkhorn_knopp_teacher(torch.randn(8, 6), 0.05)
    assert torch.all(loss.center == 0)
    torch.testing.assert_close(out.sum(-1), torch.ones(8))


def test_center_checkpoint_resumes_pending_update():
    gen = torch.Generator().manual_seed(4)
    k = 5
    first = DINOLoss(k)
    for _ in range(2):
        logits = torch.randn(4, k, generator=gen)
        first.softmax_center_teacher(logits, 0.04)
        first.update_center(logits)
    state = {key: value.clone() for key, value in first.state_dict().items()}
    assert set(state) == {"center", "pending_center_update"}
    assert state["pending_center_update"][-1] == 4  # a pending update over 4 rows is part of the checkpoint

    resumed = DINOLoss(k)
    resumed.load_state_dict(state)
    nxt = torch.randn(4, k, generator=gen)
    torch.testing.assert_close(resumed.softmax_center_teacher(nxt, 0.04), first.softmax_center_teacher(nxt, 0.04))
    torch.testing.assert_close(resumed.center, first.center)
    assert not torch.equal(resumed.center, state["center"])  # the pending update was applied after loading


def test_center_restore_discards_an_update():
    # the trainer snapshots the state before a step and restores it when the step is non-finite
    loss = DINOLoss(3)
    loss.update_center(torch.ones(2, 3))
    snapshot = {key: value.clone() for key, value in loss.state_dict().items()}
    loss.softmax_center_teacher(torch.zeros(2, 3), 0.1)
    loss.update_center(torch.full((2, 3), float("nan")))
    loss.load_state_dict(snapshot)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, torch.full((1, 3), 0.1))


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError):
        DINOLoss(4, student_temp=0.0)
    with pytest.raises(ValueError):
        iBOTPatchLoss(4, center_momentum=1.5)
    with pytest.raises(ValueError):
        DINOLoss(4).softmax_center_teacher(torch.zeros(1, 4), 0.0)


# ---------------------------------------------------------------- iBOT


def _masks(gen: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(6, 5, dtype=torch.bool)  # 2B = 6 images, N = 5 patches
    masks[0, [0, 3]] = True
    masks[2, [1, 2, 3, 4]] = True
    masks[5, [2]] = True  # images 1, 3, 4 unmasked
    return masks


def test_ibot_forward_masked_default_weights():
    gen = torch.Generator().manual_seed(5)
    masks = _masks(gen)
    m, k = int(masks.sum()), 4
    student, teacher = torch.randn(m, k, generator=gen), _probs(m, k, gen)
    loss = iBOTPatchLoss(k).forward_masked(student, teacher, masks)
    assert torch.equal(iBOTPatchLoss(k)(student, teacher, masks), loss)  # calling the loss is forward_masked
    # reference: loop over images, mean cross-entropy over each image's masked tokens, then mean over all 2B images
    token = 0
    per_image = []
    for b in range(masks.shape[0]):
        n_b = int(masks[b].sum())
        ce = [_ce_loop(student[token + j : token + j + 1], teacher[token + j : token + j + 1], 0.1) for j in range(n_b)]
        per_image.append(sum(ce) / n_b if n_b else 0.0)
        token += n_b
    assert loss.item() == pytest.approx(sum(per_image) / 6, rel=1e-5)  # unmasked images count in the 6
    assert loss.item() < sum(per_image) / 3 - 1e-6


def test_ibot_forward_masked_explicit_weights_and_truncation():
    gen = torch.Generator().manual_seed(6)
    masks = _masks(gen)
    m, k = int(masks.sum()), 4
    student, teacher = torch.randn(m, k, generator=gen), _probs(m, k, gen)
    ibot = iBOTPatchLoss(k)
    weights = torch.rand(m, generator=gen)
    loss = ibot.forward_masked(student, teacher, masks, masks_weight=weights)
    ref = sum(weights[j].item() * _ce_loop(student[j : j + 1], teacher[j : j + 1], 0.1) for j in range(m)) / 6
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    # the collate's masks_weight (1/#masked of the token's image) reproduces the default
    counts = masks.sum(-1).clamp(min=1).float()
    collate_weights = (1 / counts)[:, None].expand_as(masks)[masks]
    torch.testing.assert_close(
        ibot.forward_masked(student, teacher, masks, masks_weight=collate_weights),
        ibot.forward_masked(student, teacher, masks),
    )
    # truncation to the first n tokens (padding rows beyond n are ignored)
    padded_s = torch.cat((student, torch.randn(3, k, generator=gen)))
    padded_t = torch.cat((teacher, _probs(3, k, gen)))
    padded_w = torch.cat((weights, torch.ones(3)))
    torch.testing.assert_close(ibot.forward_masked(padded_s, padded_t, masks, m, padded_w), loss)
    with pytest.raises(ValueError):
        ibot.forward_masked(student, teacher, masks, masks_weight=weights[:-1])
    torch.testing.assert_close(ibot(student, teacher, masks, masks_weight=weights), loss)


def test_ibot_centering_trajectory_token_mean():
    gen = torch.Generator().manual_seed(7)
    k, temp = 6, 0.07
    ibot = iBOTPatchLoss(k)
    assert ibot.center.shape == (1, 1, k)
    center = torch.zeros(k)
    for _ in range(5):
        logits = torch.randn(1, 9, k, generator=gen)
        targets = ibot.softmax_center_teacher(logits, temp)
        assert targets.shape == logits.shape
        torch.testing.assert_close(targets, torch.softmax((logits - center) / temp, dim=-1))
        flat = ibot.softmax_center_teacher(logits[0], temp)  # a 2-D input keeps its shape
        assert flat.shape == logits[0].shape
        ibot.update_center(logits)
        center = 0.9 * center + 0.1 * logits[0].mean(0)
    ibot.apply_center_update()
    torch.testing.assert_close(ibot.center.reshape(-1), center)


def test_ibot_center_ignores_empty_token_groups():
    ibot = iBOTPatchLoss(3)
    ibot.update_center(torch.zeros(1, 0, 3))
    ibot.apply_center_update()
    assert torch.all(ibot.center == 0) and torch.isfinite(ibot.center).all()


def test_ibot_sinkhorn_without_process_group():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(11, 5, generator=gen)
    n_masked = torch.tensor([11])
    out = iBOTPatchLoss(5).sinkhorn_knopp_teacher(logits, 0.05, n_masked_patches_tensor=n_masked)
    torch.testing.assert_close(out, DINOLoss(5).sinkhorn_knopp_teacher(logits, 0.05))
    assert n_masked.item() == 11  # not all-reduced in place


# ---------------------------------------------------------------- KoLeo


def _koleo_loop(x: torch.Tensor) -> float:
    rows = [[float(v) for v in r] for r in x.double()]
    normed = []
    for r in rows:
        norm = max(math.sqrt(sum(v * v for v in r)), 1e-8)
        normed.append([v / norm for v in r])
    total = 0.0
    for i, a in enumerate(normed):
        best = max((j for j in range(len(normed)) if j != i), key=lambda j: sum(p * q for p, q in zip(a, normed[j])))
        dist = math.sqrt(sum((p - q + 1e-8) ** 2 for p, q in zip(a, normed[best])))
        total += math.log(dist + 1e-8)
    return -total / len(rows)


def test_koleo_golden_value():
    loss = KoLeoLoss()(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    assert loss.item() == pytest.approx(-math.log(2), abs=1e-6)


def test_koleo_matches_loop_reference():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7, 5, generator=gen) * 3
    assert KoLeoLoss()(x).item() == pytest.approx(_koleo_loop(x), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_koleo_duplicates_are_large_but_finite(dtype):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 384, generator=gen)
    x[1] = x[0]
    x[3] = x[2]
    loss = KoLeoLoss()(x.to(dtype))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # every row's neighbour is its duplicate: d = 1e-8·√D, so L = −log(1e-8·(√D + 1))
    assert loss.item() == pytest.approx(-math.log(1e-8 * (math.sqrt(384) + 1)), rel=1e-3)
    assert loss.item() == pytest.approx(15.39, abs=0.01)


def test_koleo_batch_of_one_is_zero_and_backpropagates():
    x = torch.randn(1, 384, dtype=torch.float16, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_koleo_bf16_input_is_fp32_accurate():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16, 32, generator=gen).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_koleo_loop(x.float()), rel=1e-5)


def test_koleo_gradient_pushes_neighbours_apart():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = KoLeoLoss()(x - 0.01 * x.grad)
    assert stepped < loss


def test_loss_modules_deepcopy_with_pending_update():
    loss = DINOLoss(4)
    loss.update_center(torch.ones(2, 4))
    clone = copy.deepcopy(loss)
    clone.apply_center_update()
    torch.testing.assert_close(clone.center, torch.full((1, 4), 0.1))
    assert torch.all(loss.center == 0) and loss.pending_center_update[-1] == 2  # the original is untouched
