"""Export a backbone to the official hub, timm or Hugging Face layout; ``python -m dinov2.weights.export``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dinov2.io.atomic import atomic_path, write_atomic, write_text_atomic
from dinov2.io.cli import add_model_arguments, run_cli, tool_parser
from dinov2.weights.arch import BackboneSpec, spec_of_module
from dinov2.weights.formats import StateDict, from_canonical, to_canonical, unchunk
from dinov2.weights.load import (
    METADATA_KEY,
    backbone_spec,
    extract_backbone,
    read_record,
    read_weights,
    resolve_spec,
    sidecar_path,
)

logger = logging.getLogger("dinov2")

FORMATS = ("hub", "timm", "hf")


def canonical_state(source: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """Canonical (flat official) state dict of a backbone module, or of any checkpoint object ``extract_backbone``
    understands (a bare state dict in any layout, a training checkpoint: its teacher)."""
    if isinstance(source, nn.Module):
        return to_canonical(unchunk({k: v.detach() for k, v in source.state_dict().items()}))
    return extract_backbone(source)


def save_tensors(state: Mapping[str, torch.Tensor], out: str | Path, spec: BackboneSpec | None = None) -> Path:
    """Write a flat state dict: safetensors when ``out`` ends in ``.safetensors``, else a torch ``.pth`` pickle.

    ``spec`` is recorded in the safetensors header, or for a ``.pth`` in ``<out>.arch.json`` beside it (official
    loaders read the pickle strictly, so it holds tensors only). Written to a temporary name and renamed: a full disk
    or a kill never leaves a torn file under the final name.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a directory; name the output file (e.g. {out / 'backbone.safetensors'})")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Own, contiguous, CPU copies: safetensors refuses shared or strided storage (e.g. q/k/v slices of one tensor).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if out.suffix != ".safetensors":
        write_atomic(out, lambda f: torch.save(tensors, f))
        if spec is not None:
            write_text_atomic(sidecar_path(out), json.dumps(spec.to_record(), indent=2) + "\n")
        return out
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    metadata = {"format": "pt", **({METADATA_KEY: spec.to_json()} if spec is not None else {})}
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as error:  # its I/O errors carry the errno only in the text: "(os error 28)"
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out)) from None
    return out


def hf_config(spec: BackboneSpec) -> dict:
    """Minimal HF config.json for ``Dinov2Model`` (or ``Dinov2WithRegistersModel`` when there are registers).

    ``mlp_ratio`` is written as an int: transformers 5 validates its config dataclass strictly and refuses 4.0. The
    full architecture is also recorded under ``dinov2_backbone_spec`` (transformers keeps unknown keys), so our own
    loaders restore the interpolation settings too.

    Raises:
        ValueError: for backbones HF cannot express (no LayerScale, no proj/FFN bias, a fractional mlp_ratio).
    """
    if not (spec.layerscale and spec.proj_bias and spec.ffn_bias) or spec.ffn_layer not in ("mlp", "swiglufused"):
        raise ValueError("the HF Dinov2 layout needs LayerScale, proj/FFN biases and an mlp or SwiGLU FFN")
    if spec.mlp_ratio != int(spec.mlp_ratio):
        raise ValueError(f"the HF Dinov2 config takes an integer mlp_ratio, this backbone has {spec.mlp_ratio}")
    registers = spec.num_register_tokens > 0
    return {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": int(spec.mlp_ratio),
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
        METADATA_KEY: spec.to_record(),
    }


def export_backbone(
    source: nn.Module | Mapping[str, torch.Tensor],
    out: str | Path,
    layout: str = "hub",
    num_heads: int | None = None,
    spec: BackboneSpec | None = None,
) -> Path:
    """Write a backbone in ``layout``, with its architecture recorded (see :func:`save_tensors` and :func:`hf_config`).

    Args:
        source: a backbone module (any block_chunks), a backbone state dict in any supported layout, or a loaded
            checkpoint (its ``backbone_spec`` record is used).
        out: destination file (hub, timm) or directory (hf).
        layout: "hub" (flat official keys, block_chunks=0), "timm" (``_convert_dinov2`` output) — both written as
            safetensors if ``out`` ends in ``.safetensors``, else ``.pth`` — or "hf": ``out`` is a directory that
            receives ``model.safetensors`` and ``config.json``.
        num_heads: attention heads, needed only for a state dict of a non-official width without a record.
        spec: the architecture, when the caller knows it (checked against the weights).

    Returns:
        The path of the written weights file.

    Raises:
        ValueError: for an unknown layout, an unknown head count, or an ``out`` of the wrong kind.
    """
    if layout not in FORMATS:
        raise ValueError(f"unknown export layout {layout!r}; expected one of {FORMATS}")
    state = canonical_state(source)
    if spec is None and isinstance(source, nn.Module):
        spec = spec_of_module(source)
    elif spec is None:
        spec = read_record(None, source)
    spec = resolve_spec(state, spec, num_heads)
    converted = from_canonical(state, layout)
    if layout != "hf":
        return save_tensors(converted, out, spec)
    out_dir = Path(out)
    if out_dir.suffix in (".pth", ".pt", ".safetensors") or out_dir.is_file():
        raise ValueError(f"the hf format writes a directory (model.safetensors + config.json), got {out_dir}")
    config = hf_config(spec)
    path = save_tensors(converted, out_dir / "model.safetensors", spec)
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
    obj = read_weights(args.weights)
    state = extract_backbone(obj, which="student" if args.student else "teacher")
    spec = backbone_spec(state, obj, args.weights, args.num_heads)
    path = export_backbone(state, args.out, args.format, spec=spec)
    logger.info("wrote %s (%s layout): D=%d depth=%d heads=%d registers=%d ffn=%s img_size=%d", path, args.format,
                spec.embed_dim, spec.depth, spec.num_heads, spec.num_register_tokens, spec.ffn_layer, spec.img_size)


def main(argv: list[str] | None = None) -> int:
    """CLI: convert any supported checkpoint to the hub, timm or HF layout."""
    return run_cli(build_parser(), _run, argv, log_format="%(message)s")


if __name__ == "__main__":
    sys.exit(main())
