"""DINOv2-compatible Vision Transformer: cls/register/mask tokens, pos-embed interpolation, packed multi-crop forward.

State-dict keys, shapes, defaults and initialisation follow the official ``DinoVisionTransformer``
(facebookresearch/dinov2), so released checkpoints load with ``strict=True``. Differences: no xFormers requirement
(list inputs use a packed SDPA path), ``attn_backend`` selection, ``get_last_self_attention`` for visualisation,
and the FFN branch uses ``drop_path2`` (see :mod:`dinov2.layers.block`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from dinov2.layers import (
    Block,
    BlockChunk,
    Mlp,
    PackedTokens,
    PatchEmbed,
    SwiGLUFFNFused,
    interpolate_pos_embed,
    pack,
    unpack,
)
from dinov2.layers.attention import check_backend

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


def _identity_ffn(*args, **kwargs) -> nn.Module:
    return nn.Identity()


def _ffn_class(name: str) -> Callable[..., nn.Module]:
    if name == "mlp":
        return Mlp
    if name in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused
    if name == "identity":
        return _identity_ffn
    raise ValueError(f"unknown ffn_layer {name!r}; valid: {', '.join(FFN_LAYERS)}")


def init_weights_vit_timm(module: nn.Module) -> None:
    """Linear layers: truncated normal (std 0.02), zero bias; other modules keep their PyTorch defaults."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(nn.Module):
    """ViT backbone with the constructor (arguments and defaults) of the official ``DinoVisionTransformer``.

    Token layout: ``[cls, reg_1..reg_R, patch_1..patch_N]``; registers carry no positional embedding.
    ``block_chunks > 0`` groups blocks into ``BlockChunk`` units (keys ``blocks.<chunk>.<global_idx>.*``);
    ``block_chunks=0`` gives ``blocks.<idx>.*``. ``attn_backend`` is one of auto/sdpa/xformers/eager.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_register_tokens < 0 or block_chunks < 0:
            raise ValueError("num_register_tokens and block_chunks must be >= 0")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.attn_backend = check_backend(attn_backend)

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        # Parameter registration order fixes the state-dict order: cls, pos, registers, mask (official).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        ffn = _ffn_class(ffn_layer)
        blocks = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn,
                init_values=init_values,
                attn_backend=attn_backend,
            )  # fmt: skip
            for i in range(depth)
        ]
        if block_chunks > 0:
            self.chunked_blocks = True
            chunksize = depth // block_chunks
            chunks = [[nn.Identity()] * i + blocks[i : i + chunksize] for i in range(0, depth, chunksize)]
            self.blocks = nn.ModuleList([BlockChunk(c) for c in chunks])
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: pos_embed trunc-normal 0.02, cls/register tokens normal 1e-6, Linear timm-style."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(init_weights_vit_timm)

    def real_blocks(self) -> list[nn.Module]:
        """The transformer blocks in order, without the Identity padding of chunked models."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [b for chunk in self.blocks for b in chunk if not isinstance(b, nn.Identity)]

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Positional embedding for tokens ``x`` ``(B, 1 + N, D)`` of an ``h x w`` pixel image, in ``x``'s dtype.

        Returns ``pos_embed`` itself when the grid already matches and the image is square (official behaviour).
        """
        if x.shape[1] - 1 == self.pos_embed.shape[1] - 1 and h == w:
            return self.pos_embed
        pos = interpolate_pos_embed(
            self.pos_embed, h, w, self.patch_size, self.interpolate_offset, self.interpolate_antialias
        )
        return pos.to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + R + N, D)``; ``masks`` ``(B, N)`` bool replaces patches."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # cat promotes, as official
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x_norm: torch.Tensor, x_prenorm: torch.Tensor, masks: torch.Tensor | None) -> dict:
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : R + 1],
            "x_norm_patchtokens": x_norm[:, R + 1 :],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None = None
    ) -> list[dict]:
        """Packed forward of several crop groups (e.g. global and local crops of different sizes).

        Each group is tokenised separately (own pos-embed interpolation and masks); in every block all groups'
        tokens are processed together while attention stays within each image. Equals calling
        :meth:`forward_features` per group (eval mode) up to float rounding.

        Returns:
            One output dict per group (see :meth:`forward_features`).
        """
        if isinstance(masks_list, torch.Tensor):
            raise ValueError("for a list of inputs, pass masks as a list (one tensor or None per input)")
        masks_list = list(masks_list) if masks_list is not None else [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"{len(x_list)} inputs but {len(masks_list)} masks")
        # packed once: every block then runs on the one (sum b_i n_i, D) tensor, and so does the final norm
        tokens = pack([self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)])
        for blk in self.blocks:
            tokens = blk(tokens)
        xs = unpack(tokens)
        normed = unpack(PackedTokens(self.norm(tokens.flat), tokens.shapes))
        return [self._output_dict(n, x, m) for n, x, m in zip(normed, xs, masks_list)]

    def forward_features(
        self, x: torch.Tensor | Sequence[torch.Tensor], masks: torch.Tensor | Sequence | None = None
    ) -> dict | list[dict]:
        """Features of images ``(B, C, H, W)``, or of a list of groups (then ``masks`` is a list too).

        Returns:
            ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens`` (B, N, D),
            ``x_prenorm`` (B, 1+R+N, D) and ``masks``; a list of such dicts for a list input.
        """
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        x_tok = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x_tok = blk(x_tok)
        return self._output_dict(self.norm(x_tok), x_tok, masks)

    def _collect_layers(self, x: torch.Tensor, n: int | Sequence[int]) -> list[torch.Tensor]:
        x = self.prepare_tokens_with_masks(x)
        blocks = self.real_blocks()
        take = set(range(len(blocks) - n, len(blocks))) if isinstance(n, int) else set(n)
        if not take <= set(range(len(blocks))):
            raise ValueError(f"layer indices {sorted(take)} out of range for {len(blocks)} blocks")
        outputs = []
        i = 0
        # Iterate through the chunk modules' children so padding is skipped but global indices are kept.
        for module in self.blocks:
            for blk in module if self.chunked_blocks else [module]:
                if isinstance(blk, nn.Identity):
                    continue
                x = blk(x)
                if i in take:
                    outputs.append(x)
                i += 1
        return outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the blocks with the given indices (list).

        Returns:
            A tuple of patch tokens ``(B, N, D)`` (``(B, D, H/p, W/p)`` with ``reshape``), or of
            ``(patch_tokens, cls_token (B, D))`` pairs with ``return_class_token``.
        """
        outputs = self._collect_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            B, _, H, W = x.shape
            p = self.patch_size
            outputs = [out.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def get_last_self_attention(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights of the last block, computed eagerly: ``(B, heads, 1+R+N, 1+R+N)``, rows sum to 1."""
        blocks = self.real_blocks()
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        return last.attn.attention_map(last.norm1(x))

    def forward(self, *args, is_training: bool = False, **kwargs):
        """``forward_features`` dict(s) when ``is_training``, else ``head(x_norm_clstoken)`` ``(B, D)``."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def _vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, num_register_tokens: int, **kwargs):
    kwargs.setdefault("mlp_ratio", 4)
    return DinoVisionTransformer(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        num_register_tokens=num_register_tokens, **kwargs,
    )  # fmt: skip


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S: D=384, depth 12, 6 heads."""
    return _vit(384, 12, 6, patch_size, num_register_tokens, **kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: D=768, depth 12, 12 heads."""
    return _vit(768, 12, 12, patch_size, num_register_tokens, **kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L: D=1024, depth 24, 16 heads."""
    return _vit(1024, 24, 16, patch_size, num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g/2: D=1536, depth 40, 24 heads (64 per head); released with ``ffn_layer="swiglufused"``."""
    return _vit(1536, 40, 24, patch_size, num_register_tokens, **kwargs)


def vit_custom(
    embed_dim: int, depth: int, num_heads: int, patch_size: int = 16, num_register_tokens: int = 0, **kwargs
) -> DinoVisionTransformer:
    """Any size (tests, CPU smoke runs); ``embed_dim`` must be divisible by ``num_heads``."""
    return _vit(embed_dim, depth, num_heads, patch_size, num_register_tokens, **kwargs)
