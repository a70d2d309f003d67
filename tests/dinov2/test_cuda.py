"""CUDA paths: xformers attention against SDPA, and a bf16 training run. Skipped without a CUDA device.

``make gpu-check`` runs these with the GPU benchmarks on a machine that has one.
"""

import copy
import json

import pytest
import torch

from dinov2.config import load_config
from dinov2.distributed.env import DistEnv
from dinov2.layers.attention import resolve_backend
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.train import train

pytestmark = pytest.mark.gpu


def tiny_vit(backend: str) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4,
                                 num_register_tokens=2, init_values=1.0, attn_backend=backend)


def test_xformers_matches_sdpa_packed_forward_and_backward():
    pytest.importorskip("xformers.ops", reason="the gpu extra (xformers) is not installed")
    cuda = torch.device("cuda")
    assert resolve_backend("xformers", cuda) == "xformers"  # really the xformers kernels, not the SDPA fallback
    models = {name: tiny_vit(name).to(cuda) for name in ("xformers", "sdpa")}
    models["sdpa"].load_state_dict(models["xformers"].state_dict())
    generator = torch.Generator(device="cpu").manual_seed(1)
    global_crops = torch.randn(4, 3, 56, 56, generator=generator).to(cuda)
    local_crops = torch.randn(8, 3, 28, 28, generator=generator).to(cuda)
    masks = (torch.rand(4, 16, generator=generator) < 0.3).to(cuda)
    outputs, grads = {}, {}
    for name, model in models.items():
        out = model.forward_features([global_crops, local_crops], masks=[masks, None])
        sum(o["x_norm_patchtokens"].square().sum() + o["x_norm_clstoken"].sum() for o in out).backward()
        outputs[name] = out
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for got, want in zip(outputs["xformers"], outputs["sdpa"]):
        torch.testing.assert_close(got["x_prenorm"], want["x_prenorm"], atol=1e-4, rtol=1e-4)
    assert grads["xformers"].keys() == grads["sdpa"].keys()
    for name, grad in grads["xformers"].items():
        torch.testing.assert_close(grad, grads["sdpa"][name], atol=1e-3, rtol=1e-3, msg=name)


def test_bf16_training_on_cuda(image_folder, tmp_path):
    overrides = [
        f"train.dataset_path={image_folder}", f"train.output_dir={tmp_path}", "student.arch=vit_custom",
        "student.embed_dim=64", "student.depth=2", "student.num_heads=2", "student.patch_size=8",
        "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
        "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=64", "train.batch_size_per_gpu=4", "train.num_workers=0", "train.max_iter=4",
        "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=2", "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1", "train.device=cuda", "train.autocast_dtype=bf16",
        "train.log_period=1", "train.checkpoint_period=2",
    ]
    cfg = load_config(None, overrides)
    summary = train(copy.deepcopy(cfg), DistEnv())
    assert summary["iteration"] == 3
    lines = [json.loads(line) for line in (tmp_path / "training_metrics.json").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["total_loss"])) for line in lines)
    assert all(line["max_mem_mb"] > 0 for line in lines)  # CUDA peak memory is measured
    assert (tmp_path / "eval" / "training_3" / "teacher_backbone_hub.pth").is_file()
