"""Export a backbone to the official hub, timm or Hugging Face layout; ``python -m dinov2.weights.export``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dinov2.io.atomic import atomic_path, write_atomic, write_text_atomic
from dinov2.io.cli import add_model_arguments, run_cli, tool_parser
from dinov2.weights.arch import BackboneSpec, infer_spec
from dinov2.weights.formats import StateDict, from_canonical, to_canonical, unchunk
from dinov2.weights.load import extract_backbone, hf_num_heads, load_state

logger = logging.getLogger("dinov2")

FORMATS = ("hub", "timm", "hf")


def canonical_state(source: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """Canonical (flat official) state dict of a backbone module, or of any checkpoint object ``extract_backbone``
    understands (a bare state dict in any layout, a training checkpoint: its teacher)."""
    if isinstance(source, nn.Module):
        return to_canonical(unchunk({k: v.detach() for k, v in source.state_dict().items()}))
    return extract_backbone(source)


def save_tensors(state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write a flat state dict atomically: safetensors when ``out`` ends in ``.safetensors``, else a torch ``.pth``
    pickle."""
    out = Path(out)
    # Own, contiguous, CPU copies: safetensors refuses shared or strided storage (e.g. q/k/v slices of one tensor).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    else:
        write_atomic(out, lambda f: torch.save(tensors, f))
    return out


def hf_config(spec: BackboneSpec) -> dict:
    """Minimal HF config.json for ``Dinov2Model`` (or ``Dinov2WithRegistersModel`` when there are registers).

    Raises:
        ValueError: for backbones HF cannot express (no LayerScale, no proj/FFN bias, non-square or custom head dim).
    """
    if not (spec.layerscale and spec.proj_bias and spec.ffn_bias) or spec.ffn_layer not in ("mlp", "swiglufused"):
        raise ValueError("the HF Dinov2 layout needs LayerScale, proj/FFN biases and an mlp or SwiGLU FFN")
    registers = spec.num_register_tokens > 0
    return {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
        "patch_size": spec.patch_size,
        "image_size": spec.img_size,
        "num_channels": spec.in_chans,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": spec.ffn_layer == "swiglufused",
        "num_register_tokens": spec.num_register_tokens,
        "hidden_act": "gelu",
        "qkv_bias": spec.qkv_bias,
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def export_backbone(
    source: nn.Module | Mapping[str, torch.Tensor], out: str | Path, layout: str = "hub", num_heads: int | None = None
) -> Path:
    """Write a backbone in ``layout``.

    Args:
        source: a backbone module (any block_chunks) or a backbone state dict in any supported layout.
        out: destination file (hub, timm) or directory (hf).
        layout: "hub" (flat official keys, block_chunks=0), "timm" (``_convert_dinov2`` output) — both written as
            safetensors if ``out`` ends in ``.safetensors``, else ``.pth`` — or "hf": ``out`` is a directory that
            receives ``model.safetensors`` and ``config.json``.
        num_heads: attention heads for the HF config; default embed_dim // 64 (module: its ``num_heads``).

    Returns:
        The path of the written weights file.
    """
    if layout not in FORMATS:
        raise ValueError(f"unknown export layout {layout!r}; expected one of {FORMATS}")
    if num_heads is None and isinstance(source, nn.Module):
        num_heads = getattr(source, "num_heads", None)
    state = canonical_state(source)
    converted = from_canonical(state, layout)
    if layout != "hf":
        return save_tensors(converted, out)
    out_dir = Path(out)
    if out_dir.suffix in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"the hf format writes a directory (model.safetensors + config.json), got {out_dir}")
    config = hf_config(infer_spec(state, num_heads=num_heads))
    path = save_tensors(converted, out_dir / "model.safetensors")
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m dinov2.weights.export", "Export a DINOv2 backbone (from hub/timm/HF files or "
                         "training checkpoints) to another layout.")
    add_model_arguments(parser, device=False, weights_help="input .pth/.safetensors file or HF directory")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output layout")
    parser.add_argument("--out", required=True, help="output file (hub, timm) or directory (hf)")
    parser.add_argument("--student", action="store_true", help="export the student instead of the EMA teacher")
    return parser


def _run(args: argparse.Namespace) -> None:
    state = load_state(args.weights, which="student" if args.student else "teacher")
    num_heads = hf_num_heads(args.weights)
    path = export_backbone(state, args.out, args.format, num_heads=num_heads)
    spec = infer_spec(state, num_heads=num_heads)
    logger.info("wrote %s (%s layout): D=%d depth=%d heads=%d registers=%d ffn=%s img_size=%d", path, args.format,
                spec.embed_dim, spec.depth, spec.num_heads, spec.num_register_tokens, spec.ffn_layer, spec.img_size)


def main(argv: list[str] | None = None) -> int:
    """CLI: convert any supported checkpoint to the hub, timm or HF layout."""
    return run_cli(build_parser(), _run, argv, log_format="%(message)s")


if __name__ == "__main__":
    sys.exit(main())
