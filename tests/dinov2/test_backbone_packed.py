"""Packed multi-crop forward, gradients and stochastic-depth regimes of the backbone."""

from __future__ import annotations

import pytest
import torch

from dinov2.layers import Block, drop_add_residual_subsets, drop_path, subset_size
from dinov2.models import vit_custom


def tiny(**kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    defaults = dict(embed_dim=32, depth=4, num_heads=4, patch_size=8, img_size=32, init_values=1.0, block_chunks=0)
    model = vit_custom(**{**defaults, **kwargs})
    with torch.no_grad():  # random affine norms and tokens so every term matters
        for name, p in model.named_parameters():
            if "norm" in name or name in ("mask_token", "register_tokens"):
                p.normal_()
    return model.eval()


def crops(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(4, 3, 32, 32, generator=g)
    local = torch.randn(6, 3, 16, 16, generator=g)
    masks = torch.rand(4, 16, generator=g) < 0.4
    return glob, local, masks


@pytest.mark.parametrize("regs,chunks,ffn", [(0, 0, "mlp"), (2, 2, "swiglufused"), (4, 1, "mlp")])
def test_packed_equals_separate(regs, chunks, ffn):
    model = tiny(num_register_tokens=regs, block_chunks=chunks, ffn_layer=ffn)
    glob, local, masks = crops()
    with torch.no_grad():
        packed = model.forward_features([glob, local], masks=[masks, None])
        sep = [model.forward_features(glob, masks=masks), model.forward_features(local)]
    assert isinstance(packed, list) and len(packed) == 2
    for p, s in zip(packed, sep):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert p[key].shape == s[key].shape
            assert p[key].numel() == 0 or (p[key] - s[key]).abs().max() <= 1e-5, key
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None
    assert packed[1]["x_norm_patchtokens"].shape == (6, 4, 32)


def test_packed_runs_each_linear_once_per_block():
    model = tiny(depth=2)
    calls = {"qkv": 0, "fc1": 0, "norm1": 0}
    for blk in model.real_blocks():
        for name in calls:
            module = blk.attn.qkv if name == "qkv" else getattr(blk.mlp, name, None) or getattr(blk, name)
            module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    glob, local, masks = crops()
    model.forward_features([glob, local], masks=[masks, None])
    assert calls == {"qkv": 2, "fc1": 2, "norm1": 2}


def test_every_parameter_gets_gradient_packed_training():
    model = tiny(num_register_tokens=2, drop_path_rate=0.3, block_chunks=2).train()
    glob, local, masks = crops()
    outs = model([glob, local], masks=[masks, None], is_training=True)
    loss = sum(o["x_norm_clstoken"].pow(2).sum() + o["x_norm_patchtokens"].sum() for o in outs)
    loss = loss + outs[0]["x_norm_regtokens"].sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


@pytest.mark.parametrize("b,r", [(8, 0.3), (5, 0.5), (1, 0.4), (3, 0.95)])
def test_subset_regime_size_and_scale(b, r):
    x = torch.zeros(b, 2, 3)
    seen = []

    def branch(xs):
        seen.append([t.shape[0] for t in xs])
        return [torch.ones_like(t) for t in xs]

    out = drop_add_residual_subsets([x, torch.zeros(2 * b, 1, 3)], branch, r)
    k = max(int(b * (1 - r)), 1)
    assert subset_size(b, r) == k and seen[0][0] == k and seen[0][1] == subset_size(2 * b, r)
    per_sample = out[0][:, 0, 0]
    assert int((per_sample != 0).sum()) == k
    torch.testing.assert_close(per_sample[per_sample != 0], torch.full((k,), b / k))


def test_block_subset_regime_matches_reference():
    torch.manual_seed(0)
    blk = Block(16, 2, qkv_bias=True, init_values=1.0, drop_path=0.5).train()
    x = torch.randn(6, 5, 16)
    torch.manual_seed(7)
    out = blk(x)
    # Reference replaying the same two permutations.
    torch.manual_seed(7)
    k = subset_size(6, 0.5)
    idx = torch.randperm(6)[:k]
    ref = x.clone()
    ref[idx] += (6 / k) * blk.ls1(blk.attn(blk.norm1(x[idx])))
    idx2 = torch.randperm(6)[:k]
    ref2 = ref.clone()
    ref2[idx2] += (6 / k) * blk.ls2(blk.mlp(blk.norm2(ref[idx2])))
    torch.testing.assert_close(out, ref2, atol=1e-6, rtol=1e-5)


def test_per_sample_regime_uses_drop_path2_for_ffn():
    torch.manual_seed(0)
    blk = Block(16, 2, qkv_bias=True, init_values=1.0, drop_path=0.05).train()
    blk.drop_path1 = torch.nn.Identity()
    blk.drop_path2 = torch.nn.Dropout(1.0)  # drops the whole FFN branch if (and only if) drop_path2 is used
    x = torch.randn(3, 5, 16)
    expected = x + blk.ls1(blk.attn(blk.norm1(x)))
    torch.testing.assert_close(blk(x), expected, atol=1e-6, rtol=1e-5)


def test_drop_path_statistics():
    torch.manual_seed(0)
    x = torch.ones(20000, 2, 3)
    y = drop_path(x, 0.1, training=True)
    kept = y[:, 0, 0] != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert torch.all(y[kept] == y[kept][:, :1, :1])  # one draw per sample
    assert torch.equal(drop_path(x, 0.1, training=False), x)


def test_drop_path_rates_linear_or_uniform():
    model = tiny(drop_path_rate=0.4)
    rates = [b.sample_drop_ratio for b in model.real_blocks()]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.4, 4))
    uniform = tiny(drop_path_rate=0.4, drop_path_uniform=True)
    assert [b.sample_drop_ratio for b in uniform.real_blocks()] == [0.4] * 4


def test_packed_training_per_group_regime():
    # With r > 0.1 every group keeps its own subset; with eval mode it is deterministic again.
    model = tiny(drop_path_rate=0.9, drop_path_uniform=True).train()
    glob, local, _ = crops()
    outs = model.forward_features([glob, local])
    assert [o["x_prenorm"].shape[0] for o in outs] == [4, 6]
    assert all(torch.isfinite(o["x_prenorm"]).all() for o in outs)


def test_list_input_needs_list_of_masks():
    model = tiny()
    glob, local, masks = crops()
    with pytest.raises(ValueError, match="list"):
        model.forward_features([glob, local], masks=masks)
    with pytest.raises(ValueError):
        model.forward_features([glob, local], masks=[masks])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa", "xformers"])
def test_packed_equals_separate_cuda(backend):
    model = tiny(num_register_tokens=2, attn_backend=backend).cuda()
    glob, local, masks = (t.cuda() for t in crops())
    with torch.no_grad():
        packed = model.forward_features([glob, local], masks=[masks, None])
        sep = [model.forward_features(glob, masks=masks), model.forward_features(local)]
    for p, s in zip(packed, sep):
        torch.testing.assert_close(p["x_prenorm"], s["x_prenorm"], atol=1e-4, rtol=1e-4)


def _two_groups(dim: int = 16):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 5, dim, generator=g), torch.randn(4, 2, dim, generator=g)]


def test_packed_per_sample_drop_path_matches_per_group_reference():
    # The packed rows get one DropPath factor per sample, drawn group by group for each branch, as the groups would be.
    torch.manual_seed(0)
    blk = Block(16, 2, qkv_bias=True, init_values=1.0, drop_path=0.05).train()
    xs = _two_groups()
    torch.manual_seed(0)  # a seed where one of the 14 draws drops a sample
    out = blk(xs)
    torch.manual_seed(0)  # a seed where one of the 14 draws drops a sample
    keep = 0.95
    attn_keep = [torch.empty(x.shape[0], 1, 1).bernoulli_(keep).div_(keep) for x in xs]
    ys = [x + blk.ls1(blk.attn(blk.norm1(x))) * k for x, k in zip(xs, attn_keep)]
    ffn_keep = [torch.empty(y.shape[0], 1, 1).bernoulli_(keep).div_(keep) for y in ys]
    ref = [y + blk.ls2(blk.mlp(blk.norm2(y))) * k for y, k in zip(ys, ffn_keep)]
    assert any(bool((k == 0).any()) for k in attn_keep + ffn_keep)  # some sample did drop, so alignment matters
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)


def test_packed_subset_regime_matches_per_group_reference():
    torch.manual_seed(0)
    blk = Block(16, 2, qkv_bias=True, init_values=1.0, drop_path=0.5).train()
    xs = _two_groups()
    torch.manual_seed(5)
    out = blk(xs)
    torch.manual_seed(5)

    def branch(values, fn):
        idx = [torch.randperm(v.shape[0])[: subset_size(v.shape[0], 0.5)] for v in values]
        outs = []
        for v, i in zip(values, idx):
            updated = v.clone()
            updated[i] += (v.shape[0] / len(i)) * fn(v[i])
            outs.append(updated)
        return outs

    ys = branch(xs, lambda t: blk.ls1(blk.attn(blk.norm1(t))))
    ref = branch(ys, lambda t: blk.ls2(blk.mlp(blk.norm2(t))))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)


def test_packed_gradients_equal_separate():
    # Packing must not change the gradient either: split/cat backward paths and the attention views.
    model = tiny(num_register_tokens=2)
    glob, local, masks = crops()
    packed = model.forward_features([glob, local], masks=[masks, None])
    loss = sum((o["x_norm_patchtokens"] * torch.linspace(-1, 1, o["x_norm_patchtokens"].shape[-1])).sum()
               + o["x_norm_clstoken"].pow(2).sum() for o in packed)
    grads_packed = torch.autograd.grad(loss, list(model.parameters()))
    sep = [model.forward_features(glob, masks=masks), model.forward_features(local)]
    loss = sum((o["x_norm_patchtokens"] * torch.linspace(-1, 1, o["x_norm_patchtokens"].shape[-1])).sum()
               + o["x_norm_clstoken"].pow(2).sum() for o in sep)
    grads_sep = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), gp, gs in zip(model.named_parameters(), grads_packed, grads_sep):
        torch.testing.assert_close(gp, gs, atol=1e-4, rtol=1e-4, msg=name)


def test_packed_tokens_pass_through_block_chunks():
    from dinov2.layers import PackedTokens, pack, unpack

    model = tiny(block_chunks=2)
    glob, local, _ = crops()
    tokens = pack([model.prepare_tokens_with_masks(glob), model.prepare_tokens_with_masks(local)])
    for chunk in model.blocks:
        tokens = chunk(tokens)
    assert isinstance(tokens, PackedTokens) and tokens.shapes == ((4, 17), (6, 5))
    groups = unpack(tokens)
    assert [tuple(g.shape) for g in groups] == [(4, 17, 32), (6, 5, 32)]
