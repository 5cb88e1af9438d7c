"""The static ViT: the plain timm modules an Arch becomes, whole or piece by piece.

Export ships `build_vit`; the latency table and the cost model time and count the
`pieces` of the very same modules, so what is priced is what is shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from hwaware.space import Arch, SearchSpace


def build_block(space: SearchSpace, embed_dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> Block:
    """A timm `Block` with `num_heads` heads of the space's head dim (Q-K-V width = heads x head dim)."""
    # timm's Block asserts embed_dim % num_heads == 0 for its default attention, which AutoFormer's
    # spaces break (320 dims, 7 heads); build it with one head, then fit the real attention.
    block = Block(dim=embed_dim, num_heads=1, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path)
    block.attn = Attention(embed_dim, num_heads=num_heads, attn_head_dim=space.head_dim, qkv_bias=True)
    assert isinstance(block.mlp, Mlp) and block.mlp.fc1.out_features == int(embed_dim * mlp_ratio)
    return block


def _bare_vit(space: SearchSpace, embed_dim: int) -> VisionTransformer:
    """Stem, final norm and head of a timm ViT, with no blocks yet."""
    return VisionTransformer(
        img_size=space.img_size,
        patch_size=space.patch_size,
        in_chans=space.in_chans,
        num_classes=space.num_classes,
        embed_dim=embed_dim,
        depth=0,
        num_heads=1,
        qkv_bias=True,
        weight_init="skip",
    )


def build_vit(arch: Arch, space: SearchSpace, drop_path_rates: list[float] | None = None) -> VisionTransformer:
    """A timm `VisionTransformer` shaped like `arch`, one `Block` per layer with its own heads and MLP."""
    model = _bare_vit(space, arch.embed_dim)
    rates = drop_path_rates or [0.0] * arch.depth
    model.blocks = nn.Sequential(
        *[build_block(space, arch.embed_dim, h, r, rates[i]) for i, (h, r) in enumerate(arch.layers())]
    )
    reduction = model.patch_embed.feat_ratio() if hasattr(model.patch_embed, "feat_ratio") else space.patch_size
    model.feature_info = [dict(module=f"blocks.{i}", num_chs=arch.embed_dim, reduction=reduction) for i in range(arch.depth)]
    return model


def vit_config(arch: Arch, space: SearchSpace) -> dict:
    """What `build_vit` needs, as plain JSON: the `config.json` written beside exported weights."""
    return {
        "architecture": "hwaware_vit",
        "arch": arch.to_dict(),
        "space": space.to_dict(),
    }


# ---- pieces: what a latency table times and what the cost model counts -----------------------


@dataclass(frozen=True, order=True)
class Piece:
    """A part of a subnet that is timed and counted on its own: stem, one block, or head."""

    kind: str  # "stem" | "block" | "head"
    embed_dim: int
    num_heads: int = 0
    mlp_ratio: float = 0.0

    @property
    def key(self) -> str:
        if self.kind == "block":
            return f"block-d{self.embed_dim}-h{self.num_heads}-r{self.mlp_ratio:g}"
        return f"{self.kind}-d{self.embed_dim}"

    @classmethod
    def from_key(cls, key: str) -> Piece:
        kind, *fields = key.split("-")
        values = {f[0]: f[1:] for f in fields}
        if kind == "block":
            return cls("block", int(values["d"]), int(values["h"]), float(values["r"]))
        if kind in ("stem", "head") and set(values) == {"d"}:
            return cls(kind, int(values["d"]))
        raise ValueError(f"not a piece key: {key!r}")


def pieces(arch: Arch) -> list[Piece]:
    """The stem, every block and the head of `arch`; a subnet's cost is the sum over these."""
    d = arch.embed_dim
    return [Piece("stem", d), *(Piece("block", d, h, r) for h, r in arch.layers()), Piece("head", d)]


class Stem(nn.Module):
    """Patch embedding, class token and position embedding of a timm ViT: image -> tokens.

    Holds only those parameters (so a piece's parameter count is its own) and runs
    timm's default `_pos_embed` path: class token first, position embedding added.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed


class Head(nn.Module):
    """Final norm, class-token pooling and classifier of a timm ViT: tokens -> logits."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.norm, self.head = vit.norm, vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, 0])


def build_piece(space: SearchSpace, piece: Piece) -> nn.Module:
    if piece.kind == "block":
        return build_block(space, piece.embed_dim, piece.num_heads, piece.mlp_ratio)
    vit = _bare_vit(space, piece.embed_dim)
    return Stem(vit) if piece.kind == "stem" else Head(vit)


def piece_input(space: SearchSpace, piece: Piece, batch_size: int = 1) -> torch.Tensor:
    """A random input of the shape `piece` takes: images for the stem, tokens otherwise."""
    if piece.kind == "stem":
        return torch.randn(batch_size, space.in_chans, space.img_size, space.img_size)
    return torch.randn(batch_size, space.num_tokens, piece.embed_dim)
