"""Weight-entangled layers: each holds the largest weight and runs on its leading slice.

The input width comes from the tensor itself; the output width is the only thing a
caller states. Parameter names follow timm's ViT, so a layer's static twin is the timm
module of the same name holding the leading slice of each parameter (q, k, v sliced apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from hwaware.vit import RelativePosition2D, relative_position_attention


def leading_slice(tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The leading `shape` corner of `tensor`: how every entangled weight shares with its subnets."""
    return tensor[tuple(slice(0, s) for s in shape)]


class ElasticLinear(nn.Linear):
    """`nn.Linear` whose subnets use the first `out_features` rows and first `in` columns.

    The slice is made contiguous: one small copy of the weight per call, cheaper than the
    strided matmuls (forward and backward) a narrower-than-stored view costs on CPU.
    """

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        out = out_features or self.out_features
        bias = self.bias[:out] if self.bias is not None else None
        return F.linear(x, self.weight[:out, : x.shape[-1]].contiguous(), bias)


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the active width, with the leading slice of its affine parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


class ElasticPatchEmbed(nn.Module):
    """timm's `PatchEmbed` (conv, flatten, no norm) producing the first `embed_dim` channels."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, max_embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, max_embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, embed_dim: int) -> torch.Tensor:
        x = F.conv2d(x, self.proj.weight[:embed_dim], self.proj.bias[:embed_dim], stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)


class ElasticAttention(nn.Module):
    """Multi-head self-attention whose subnets use the first `num_heads` heads of q, k and v alike.

    Two layouts of the stored `qkv` ([3 x max heads x head_dim, dim]), `qkv_slice` reads either:
    - "timm": q, k and v stacked as blocks; a subnet takes the leading rows of each block.
    - "autoformer": weight rows interleaved (q, k, v of row j at 3j, 3j+1, 3j+2) and the bias read as a
      contiguous prefix b[:3A] split in three, as AutoFormer's code slices it, so its checkpoints load
      unchanged and every subnet computes what AutoFormer's computes.
    With `rel_pos` (AutoFormer's relative position encoding: grid size, max distance) each layer holds
    key and value tables of the full head dim, used whole by every subnet.
    """

    def __init__(self, max_dim: int, max_heads: int, head_dim: int, qkv_layout: str = "timm",
                 rel_pos: tuple[int, int] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.max_attn_dim = max_heads * head_dim
        self.qkv_layout = qkv_layout
        self.qkv = ElasticLinear(max_dim, 3 * self.max_attn_dim, bias=True)
        self.proj = ElasticLinear(self.max_attn_dim, max_dim, bias=True)
        self.relative_position = rel_pos is not None
        if rel_pos is not None:
            self.rel_pos_embed_k = RelativePosition2D(head_dim, *rel_pos)
            self.rel_pos_embed_v = RelativePosition2D(head_dim, *rel_pos)

    def qkv_slice(self, tensor: torch.Tensor, attn_dim: int, in_dim: int | None = None) -> torch.Tensor:
        """Rows of q, k and v (stacked as timm stacks them) for `attn_dim`; for the weight, columns up to `in_dim`."""
        if self.qkv_layout == "autoformer":
            if tensor.dim() == 1:
                return tensor[: 3 * attn_dim]
            stacked = tensor.view(self.max_attn_dim, 3, tensor.shape[1])[:attn_dim, :, :in_dim].transpose(0, 1)
        else:
            stacked = tensor.view(3, self.max_attn_dim, *tensor.shape[1:])[:, :attn_dim]
            if in_dim is not None:
                stacked = stacked[..., :in_dim]
        return stacked.reshape(3 * attn_dim, *stacked.shape[2:])

    def forward(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        B, N, C = x.shape
        attn_dim = num_heads * self.head_dim
        weight = self.qkv_slice(self.qkv.weight, attn_dim, C)
        bias = self.qkv_slice(self.qkv.bias, attn_dim)
        qkv = F.linear(x, weight, bias).reshape(B, N, 3, num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.relative_position:
            x = relative_position_attention(q, k, v, self.head_dim**-0.5, self.rel_pos_embed_k(), self.rel_pos_embed_v())
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, attn_dim)
        return self.proj(x, C)


class ElasticMlp(nn.Module):
    """timm's `Mlp` (fc1, GELU, fc2) using the first `hidden` units."""

    def __init__(self, max_dim: int, max_hidden: int):
        super().__init__()
        self.fc1 = ElasticLinear(max_dim, max_hidden)
        self.act = nn.GELU()
        self.fc2 = ElasticLinear(max_hidden, max_dim)

    def forward(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, hidden)), x.shape[-1])


class ElasticBlock(nn.Module):
    """timm's pre-norm `Block` with elastic width, heads and MLP hidden size."""

    def __init__(self, max_dim: int, max_heads: int, head_dim: int, max_hidden: int, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, qkv_layout: str = "timm", rel_pos: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = ElasticLayerNorm(max_dim, eps=norm_eps)
        self.attn = ElasticAttention(max_dim, max_heads, head_dim, qkv_layout, rel_pos)
        self.norm2 = ElasticLayerNorm(max_dim, eps=norm_eps)
        self.mlp = ElasticMlp(max_dim, max_hidden)
        self.drop_path_rate = drop_path
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_heads: int, mlp_hidden: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), num_heads))
        return x + self.drop_path(self.mlp(self.norm2(x), mlp_hidden))
