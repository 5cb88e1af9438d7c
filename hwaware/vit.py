"""The static ViT: the plain timm modules an Arch becomes, whole or piece by piece.

Export ships `build_vit`; the latency table and the cost model time and count the
`pieces` of the very same modules, so what is priced is what is shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from hwaware.space import Arch, SearchSpace

# ---- AutoFormer's relative position encoding ------------------------------------------------


def relative_position_index(grid_size: int, max_distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoFormer's table rows for every (query, key) token pair, vertical and horizontal.

    Row and column distance (key minus query) clipped to +-max_distance and shifted by max_distance + 1;
    row 0 serves every pair that involves the class token (token 0).
    """
    position = torch.arange(grid_size * grid_size)

    def index(coordinate: torch.Tensor) -> torch.Tensor:
        distance = (coordinate[None, :] - coordinate[:, None]).clamp(-max_distance, max_distance)
        return F.pad(distance + max_distance + 1, (1, 0, 1, 0))

    return index(position // grid_size), index(position % grid_size)


class RelativePosition2D(nn.Module):
    """One learned vector per clipped vertical and per horizontal distance; a pair's vector is their sum.

    Parameter names are AutoFormer's, so its checkpoints map by name. The index is a buffer rebuilt
    from the space, never stored.
    """

    def __init__(self, head_dim: int, grid_size: int, max_distance: int):
        super().__init__()
        self.embeddings_table_v = nn.Parameter(torch.zeros(2 * max_distance + 2, head_dim))
        self.embeddings_table_h = nn.Parameter(torch.zeros(2 * max_distance + 2, head_dim))
        index_v, index_h = relative_position_index(grid_size, max_distance)
        self.register_buffer("index_v", index_v, persistent=False)
        self.register_buffer("index_h", index_h, persistent=False)
        nn.init.trunc_normal_(self.embeddings_table_v, std=0.02)
        nn.init.trunc_normal_(self.embeddings_table_h, std=0.02)

    def forward(self) -> torch.Tensor:
        """[tokens, tokens, head_dim]: the encoding of every (query, key) pair."""
        return self.embeddings_table_v[self.index_v] + self.embeddings_table_h[self.index_h]


def relative_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                rel_k: torch.Tensor, rel_v: torch.Tensor) -> torch.Tensor:
    """AutoFormer's attention: (q.k + q.r_k) x scale, softmax, then A v + A r_v. q, k, v: [B, H, N, head_dim].

    The encoding terms are batched over the query token (plain MatMuls, which every ONNX runtime and
    TensorRT take; no Einsum), in the order AutoFormer's code sums them.
    """
    B, H, N, d = q.shape
    by_query = q.permute(2, 0, 1, 3).reshape(N, B * H, d) @ rel_k.transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) * scale + by_query.transpose(0, 1).reshape(B, H, N, N) * scale
    attn = logits.softmax(dim=-1)
    by_query = attn.permute(2, 0, 1, 3).reshape(N, B * H, N) @ rel_v
    return attn @ v + by_query.transpose(0, 1).reshape(B, H, N, d)


class RelPosAttention(Attention):
    """timm's `Attention` plus AutoFormer's relative position encoding of keys and values."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid_size: int, max_distance: int):
        super().__init__(dim, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=True)
        self.rel_pos_embed_k = RelativePosition2D(head_dim, grid_size, max_distance)
        self.rel_pos_embed_v = RelativePosition2D(head_dim, grid_size, max_distance)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("RelPosAttention takes no attention mask")
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = relative_position_attention(q, k, v, self.scale, self.rel_pos_embed_k(), self.rel_pos_embed_v())
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def build_block(space: SearchSpace, embed_dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> Block:
    """A timm `Block` with `num_heads` heads of the space's head dim (Q-K-V width = heads x head dim),
    the space's LayerNorm eps, and relative position encoding where the space has it."""
    # timm's Block asserts embed_dim % num_heads == 0 for its default attention, which AutoFormer's
    # spaces break (320 dims, 7 heads); build it with one head, then fit the real attention.
    block = Block(dim=embed_dim, num_heads=1, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path,
                  norm_layer=partial(nn.LayerNorm, eps=space.norm_eps))
    if space.relative_position:
        block.attn = RelPosAttention(embed_dim, num_heads, space.head_dim, space.grid_size, space.max_relative_position)
    else:
        block.attn = Attention(embed_dim, num_heads=num_heads, attn_head_dim=space.head_dim, qkv_bias=True)
    assert isinstance(block.mlp, Mlp) and block.mlp.fc1.out_features == int(embed_dim * mlp_ratio)
    return block


def _bare_vit(space: SearchSpace, embed_dim: int) -> VisionTransformer:
    """Stem, final norm and head of a timm ViT, with no blocks yet. Average pooling keeps the final norm
    before the pool (`fc_norm=False`), as AutoFormer normalises every token and then averages.

    `weight_init="skip"` leaves timm's class token and position embedding as uninitialised memory (seen:
    1e37, NaN logits); they get timm's own init here, so random-weight pieces time and quantize sanely.
    """
    vit = VisionTransformer(
        img_size=space.img_size,
        patch_size=space.patch_size,
        in_chans=space.in_chans,
        num_classes=space.num_classes,
        global_pool=space.global_pool,
        fc_norm=False,
        embed_dim=embed_dim,
        depth=0,
        num_heads=1,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=space.norm_eps),
        weight_init="skip",
    )
    with torch.no_grad():
        trunc_normal_(vit.pos_embed, std=0.02)
        nn.init.normal_(vit.cls_token, std=1e-6)
    return vit


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
    """Final norm, pooling (class token, or mean of the patch tokens) and classifier of a timm ViT: tokens -> logits."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.norm, self.head, self.global_pool = vit.norm, vit.head, vit.global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pool_tokens(self.norm(x), self.global_pool))


def pool_tokens(x: torch.Tensor, global_pool: str) -> torch.Tensor:
    """The class token, or the mean of the patch tokens (token 0 is the class token)."""
    return x[:, 0] if global_pool == "token" else x[:, 1:].mean(dim=1)


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
