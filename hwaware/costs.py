"""Params and FLOPs of an Arch, counted by fvcore on the static timm modules.

One FLOP is one multiply-add (fvcore's and the ViT papers' convention). fvcore has no
handle for the fused attention op, so `sdpa_flop_handle` counts its two matmuls
(Q K^T and A V). A subnet's cost is the sum over its pieces (stem, blocks, head); each
piece is traced once and cached, so pricing a million Archs in a search is cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from hwaware.space import Arch, SearchSpace
from hwaware.vit import Piece, build_piece, piece_input, pieces


def sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of `scaled_dot_product_attention`: (B H N M E) for Q K^T plus (B H N M Ev) for A V."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, n, e = q
    m, ev = k[-2], v[-1]
    return prod(batch) * n * m * (e + ev)


def count_flops(model: nn.Module, example: torch.Tensor) -> FlopCountAnalysis:
    """fvcore's analysis of `model` on `example`, with the fused attention handle and no warnings."""
    analysis = FlopCountAnalysis(model.eval(), example)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int


@lru_cache(maxsize=4096)
def piece_cost(space: SearchSpace, piece: Piece) -> Cost:
    """Params and per-image FLOPs of one piece, counted once per (space, piece)."""
    module = build_piece(space, piece)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        flops = count_flops(module, piece_input(space, piece, batch_size=1)).total()
    return Cost(params=sum(p.numel() for p in module.parameters()), flops=int(flops))


def arch_cost(arch: Arch, space: SearchSpace) -> Cost:
    """Exact params and per-image FLOPs of `arch` as the sum of its pieces."""
    costs = [piece_cost(space, p) for p in pieces(arch)]
    return Cost(params=sum(c.params for c in costs), flops=sum(c.flops for c in costs))


def cost_breakdown(arch: Arch, space: SearchSpace) -> dict[str, dict[str, int]]:
    """Per-part params and FLOPs: stem, each block (by index) and head."""
    parts = {}
    for i, piece in enumerate(pieces(arch)):
        label = piece.kind if piece.kind != "block" else f"blocks.{i - 1}"
        c = piece_cost(space, piece)
        parts[label] = {"params": c.params, "flops": c.flops}
    return parts
