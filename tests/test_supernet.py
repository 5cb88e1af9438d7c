import dataclasses
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

from hwaware.errors import HwawareError
from hwaware.space import AUTOFORMER_COMPUTE, BUILTIN_SPACES, Arch
from hwaware.supernet import SuperViT
from hwaware.supernet.layers import ElasticAttention
from hwaware.vit import RelPosAttention, build_piece, pieces, relative_position_index


@pytest.fixture(scope="module")
def supernets():
    torch.manual_seed(0)
    return {name: SuperViT(space).eval() for name, space in BUILTIN_SPACES.items()}


def _image(space, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, space.in_chans, space.img_size, space.img_size, generator=g)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(BUILTIN_SPACES)), seed=st.integers(0, 2**32 - 1))
@torch.no_grad()
def test_extracted_timm_model_matches_supernet(supernets, name, seed):
    supernet, space = supernets[name], BUILTIN_SPACES[name]
    arch = space.sample(random.Random(seed))
    static = supernet.extract(arch).eval()
    assert type(static) is VisionTransformer
    assert len(static.blocks) == arch.depth
    for block, heads, hidden in zip(static.blocks, arch.num_heads, arch.mlp_hidden_dims()):
        assert (block.attn.num_heads, block.attn.head_dim, block.mlp.fc1.out_features) == (heads, space.head_dim, hidden)
    x = _image(space, seed=seed % 1000)
    assert (supernet(x, arch) - static(x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_extreme_archs_match_for_digits(supernets):
    space = BUILTIN_SPACES["digits"]
    for arch in (space.largest(), space.smallest(), space.middle()):
        x = _image(space, batch=4)
        assert torch.allclose(supernets["digits"](x, arch), supernets["digits"].extract(arch).eval()(x), atol=1e-5)


def test_weights_are_shared_not_copied(supernets):
    """Training a subnet changes the supernet's leading slice and nothing beyond it."""
    space = BUILTIN_SPACES["digits"]
    torch.manual_seed(1)
    net = SuperViT(space)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    arch = space.smallest()
    loss = net(_image(space), arch).sum()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    after = net.state_dict()
    assert not torch.equal(before["blocks.0.mlp.fc1.weight"], after["blocks.0.mlp.fc1.weight"])
    hidden, d = arch.mlp_hidden_dims()[0], arch.embed_dim
    assert torch.equal(before["blocks.0.mlp.fc1.weight"][hidden:], after["blocks.0.mlp.fc1.weight"][hidden:])
    assert torch.equal(before["blocks.0.mlp.fc1.weight"][:, d:], after["blocks.0.mlp.fc1.weight"][:, d:])
    assert torch.equal(before[f"blocks.{space.max_depth - 1}.norm1.weight"], after[f"blocks.{space.max_depth - 1}.norm1.weight"])


def test_switching_arch_allocates_no_parameters(supernets):
    net = supernets["digits"]
    ptrs = [p.data_ptr() for p in net.parameters()]
    rng = random.Random(0)
    for _ in range(5):
        net(_image(BUILTIN_SPACES["digits"]), BUILTIN_SPACES["digits"].sample(rng))
    assert ptrs == [p.data_ptr() for p in net.parameters()]


def test_state_dict_names_follow_timm(supernets):
    names = set(supernets["digits"].state_dict())
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight",
                 "blocks.0.attn.proj.bias", "blocks.3.mlp.fc2.weight", "norm.weight", "head.weight"):
        assert name in names
    timm_names = set(supernets["digits"].extract(BUILTIN_SPACES["digits"].largest()).state_dict())
    assert timm_names <= names


@torch.no_grad()
def test_pieces_chained_equal_the_whole_model(supernets):
    """The latency table and the cost model price pieces; chained, they must be the shipped model."""
    space = BUILTIN_SPACES["digits"]
    arch = Arch(48, (1, 4, 2), (2.0, 4.0, 3.0))
    static = supernets["digits"].extract(arch).eval()
    x = _image(space)
    y = x
    for piece, module in zip(pieces(arch), _piece_modules(space, arch, static)):
        built = build_piece(space, piece)
        built.load_state_dict(module.state_dict())
        y = built.eval()(y)
    assert torch.allclose(y, static(x), atol=1e-5)


def _piece_modules(space, arch, static):
    from hwaware.vit import Head, Stem

    return [Stem(static), *static.blocks, Head(static)]


def test_extract_validates_the_arch():
    net = SuperViT(BUILTIN_SPACES["digits"])
    with pytest.raises(HwawareError, match="embed_dim"):
        net.extract(Arch(128, (1,), (2.0,)))


# ---- AutoFormer's settings: relative position encoding, average pooling, eps, qkv layout --------------------

RPE_SPACE = dataclasses.replace(BUILTIN_SPACES["digits"], name="digits-autoformer",
                                **{**AUTOFORMER_COMPUTE, "max_relative_position": 2})


@torch.no_grad()
def test_autoformer_settings_extract_exactly_and_chain_as_pieces():
    torch.manual_seed(1)
    supernet = SuperViT(RPE_SPACE).eval()
    for p in supernet.parameters():  # random biases and norms too, so every slice matters
        p.normal_(0, 0.2)
    for seed in range(4):
        arch = RPE_SPACE.sample(random.Random(seed))
        static = supernet.extract(arch).eval()
        assert all(isinstance(b.attn, RelPosAttention) for b in static.blocks)
        assert static.global_pool == "avg" and static.norm.eps == 1e-5
        x = _image(RPE_SPACE, seed=seed)
        assert (supernet(x, arch) - static(x)).abs().max().item() <= 1e-5
        y = x
        for piece, module in zip(pieces(arch), _piece_modules(RPE_SPACE, arch, static)):
            built = build_piece(RPE_SPACE, piece)
            built.load_state_dict(module.state_dict())
            y = built.eval()(y)
        assert (y - static(x)).abs().max().item() <= 1e-5
    assert "blocks.0.attn.rel_pos_embed_v.embeddings_table_h" in static.state_dict()


def test_autoformer_qkv_layout_slices_as_autoformer_does():
    """Weight rows interleaved (q, k, v of row j at 3j, 3j+1, 3j+2); bias the contiguous prefix b[:3A]."""
    attn = ElasticAttention(max_dim=3, max_heads=2, head_dim=2, qkv_layout="autoformer")
    rows = torch.arange(12.0)
    weight = rows[:, None].expand(12, 3).contiguous()
    assert attn.qkv_slice(weight, 2, 3)[:, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert attn.qkv_slice(rows, 2).tolist() == [0, 1, 2, 3, 4, 5]
    timm = ElasticAttention(max_dim=3, max_heads=2, head_dim=2)
    assert timm.qkv_slice(rows, 2).tolist() == [0, 1, 4, 5, 8, 9]


def test_relative_position_index_clips_and_reserves_row_zero_for_the_class_token():
    index_v, index_h = relative_position_index(grid_size=4, max_distance=2)
    assert index_v.shape == (17, 17)
    assert index_v[0].eq(0).all() and index_v[:, 0].eq(0).all() and index_h[0].eq(0).all()
    # patch 0 at (0, 0), patch 15 at (3, 3): distance +3 clipped to +2, shifted by 3
    assert (index_v[1, 16].item(), index_h[1, 16].item()) == (5, 5)
    assert (index_v[16, 1].item(), index_h[16, 1].item()) == (1, 1)
    assert (index_v[6, 6].item(), index_h[6, 7].item()) == (3, 4)


def test_a_fresh_static_model_holds_no_uninitialised_memory():
    """timm's weight_init="skip" leaves cls_token and pos_embed as torch.empty; random-weight latency pieces
    and quantization calibration need finite, timm-sized values there."""
    from hwaware.vit import build_vit

    space = BUILTIN_SPACES["digits"]
    for _ in range(5):
        model = build_vit(space.largest(), space)
        assert model.cls_token.abs().max() < 1e-4 and 0 < model.pos_embed.abs().max() < 0.1
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
