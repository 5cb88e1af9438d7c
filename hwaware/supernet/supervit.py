"""`SuperViT`: one set of weights that runs every Arch of a search space (AutoFormer's weight entanglement)."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hwaware.space import Arch, SearchSpace
from hwaware.supernet.layers import (
    ElasticBlock,
    ElasticLayerNorm,
    ElasticLinear,
    ElasticPatchEmbed,
    leading_slice,
)
from hwaware.vit import build_vit, pool_tokens


class SuperViT(nn.Module):
    """A ViT sized to the space's maxima; `forward(x, arch)` runs the subnet `arch` on leading slices.

    It computes as the space says (relative position encoding, pooling, LayerNorm eps, qkv layout).

    Depth d uses the first d blocks. Switching Arch allocates nothing: slices are views.
    """

    def __init__(self, space: SearchSpace, drop_path_rate: float = 0.0):
        super().__init__()
        self.space = space
        D = space.max_embed_dim
        self.patch_embed = ElasticPatchEmbed(space.img_size, space.patch_size, space.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, space.num_tokens, D))
        n = space.max_depth
        self.drop_path_rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        rel_pos = (space.grid_size, space.max_relative_position) if space.relative_position else None
        self.blocks = nn.ModuleList(
            ElasticBlock(D, space.max_heads, space.head_dim, space.max_mlp_hidden, rate, space.norm_eps,
                         space.qkv_layout, rel_pos)
            for rate in self.drop_path_rates
        )
        self.norm = ElasticLayerNorm(D, eps=space.norm_eps)
        self.head = ElasticLinear(D, space.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT initialisation ('' scheme): truncated normal 0.02, zero biases, unit norms."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        d = arch.embed_dim
        x = self.patch_embed(x, d)
        cls = self.cls_token[..., :d].expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed[..., :d]
        for block, heads, hidden in zip(self.blocks, arch.num_heads, arch.mlp_hidden_dims()):
            x = block(x, heads, hidden)
        return self.head(pool_tokens(self.norm(x), self.space.global_pool))

    @torch.no_grad()
    def extract(self, arch: Arch) -> VisionTransformer:
        """The static twin: a plain timm `VisionTransformer` holding copies of `arch`'s slices."""
        arch = self.space.validate(arch)
        model = build_vit(arch, self.space, self.drop_path_rates[: arch.depth])
        state = {}
        for name, target in model.state_dict().items():
            source = self.get_parameter(name)
            module_name, _, kind = name.rpartition(".")
            if module_name.endswith("attn.qkv"):
                attn = self.get_submodule(module_name.removesuffix(".qkv"))
                in_dim = target.shape[1] if kind == "weight" else None
                state[name] = attn.qkv_slice(source, target.shape[0] // 3, in_dim).clone()
            else:
                state[name] = leading_slice(source, target.shape).clone()
        model.load_state_dict(state)
        return model.train(self.training)
