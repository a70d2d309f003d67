"""Sinkhorn-Knopp: equals the official (unshifted) algorithm, never overflows, and is exact across gloo ranks."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from dinov2.loss import DINOLoss, iBOTPatchLoss, sinkhorn_knopp
from dinov2.models.dino_head import DINOHead


def _official_sk(t: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The official single-process algorithm, written out: no max subtraction before exp."""
    q = torch.exp(t.float() / temp).t()  # (K, B)
    n_proto, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_proto
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


@pytest.mark.parametrize("temp", [0.04, 0.07])
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_equals_official_on_normal_inputs(temp, n_iterations):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(16, 32, generator=gen) * 0.5
    ours = sinkhorn_knopp(t, temp, n_iterations=n_iterations)
    official = _official_sk(t, temp, n_iterations)
    assert torch.isfinite(official).all()
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(16), rtol=0, atol=1e-6)
    assert ours.dtype == torch.float32


def test_half_precision_input_is_computed_in_fp32():
    gen = torch.Generator().manual_seed(1)
    t = (torch.randn(8, 10, generator=gen) * 0.5).half()
    out = sinkhorn_knopp(t, 0.05)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _official_sk(t.float(), 0.05), rtol=0, atol=1e-6)


def test_prototype_marginals_converge_to_n_over_k():
    gen = torch.Generator().manual_seed(2)
    n, k = 24, 8
    t = torch.randn(n, k, generator=gen)
    out = sinkhorn_knopp(t, 0.1, n_iterations=200)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=0), torch.full((k,), n / k), rtol=0, atol=1e-3)


def test_global_and_per_prototype_shifts_leave_output_unchanged():
    gen = torch.Generator().manual_seed(3)
    # values on a 2^-12 grid and integer offsets, so the shifted input is exact in fp32
    base = torch.round(torch.randn(12, 6, generator=gen) * 0.5 * 4096) / 4096
    per_proto = torch.randint(-100, 100, (1, 6), generator=gen).float()  # offsets up to ±100
    shifted = base + per_proto + 37.0
    torch.testing.assert_close(shifted - per_proto - 37.0, base, rtol=0, atol=0)
    official_base = _official_sk(base, 0.04)
    assert not torch.isfinite(_official_sk(shifted, 0.04)).all()  # the official overflows here
    torch.testing.assert_close(sinkhorn_knopp(shifted, 0.04), official_base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["one_large", "uniform_pm100", "dead_prototype"])
def test_finite_with_logits_up_to_100(case):
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(32, 16, generator=gen)
    if case == "one_large":
        t[0, 0] = 100.0  # a global max shift alone would underflow every other prototype to 0 rows -> 0/0
    elif case == "uniform_pm100":
        t = torch.rand(32, 16, generator=gen) * 200 - 100
    else:
        t[:, 3] = -100.0
        t[5] = 100.0
    out = sinkhorn_knopp(t, 0.04)
    assert torch.isfinite(out).all() and torch.all(out >= 0)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(32), rtol=0, atol=1e-5)
    # the prototype marginals still move towards equipartition with more iterations
    many = sinkhorn_knopp(t, 0.04, n_iterations=50)
    assert torch.isfinite(many).all()
    assert (many.sum(0) - 2).abs().max() <= (out.sum(0) - 2).abs().max() + 1e-4


def test_input_validation():
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(2, 3), 0.1, n_iterations=0)


def test_empty_input_without_process_group():
    assert sinkhorn_knopp(torch.zeros(0, 5), 0.1).shape == (0, 5)


# ---------------------------------------------------------------- two gloo ranks


def _worker(rank: int, world_size: int, init_file: str, inputs: dict, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        # DINO: equal split of the batch
        dino_rows = inputs["dino"].chunk(world_size)[rank]
        results["dino_sk"] = DINOLoss(inputs["dino"].shape[1]).sinkhorn_knopp_teacher(dino_rows, 0.04)
        # iBOT: unequal masked-token counts per rank (rank 1 has none in the second call)
        split = inputs["ibot_split"]
        ibot_rows = inputs["ibot"][:split] if rank == 0 else inputs["ibot"][split:]
        ibot = iBOTPatchLoss(inputs["ibot"].shape[1])
        results["ibot_sk"] = ibot.sinkhorn_knopp_teacher(ibot_rows, 0.07, torch.tensor([ibot_rows.shape[0]]))
        empty_rows = inputs["ibot"] if rank == 0 else inputs["ibot"][:0]
        results["ibot_sk_empty_rank"] = ibot.sinkhorn_knopp_teacher(empty_rows, 0.07)
        # centering: unequal row counts, the update averages over all rows of all ranks
        center_rows = inputs["center"][:5] if rank == 0 else inputs["center"][5:]
        dino = DINOLoss(inputs["center"].shape[1])
        dino.update_center(center_rows)
        results["pending"] = dino.state_dict()["pending_center_update"].clone()  # waits for the async reduce
        dino.apply_center_update()
        results["center"] = dino.center.clone()
        ibot.update_center(ibot_rows[None])
        ibot.apply_center_update()
        results["ibot_center"] = ibot.center.clone()
        # the weight-normalised head shards with FSDP2 like any module; gradients reach weight_g and weight_v
        torch.manual_seed(0)  # the same initial head on both ranks
        head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4)
        reference = copy.deepcopy(head)
        fully_shard(head)
        x = inputs["head_x"].chunk(world_size)[rank]
        out = head(x)
        out.square().sum().backward()
        results["head_out"] = out.detach()
        results["head_ref_out"] = reference(x).detach()
        grad_g, grad_v = head.last_layer.weight_g.grad, head.last_layer.weight_v.grad
        results["head_grad_norms"] = torch.stack([grad_g.full_tensor().norm(), grad_v.full_tensor().norm()])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path):
    gen = torch.Generator().manual_seed(5)
    inputs = {
        "dino": torch.randn(12, 20, generator=gen) * 0.8,
        "ibot": torch.randn(17, 20, generator=gen) * 0.8,
        "ibot_split": 11,
        "center": torch.randn(8, 20, generator=gen),
        "head_x": torch.randn(4, 6, generator=gen),
    }
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), inputs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    dino_full = sinkhorn_knopp(inputs["dino"], 0.04)
    torch.testing.assert_close(torch.cat([r["dino_sk"] for r in ranks]), dino_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(dino_full, _official_sk(inputs["dino"], 0.04), rtol=0, atol=1e-6)

    ibot_full = sinkhorn_knopp(inputs["ibot"], 0.07)
    torch.testing.assert_close(torch.cat([r["ibot_sk"] for r in ranks]), ibot_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[0]["ibot_sk_empty_rank"], ibot_full, rtol=0, atol=1e-6)
    assert ranks[1]["ibot_sk_empty_rank"].shape == (0, 20)

    full_sum = inputs["center"].sum(0)
    for r in ranks:
        torch.testing.assert_close(r["pending"], torch.cat((full_sum, torch.tensor([8.0]))))
        torch.testing.assert_close(r["center"], 0.1 * inputs["center"].mean(0, keepdim=True))
    # iBOT: per-rank token means, averaged over the ranks (the official semantics)
    split = inputs["ibot_split"]
    rank_means = (inputs["ibot"][:split].mean(0) + inputs["ibot"][split:].mean(0)) / 2
    for r in ranks:
        torch.testing.assert_close(r["ibot_center"].reshape(-1), 0.1 * rank_means)
    for r in ranks:
        torch.testing.assert_close(r["head_out"], r["head_ref_out"])
        assert torch.all(r["head_grad_norms"] > 0)
