import dataclasses
import json
import random

import pytest
import torch

from hwaware.cli import main
from hwaware.costs import arch_cost, count_flops
from hwaware.space import BUILTIN_SPACES, CONFIG_DIR, Arch, released_arch
from hwaware.vit import build_vit

AUTOFORMER = CONFIG_DIR / "autoformer"  # AutoFormer's released configs, shipped as they are


def _whole_model_cost(arch, space):
    model = build_vit(arch, space)
    x = torch.randn(1, space.in_chans, space.img_size, space.img_size)
    return sum(p.numel() for p in model.parameters()), count_flops(model, x).total()


@pytest.mark.parametrize("name", ["digits", "autoformer-t"])
def test_piece_sum_equals_whole_model(name):
    space = BUILTIN_SPACES[name]
    arch = space.sample(random.Random(7))
    cost = arch_cost(arch, space)
    assert (cost.params, cost.flops) == _whole_model_cost(arch, space)


def test_attention_matmuls_are_counted():
    """Hand count for one digits block: every linear plus Q K^T and A V, one multiply-add each."""
    space = BUILTIN_SPACES["digits"]
    d, h, r, n, hd = 32, 2, 2.0, space.num_tokens, space.head_dim
    one, two = Arch(d, (h,), (r,)), Arch(d, (h, h), (r, r))
    block = arch_cost(two, space).flops - arch_cost(one, space).flops
    a, hidden = h * hd, int(d * r)
    linears = n * (d * 3 * a + a * d + d * hidden + hidden * d)
    attention = 2 * h * n * n * hd
    layer_norms = 2 * 5 * n * d  # fvcore: 5 FLOPs per element for an affine LayerNorm
    assert block == linears + attention + layer_norms


# AutoFormer's spaces compute with relative position encoding (4 tables of 30 x 64 per layer, 99,840 params
# for T's 13 layers: 5,867,944 is what the official code counts for the released T; its 40 heads add
# 40 x 2 x 197^2 x 64 = 198,702,080 multiply-adds); the -timm variants compute without.
@pytest.mark.parametrize("name, params_m, gflops", [
    ("autoformer-t", 5.87, 1.49), ("autoformer-s", 22.89, 5.17), ("autoformer-b", 53.69, 11.71),
    ("autoformer-t-timm", 5.77, 1.29), ("autoformer-s-timm", 22.79, 4.78), ("autoformer-b-timm", 53.58, 11.06),
])
def test_autoformer_released_models(name, params_m, gflops):
    space = BUILTIN_SPACES[name]
    cost = arch_cost(released_arch(space), space)
    assert round(cost.params / 1e6, 2) == params_m
    assert round(cost.flops / 1e9, 2) == gflops


def test_relative_position_terms_are_counted():
    """Hand count: an RPE block adds q . r_k and A r_v (one multiply-add per element each) and 4 tables."""
    plain = BUILTIN_SPACES["digits"]
    rpe = dataclasses.replace(plain, relative_position=True, max_relative_position=3)
    d, h, r, n, hd = 32, 2, 2.0, plain.num_tokens, plain.head_dim
    one, two = Arch(d, (h,), (r,)), Arch(d, (h, h), (r, r))
    extra = [arch_cost(two, s).flops - arch_cost(one, s).flops for s in (plain, rpe)]
    assert extra[1] - extra[0] == 2 * h * n * n * hd
    assert arch_cost(one, rpe).params - arch_cost(one, plain).params == 4 * (2 * 3 + 2) * hd


def test_cost_cli_json(capsys):
    assert main(["cost", "--space", "autoformer-t", "--arch", str(AUTOFORMER / "AutoFormer-T.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 5867944 and out["flops"] == 1487044672
    assert sum(p["flops"] for p in out["breakdown"].values()) == out["flops"]
    assert set(out["breakdown"]) == {"stem", "head", *(f"blocks.{i}" for i in range(13))}
    assert main(["cost", "--space", "autoformer-t-timm", "--arch", "released", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 5768104 and out["flops"] == 1288342592
