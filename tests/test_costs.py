import json
import random

import pytest
import torch

from hwaware.cli import main
from hwaware.costs import arch_cost, count_flops
from hwaware.space import BUILTIN_SPACES, CONFIG_DIR, Arch, load_arch
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


@pytest.mark.parametrize("letter, params_m, gflops", [("T", 5.77, 1.29), ("S", 22.79, 4.78), ("B", 53.58, 11.06)])
def test_autoformer_released_models(letter, params_m, gflops):
    space = BUILTIN_SPACES[f"autoformer-{letter.lower()}"]
    cost = arch_cost(load_arch(AUTOFORMER / f"AutoFormer-{letter}.yaml", space), space)
    assert round(cost.params / 1e6, 2) == params_m
    assert round(cost.flops / 1e9, 2) == gflops


def test_cost_cli_json(capsys):
    assert main(["cost", "--space", "autoformer-t", "--arch", str(AUTOFORMER / "AutoFormer-T.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 5768104 and out["flops"] == 1288342592
    assert sum(p["flops"] for p in out["breakdown"].values()) == out["flops"]
    assert set(out["breakdown"]) == {"stem", "head", *(f"blocks.{i}" for i in range(13))}
