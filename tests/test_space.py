import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hwaware.errors import HwawareError
from hwaware.space import BUILTIN_SPACES, CONFIG_DIR, Arch, SearchSpace, get_space, load_arch, load_space, save_arch

AUTOFORMER = CONFIG_DIR / "autoformer"  # AutoFormer's released configs, shipped as they are
SPACES = sorted(BUILTIN_SPACES)


@st.composite
def space_and_arch(draw):
    space = BUILTIN_SPACES[draw(st.sampled_from(SPACES))]
    return space, space.sample(random.Random(draw(st.integers(0, 2**32 - 1))))


@given(space_and_arch())
def test_arch_round_trips_through_yaml_and_json(tmp_path_factory, pair):
    space, arch = pair
    path = tmp_path_factory.mktemp("arch") / "a.yaml"
    save_arch(arch, path, space=space.name)
    assert load_arch(path, space) == arch
    assert Arch.from_dict(yaml.safe_load(arch.to_json())) == arch
    assert hash(Arch.from_dict(arch.to_dict())) == hash(arch)


@given(space_and_arch(), st.integers(0, 2**32 - 1))
def test_sampling_mutation_and_crossover_stay_in_the_space(pair, seed):
    space, arch = pair
    rng = random.Random(seed)
    other = space.sample(rng)
    for child in (space.mutate(arch, rng), space.crossover(arch, other, rng)):
        assert space.contains(child), child
        assert space.validate(child) is child


def test_sampling_is_deterministic_and_covers_the_choices():
    space = BUILTIN_SPACES["digits"]
    a = [space.sample(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    archs = [space.sample(random.Random(s)) for s in range(300)]
    assert {x.depth for x in archs} == set(space.depths)
    assert {x.embed_dim for x in archs} == set(space.embed_dims)
    assert {h for x in archs for h in x.num_heads} == set(space.num_heads)


def test_extremes_and_subnet_count():
    space = BUILTIN_SPACES["autoformer-t"]
    assert space.largest() == Arch(240, (4,) * 14, (4.0,) * 14)
    assert space.smallest() == Arch(192, (3,) * 12, (3.5,) * 12)
    # 3 embed dims x sum over depths 12..14 of (2 heads x 2 ratios)^depth
    assert space.num_subnets() == 3 * (4**12 + 4**13 + 4**14)


@pytest.mark.parametrize("letter", "TSB")
def test_reads_autoformer_files_as_they_are(letter):
    path = AUTOFORMER / f"AutoFormer-{letter}.yaml"
    builtin = BUILTIN_SPACES[f"autoformer-{letter.lower()}"]
    space = load_space(path)
    for field in ("embed_dims", "depths", "num_heads", "mlp_ratios", "max_embed_dim", "max_depth", "max_heads"):
        assert getattr(space, field) == getattr(builtin, field), field
    raw = yaml.safe_load(path.read_text())["RETRAIN"]
    arch = load_arch(path, builtin)
    assert (arch.embed_dim, arch.depth) == (raw["EMBED_DIM"], raw["DEPTH"])
    assert list(arch.mlp_ratios) == [float(r) for r in raw["MLP_RATIO"]]


def test_autoformer_t_released_arch_is_outside_its_choices_but_runs():
    space = BUILTIN_SPACES["autoformer-t"]
    arch = load_arch(AUTOFORMER / "AutoFormer-T.yaml", space)
    assert 3.0 in arch.mlp_ratios and not space.contains(arch)


def test_own_space_format_round_trips(tmp_path):
    space = BUILTIN_SPACES["digits"]
    path = tmp_path / "space.yaml"
    path.write_text(space.to_yaml())
    assert load_space(path) == space
    assert get_space(str(path)) == space


@pytest.mark.parametrize(
    "arch, field",
    [
        (Arch(80, (1, 1), (2.0, 2.0)), "embed_dim"),
        (Arch(32, (1,) * 5, (2.0,) * 5), "depth"),
        (Arch(32, (1, 8), (2.0, 2.0)), "num_heads[1]"),
        (Arch(64, (1, 1), (2.0, 9.0)), "mlp_ratio[1]"),
    ],
)
def test_validate_names_the_field(arch, field):
    with pytest.raises(HwawareError, match=field.replace("[", r"\[").replace("]", r"\]")):
        BUILTIN_SPACES["digits"].validate(arch)


@pytest.mark.parametrize(
    "text, message",
    [
        ("embed_dim: 32\ndepth: 3\nnum_heads: [1, 1]\nmlp_ratio: [2, 2]\n", "num_heads has 2 entries but depth is 3"),
        ("embed_dim: 32\nnum_heads: [1, 1]\n", "missing field 'mlp_ratio'"),
        ("embed_dim: [32\n", "malformed YAML"),
        ("embed_dim: x\nnum_heads: [1]\nmlp_ratio: [2]\n", "embed_dim must be an integer"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_bad_arch_files(tmp_path, text, message):
    path = tmp_path / "arch.yaml"
    path.write_text(text)
    with pytest.raises(HwawareError, match=message):
        load_arch(path)


def test_unknown_space():
    with pytest.raises(HwawareError, match="unknown space 'nope'"):
        get_space("nope")
    with pytest.raises(HwawareError, match="no such file"):
        get_space("missing.yaml")


def test_space_rejects_bad_geometry():
    with pytest.raises(HwawareError, match="not a multiple"):
        SearchSpace("x", (8,), (1,), (1,), (1.0,), img_size=10, patch_size=3)


@settings(max_examples=20)
@given(st.integers(0, 2**16))
def test_middle_lies_between_extremes(seed):
    for space in BUILTIN_SPACES.values():
        small, mid, large = space.smallest(), space.middle(), space.largest()
        assert small.embed_dim <= mid.embed_dim <= large.embed_dim
        assert small.depth <= mid.depth <= large.depth


def test_compute_settings_round_trip_and_old_dicts_keep_the_timm_computation(tmp_path):
    """Dicts written before spaces said how they compute (old checkpoints, table sidecars) still load as before,
    and a space that computes as before writes exactly the old dict."""
    timm, autoformer = BUILTIN_SPACES["autoformer-t-timm"], BUILTIN_SPACES["autoformer-t"]
    old = timm.to_dict()
    assert not {"relative_position", "global_pool", "norm_eps", "qkv_layout"} & set(old)
    assert SearchSpace.from_dict(old).compute_settings() == timm.compute_settings()
    assert BUILTIN_SPACES["digits"].to_dict() == yaml.safe_load(BUILTIN_SPACES["digits"].to_yaml())
    path = tmp_path / "t.yaml"
    path.write_text(autoformer.to_yaml())
    assert load_space(path) == autoformer
    assert autoformer.compute_settings() == {"relative_position": True, "max_relative_position": 14,
                                             "global_pool": "avg", "norm_eps": 1e-5, "qkv_layout": "autoformer"}
    # AutoFormer's own files describe AutoFormer's supernet, computed its way
    assert load_space(AUTOFORMER / "AutoFormer-S.yaml").compute_settings() == autoformer.compute_settings()
    assert BUILTIN_SPACES["autoformer-b-timm"].largest() == BUILTIN_SPACES["autoformer-b"].largest()


@pytest.mark.parametrize("field, value, message", [
    ("global_pool", "max", "global_pool must be one of token, avg"),
    ("qkv_layout", "fused", "qkv_layout must be one of timm, autoformer"),
    ("norm_eps", 0, "norm_eps must be a number in"),
    ("relative_position", "yes", "relative_position must be true or false"),
    ("max_relative_position", 0, "max_relative_position must be a positive integer"),
])
def test_bad_compute_settings_are_named(field, value, message):
    data = {**BUILTIN_SPACES["digits"].to_dict(), field: value}
    with pytest.raises(HwawareError, match=message):
        SearchSpace.from_dict(data)
