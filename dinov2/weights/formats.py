"""Backbone state-dict layouts (official hub, chunked training, timm, Hugging Face) and exact conversions between them.

The *canonical* layout is the one of the released hub checkpoints: flat ``blocks.<i>.`` names (block_chunks=0),
``pos_embed`` of shape (1, 1 + grid², D) including the CLS position, ``mask_token``, ``register_tokens`` when present.
Every importer converts to it and every exporter starts from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

LAYOUTS = ("hub", "timm", "hf")

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Wrapper components inserted by torch.compile, FSDP and activation checkpointing, anywhere in a key.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def strip_wrappers(state: Mapping[str, Tensor]) -> StateDict:
    """Remove ``module.`` (DDP, leading) and compile/FSDP/checkpoint wrapper components from every key."""
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        while parts and parts[0] == "module":
            parts = parts[1:]
        new_key = ".".join(p for p in parts if p not in _WRAPPER_PARTS)
        if new_key in out:
            raise ValueError(f"two keys collapse to {new_key!r} after removing wrapper prefixes")
        out[new_key] = value
    return out


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """Name the layout of a backbone-only state dict: "hub" (official, flat or chunked), "timm" or "hf".

    Raises:
        ValueError: if the keys look like none of them.
    """
    keys = set(state)
    if any(k.removeprefix("dinov2.").startswith(("embeddings.", "encoder.layer.")) for k in keys):
        return "hf"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        # timm's _convert_dinov2 drops mask_token; the official model always has one.
        return "hub" if "mask_token" in keys else "timm"
    sample = ", ".join(sorted(keys)[:8])
    raise ValueError(
        f"unrecognised backbone state dict (expected official, timm or HF key names); first keys: {sample}"
    )


def is_chunked(state: Mapping[str, Tensor]) -> bool:
    """True when block keys carry a chunk index (``blocks.<chunk>.<i>.``, official block_chunks > 0)."""
    return any(_CHUNKED.match(k) for k in state)


def unchunk_key(key: str) -> str:
    """``blocks.<chunk>.<i>.rest`` → ``blocks.<i>.rest``; other keys unchanged."""
    return _CHUNKED.sub(r"blocks.\2.", key)


def unchunk(state: Mapping[str, Tensor]) -> StateDict:
    """Drop the chunk index from block keys (the official ``BlockChunk`` pads each chunk with ``nn.Identity``, so
    block keys keep their global indices)."""
    return {unchunk_key(k): v for k, v in state.items()}


def chunk_key(key: str, chunk_size: int) -> str:
    """``blocks.<i>.rest`` → ``blocks.<i // chunk_size>.<i>.rest`` (official BlockChunk naming)."""
    match = _FLAT_BLOCK.match(key)
    if match is None:
        return key
    index = int(match.group(1))
    return f"blocks.{index // chunk_size}.{index}.{key[match.end() :]}"


def chunk(state: Mapping[str, Tensor], block_chunks: int) -> StateDict:
    """Canonical flat keys → official chunked keys for ``block_chunks`` chunks (0: unchanged)."""
    if block_chunks <= 0:
        return dict(state)
    depth = count_blocks(state)
    size = max(depth // block_chunks, 1)
    return {chunk_key(k, size): v for k, v in state.items()}


def count_blocks(state: Mapping[str, Tensor]) -> int:
    """Number of transformer blocks in a canonical (flat) state dict."""
    indices = {int(m.group(1)) for k in state if (m := _FLAT_BLOCK.match(k))}
    return max(indices) + 1 if indices else 0


# ----------------------------------------------------------------------------------------------------------- timm


def _is_packed_swiglu(state: Mapping[str, Tensor], prefix: str) -> bool:
    """timm SwiGLUPacked: fc1 emits both halves (2h rows) while fc2 consumes h; a plain MLP has fc2 in == fc1 out."""
    fc1, fc2 = state.get(prefix + "fc1.weight"), state.get(prefix + "fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def timm_to_hub(state: Mapping[str, Tensor]) -> StateDict:
    """timm ``vit_*_patch14[_reg4]_dinov2`` layout → canonical official layout.

    timm folds the CLS positional embedding into ``cls_token`` for register models (no_embed_class); that split cannot
    be recovered, so the CLS slot of ``pos_embed`` is set to zero and ``cls_token`` keeps the sum. The result is
    exactly equivalent in the forward (the CLS slot is never interpolated and is only added to the CLS token).
    ``mask_token`` (dropped by timm, unused at inference) is restored to its official initial value, zeros.
    """
    out: StateDict = {}
    for key, value in state.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif ".mlp.fc" in key and _is_packed_swiglu(state, key[: key.index(".mlp.") + 5]):
            out[key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")] = value
        else:
            out[key] = value
    dim = out["cls_token"].shape[-1]
    if "reg_token" in state:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, dim), pos], dim=1)
    out["mask_token"] = out["cls_token"].new_zeros(1, dim)
    return _ordered(out)


def hub_to_timm(state: Mapping[str, Tensor]) -> StateDict:
    """Canonical official layout → timm layout (what timm's ``_convert_dinov2`` produces from a hub file)."""
    out: StateDict = {}
    has_registers = "register_tokens" in state
    for key, value in state.items():
        if key == "mask_token":
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif key == "cls_token" and has_registers:
            out[key] = value + state["pos_embed"][:, :1]
        elif key == "pos_embed" and has_registers:
            out[key] = value[:, 1:]
        else:
            out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out


# ------------------------------------------------------------------------------------------------- Hugging Face

_HF_SIMPLE = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attn.proj.": "attention.output.dense.",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.w12.": "mlp.weights_in.",
    "mlp.w3.": "mlp.weights_out.",
}
_HF_QKV = ("query", "key", "value")


def hub_to_hf(state: Mapping[str, Tensor]) -> StateDict:
    """Canonical official layout → HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (qkv split in thirds).

    Raises:
        ValueError: on a key with no HF counterpart.
    """
    out: StateDict = {}
    for key, value in state.items():
        if key in _HF_SIMPLE:
            out[_HF_SIMPLE[key]] = value
            continue
        match = _FLAT_BLOCK.match(key)
        if match is None:
            raise ValueError(f"no Hugging Face name for key {key!r}")
        layer, rest = f"encoder.layer.{match.group(1)}.", key[match.end() :]
        if rest.startswith("attn.qkv."):
            suffix = rest[len("attn.qkv.") :]
            for name, part in zip(_HF_QKV, value.chunk(3, dim=0)):
                out[f"{layer}attention.attention.{name}.{suffix}"] = part.clone()
            continue
        for ours, theirs in _HF_BLOCK.items():
            if rest.startswith(ours):
                out[layer + theirs + rest[len(ours) :]] = value
                break
        else:
            raise ValueError(f"no Hugging Face name for key {key!r}")
    return out


def hf_to_hub(state: Mapping[str, Tensor]) -> StateDict:
    """HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (optionally under ``dinov2.``) → canonical layout.

    Raises:
        ValueError: on a key with no official counterpart (e.g. a classifier head) or an incomplete q/k/v triple.
    """
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    reverse_simple = {v: k for k, v in _HF_SIMPLE.items()}
    out: StateDict = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in reverse_simple:
            out[reverse_simple[key]] = value
            continue
        match = re.match(r"^encoder\.layer\.(\d+)\.", key)
        if match is None:
            unknown.append(key)
            continue
        block, rest = f"blocks.{match.group(1)}.", key[match.end() :]
        qkv_match = re.match(r"^attention\.attention\.(query|key|value)\.(.+)$", rest)
        if qkv_match:
            qkv.setdefault(f"{block}attn.qkv.{qkv_match.group(2)}", {})[qkv_match.group(1)] = value
            continue
        for ours, theirs in _HF_BLOCK.items():
            if rest.startswith(theirs):
                out[block + ours + rest[len(theirs) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys with no official backbone counterpart: {_short_list(unknown)}")
    for key, parts in qkv.items():
        if set(parts) != set(_HF_QKV):
            raise ValueError(f"incomplete query/key/value for {key!r}: found {sorted(parts)}")
        out[key] = torch.cat([parts[name] for name in _HF_QKV], dim=0)
    return _ordered(out)


# ------------------------------------------------------------------------------------------------------ generic


def to_canonical(state: Mapping[str, Tensor]) -> StateDict:
    """Any supported backbone-only layout (wrapper prefixes already stripped) → canonical flat official layout."""
    layout = detect_layout(state)
    if layout == "hf":
        return hf_to_hub(state)
    if layout == "timm":
        return timm_to_hub(unchunk(state))
    return unchunk(state)


def from_canonical(state: Mapping[str, Tensor], layout: str) -> StateDict:
    """Canonical official layout → ``layout`` ("hub", "timm" or "hf")."""
    if layout == "hub":
        return dict(state)
    if layout == "timm":
        return hub_to_timm(state)
    if layout == "hf":
        return hub_to_hf(state)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


_TOP_ORDER = (
    "cls_token",
    "pos_embed",
    "register_tokens",
    "mask_token",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
)


def _ordered(state: Mapping[str, Tensor]) -> StateDict:
    """Key order of the released hub checkpoints: tokens, patch embed, blocks by index, the rest (final norm) last."""

    def rank(key: str) -> tuple:
        if key in _TOP_ORDER:
            return (0, _TOP_ORDER.index(key), 0)
        match = _FLAT_BLOCK.match(key)
        if match:
            return (1, int(match.group(1)), 0)
        return (2, 0, 0)

    keys = sorted(state, key=rank)  # stable: the within-block order of the input is kept
    return {k: state[k] for k in keys}


def _short_list(names: list[str], limit: int = 12) -> str:
    """Comma-separated names, at most ``limit`` of them, then a count of the rest."""
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")
