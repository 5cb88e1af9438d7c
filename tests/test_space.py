import random
from pathlib import Path

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


@settings(deadline=None)  # each example writes (and fsyncs) a file: its time is the disk's, not the code's
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


# ---- one check for every space definition, wherever it comes from ---------------------------------

HUGE = {"embed_dims": [65536], "depths": [64], "num_heads": [64]}  # ~1 TB of weights: no machine here holds it


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", 0, "patch_size must be positive, got 0"),
    ("patch_size", "2", "patch_size must be a positive integer, got '2'"),
    ("img_size", 8.5, "img_size must be a positive integer"),
    ("head_dim", -4, "head_dim must be positive"),
    ("num_classes", None, "num_classes must be a positive integer"),
    ("num_heads", [1, True], r"num_heads\[1\] must be a positive integer"),
    ("mlp_ratios", [float("nan")], r"mlp_ratios\[0\] must be a positive number"),
    ("embed_dims", "64", "embed_dims must be a list of numbers"),
    ("embed_dims", [10**400], r"embed_dims\[0\] = .* is over the limit of 2,147,483,647"),
    ("depths", [5000], "depth 5000 is over the limit of 1024 layers"),
    ("max_mlp_ratio", "4", "max_mlp_ratio must be a positive number"),
    ("mlp_ratios", [0.01], "embed_dim 32 with mlp_ratio 0.01 gives an MLP with no hidden units"),
])
def test_bad_space_fields_are_named_before_anything_is_built(field, value, message):
    with pytest.raises(HwawareError, match=f"t.json: space t: {message}"):
        SearchSpace.from_dict({**BUILTIN_SPACES["digits"].to_dict(), "name": "t", field: value}, source="t.json")


def test_a_space_too_large_for_this_machine_is_refused_with_its_size():
    from hwaware.space import largest_model_bytes

    data = {**BUILTIN_SPACES["digits"].to_dict(), **HUGE}
    with pytest.raises(HwawareError, match=r"largest subnet needs about [\d,.]+ GiB .* more than this machine's"):
        SearchSpace.from_dict(data)
    # the estimate counts what SuperViT allocates: its weights exactly (tests/test_supernet.py builds it)
    assert largest_model_bytes(BUILTIN_SPACES["digits"], batch_size=0) == 808_744


def test_every_constructor_goes_through_the_one_check():
    import dataclasses

    digits = BUILTIN_SPACES["digits"]
    with pytest.raises(HwawareError, match="patch_size must be positive"):
        dataclasses.replace(digits, patch_size=0)
    with pytest.raises(HwawareError, match="patch_size must be positive"):
        SearchSpace("x", (8,), (1,), (1,), (1.0,), img_size=8, patch_size=0)
    autoformer = {"SUPERNET": {"EMBED_DIM": 256.5}, "SEARCH_SPACE": {
        "EMBED_DIM": [192], "DEPTH": [12], "NUM_HEADS": [3], "MLP_RATIO": [4.0]}}
    with pytest.raises(HwawareError, match="af.yaml: space af: max_embed_dim must be a positive integer"):
        SearchSpace.from_dict(autoformer, source="af.yaml")


def _hwaware(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "hwaware.cli", *args], capture_output=True, text=True, cwd=cwd)


def _one_line_exit_2(result, *needles):
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "unexpected" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_space_show_refuses_patch_size_zero_in_one_line(tmp_path):
    (tmp_path / "p0.yaml").write_text(yaml.safe_dump({**BUILTIN_SPACES["digits"].to_dict(), "patch_size": 0}))
    _one_line_exit_2(_hwaware("space", "show", "p0.yaml", cwd=tmp_path), "p0.yaml", "patch_size must be positive")


@pytest.mark.parametrize("bad", [{"patch_size": 0}, HUGE])
def test_recalibrate_refuses_a_bad_space_def_before_building_a_model(tmp_path, bad):
    import json
    import shutil

    shipped = Path(__file__).parents[1] / "latency_tables" / "cpu-onnxruntime-fp32-digits-b1"
    table = tmp_path / "in" / shipped.name
    table.parent.mkdir()
    shutil.copy(shipped.with_suffix(".csv"), table.with_suffix(".csv"))
    sidecar = json.loads(shipped.with_suffix(".json").read_text())
    sidecar["space_def"].update(bad)
    table.with_suffix(".json").write_text(json.dumps(sidecar))
    result = _hwaware("profile", "--recalibrate", str(table.with_suffix(".csv")), "--out", "out", cwd=tmp_path)
    _one_line_exit_2(result, "space_def", "patch_size must be positive" if "patch_size" in bad else "GiB")
    assert not list((tmp_path / "out").glob("*.csv"))


def test_a_checkpoint_recording_an_impossible_space_is_refused_before_its_model_is_built(tmp_path):
    from hwaware.checkpoint import save_checkpoint
    from hwaware.evaluation import load_supernet

    space = {**BUILTIN_SPACES["digits"].to_dict(), **HUGE}
    save_checkpoint(tmp_path / "last.pt", {"space": space, "config": {}, "model": {}})
    with pytest.raises(HwawareError, match=r"last.pt: space: space digits: its largest subnet needs about"):
        load_supernet(tmp_path / "last.pt")
