"""Search spaces and architectures: the currency that training, pricing, search and export share.

Plain Python on purpose (no torch): the search and its tests stay fast, and an `Arch`
can be priced, bred and written to disk anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from hwaware.errors import HwawareError
from hwaware.io import excerpt

__all__ = [
    "Arch", "SearchSpace", "BUILTIN_SPACES", "get_space", "load_space", "load_arch", "released_arch", "resolve_arch",
    "save_arch",
]


@dataclass(frozen=True)
class Arch:
    """One subnet: a single embed dim, and per layer its heads and MLP ratio (depth = layer count)."""

    embed_dim: int
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]

    def __post_init__(self):
        for i, h in enumerate(self.num_heads):
            if isinstance(h, bool) or not isinstance(h, (int, float)) or h != int(h):
                raise HwawareError(f"arch: num_heads[{i}] must be a whole number, got {excerpt(h)}")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int):
            raise HwawareError(f"arch: embed_dim must be an integer, got {excerpt(self.embed_dim)}")
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "mlp_ratios", tuple(float(r) for r in self.mlp_ratios))
        if len(self.num_heads) != len(self.mlp_ratios):
            raise HwawareError(
                f"arch: num_heads has {len(self.num_heads)} entries but mlp_ratio has "
                f"{len(self.mlp_ratios)}; both need one entry per layer"
            )
        if not self.num_heads:
            raise HwawareError("arch: depth must be at least 1")

    @property
    def depth(self) -> int:
        return len(self.num_heads)

    def layers(self) -> Iterable[tuple[int, float]]:
        """(heads, MLP ratio) of each layer, in order."""
        return zip(self.num_heads, self.mlp_ratios)

    def mlp_hidden_dims(self) -> tuple[int, ...]:
        """Hidden width of each layer's MLP, rounded as timm's `Block` rounds it."""
        return tuple(int(self.embed_dim * r) for r in self.mlp_ratios)

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": list(self.num_heads),
            "mlp_ratio": list(self.mlp_ratios),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "arch") -> Arch:
        """Read hwaware's own keys or AutoFormer's upper-case ones; `depth` must match the lists."""
        if not isinstance(data, dict):
            raise HwawareError(f"{source}: expected a mapping with embed_dim, depth, num_heads, mlp_ratio")
        keys = {str(k).lower(): v for k, v in data.items()}
        embed_dim = _require_int(keys, "embed_dim", source)
        heads = _require_list(keys, "num_heads", source)
        ratios = _require_list(keys, "mlp_ratio", source)
        if "depth" in keys:
            depth = _require_int(keys, "depth", source)
            for name, values in (("num_heads", heads), ("mlp_ratio", ratios)):
                if len(values) != depth:
                    raise HwawareError(f"{source}: {name} has {len(values)} entries but depth is {depth}")
        try:
            return cls(embed_dim, tuple(heads), tuple(float(r) for r in ratios))
        except (TypeError, ValueError) as exc:
            raise HwawareError(f"{source}: num_heads and mlp_ratio must be numbers ({exc})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def short(self) -> str:
        """A compact one-line label for tables and logs."""
        heads = "".join(str(h) if h < 10 else f"({h})" for h in self.num_heads)
        ratios = "/".join(f"{r:g}" for r in self.mlp_ratios)
        return f"d{self.embed_dim}-L{self.depth}-h{heads}-r{ratios}"


@dataclass(frozen=True)
class SearchSpace:
    """The choices a supernet was built for, plus the maxima its shared weights are sized to.

    Sampling draws from the choices; any Arch within the maxima can run and be extracted
    (AutoFormer's released T uses an MLP ratio its own choices do not list).
    """

    name: str
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    head_dim: int = 64
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    max_embed_dim: int = 0
    max_depth: int = 0
    max_heads: int = 0
    max_mlp_ratio: float = 0.0
    # How the supernet computes (see COMPUTE_FIELDS); the defaults are hwaware's original timm ViT.
    relative_position: bool = False
    max_relative_position: int = 14
    global_pool: str = "token"
    norm_eps: float = 1e-6
    qkv_layout: str = "timm"

    def __post_init__(self):
        check_definition(self)

    def _check_compute_fields(self) -> None:
        if not isinstance(self.relative_position, bool):
            raise HwawareError(f"space {self.name}: relative_position must be true or false, got {self.relative_position!r}")
        if isinstance(self.max_relative_position, bool) or not isinstance(self.max_relative_position, int) \
                or self.max_relative_position < 1:
            raise HwawareError(f"space {self.name}: max_relative_position must be a positive integer, "
                               f"got {self.max_relative_position!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise HwawareError(f"space {self.name}: global_pool must be one of {', '.join(GLOBAL_POOLS)}, "
                               f"got {self.global_pool!r}")
        if self.qkv_layout not in QKV_LAYOUTS:
            raise HwawareError(f"space {self.name}: qkv_layout must be one of {', '.join(QKV_LAYOUTS)}, "
                               f"got {self.qkv_layout!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) \
                or not (0 < self.norm_eps < 1):
            raise HwawareError(f"space {self.name}: norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
        object.__setattr__(self, "norm_eps", float(self.norm_eps))

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) image."""
        return self.img_size // self.patch_size

    # ---- geometry -------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens a block sees: the patches plus the class token."""
        return self.num_patches + 1

    @property
    def max_mlp_hidden(self) -> int:
        return int(self.max_embed_dim * self.max_mlp_ratio)

    def num_subnets(self) -> int:
        per_layer = len(self.num_heads) * len(self.mlp_ratios)
        return len(self.embed_dims) * sum(per_layer**d for d in self.depths)

    # ---- membership -----------------------------------------------------------------
    def validate(self, arch: Arch) -> Arch:
        """Raise a HwawareError naming the field if `arch` cannot run on this space's supernet."""
        if arch.embed_dim < 1 or arch.embed_dim > self.max_embed_dim:
            raise HwawareError(f"arch: embed_dim {arch.embed_dim} is outside 1..{self.max_embed_dim} of space {self.name}")
        if arch.depth > self.max_depth:
            raise HwawareError(f"arch: depth {arch.depth} exceeds the maximum {self.max_depth} of space {self.name}")
        for i, (heads, ratio) in enumerate(arch.layers()):
            if heads < 1 or heads > self.max_heads:
                raise HwawareError(f"arch: num_heads[{i}] = {heads} is outside 1..{self.max_heads} of space {self.name}")
            hidden = int(arch.embed_dim * ratio)
            if hidden < 1 or hidden > self.max_mlp_hidden:
                raise HwawareError(
                    f"arch: mlp_ratio[{i}] = {ratio:g} gives an MLP of {hidden} for embed_dim {arch.embed_dim}, "
                    f"outside 1..{self.max_mlp_hidden} of space {self.name}"
                )
        return arch

    def contains(self, arch: Arch) -> bool:
        """True if every value of `arch` is one of this space's choices (what sampling produces)."""
        return (
            arch.embed_dim in self.embed_dims
            and arch.depth in self.depths
            and all(h in self.num_heads for h in arch.num_heads)
            and all(r in self.mlp_ratios for r in arch.mlp_ratios)
        )

    # ---- sampling and breeding --------------------------------------------------------
    def largest(self) -> Arch:
        d = max(self.depths)
        return Arch(max(self.embed_dims), (max(self.num_heads),) * d, (max(self.mlp_ratios),) * d)

    def smallest(self) -> Arch:
        d = min(self.depths)
        return Arch(min(self.embed_dims), (min(self.num_heads),) * d, (min(self.mlp_ratios),) * d)

    def middle(self) -> Arch:
        """The median choice everywhere: a fixed subnet between the extremes, for tracking training."""
        d = _median(self.depths)
        return Arch(_median(self.embed_dims), (_median(self.num_heads),) * d, (_median(self.mlp_ratios),) * d)

    def sample(self, rng: random.Random) -> Arch:
        """Uniform over each choice (depth first, then each layer independently), as AutoFormer samples."""
        depth = rng.choice(self.depths)
        return Arch(
            rng.choice(self.embed_dims),
            tuple(rng.choice(self.num_heads) for _ in range(depth)),
            tuple(rng.choice(self.mlp_ratios) for _ in range(depth)),
        )

    def mutate(self, arch: Arch, rng: random.Random, layer_prob: float = 0.2, global_prob: float = 0.4) -> Arch:
        """AutoFormer's mutation: depth and embed dim with `global_prob`, each layer's heads and ratio with `layer_prob`."""
        heads, ratios = list(arch.num_heads), list(arch.mlp_ratios)
        if rng.random() < global_prob:
            depth = rng.choice(self.depths)
            while len(heads) < depth:
                heads.append(rng.choice(self.num_heads))
                ratios.append(rng.choice(self.mlp_ratios))
            heads, ratios = heads[:depth], ratios[:depth]
        embed_dim = rng.choice(self.embed_dims) if rng.random() < global_prob else arch.embed_dim
        for i in range(len(heads)):
            if rng.random() < layer_prob:
                heads[i] = rng.choice(self.num_heads)
            if rng.random() < layer_prob:
                ratios[i] = rng.choice(self.mlp_ratios)
        return Arch(embed_dim, tuple(heads), tuple(ratios))

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Each gene from either parent; layers only one parent has come from that parent."""
        depth = rng.choice((a.depth, b.depth))
        heads, ratios = [], []
        for i in range(depth):
            donors = [p for p in (a, b) if i < p.depth]
            heads.append(rng.choice(donors).num_heads[i])
            ratios.append(rng.choice(donors).mlp_ratios[i])
        return Arch(rng.choice((a.embed_dim, b.embed_dim)), tuple(heads), tuple(ratios))

    # ---- I/O ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data; how-it-computes fields at hwaware's original values are left out, so the dict of a
        space that computes as before equals the dicts stored before those fields existed (checkpoints,
        latency table sidecars, export configs)."""
        data = asdict(self)
        for name in ("embed_dims", "depths", "num_heads", "mlp_ratios"):
            data[name] = list(data[name])
        for name, original in TIMM_COMPUTE.items():
            if data[name] == original:
                del data[name]
        return data

    def compute_settings(self) -> dict[str, Any]:
        """The how-it-computes fields, all of them."""
        return {name: getattr(self, name) for name in TIMM_COMPUTE}

    @classmethod
    def from_dict(cls, data: Any, source: str = "space") -> SearchSpace:
        """Read hwaware's own format, or AutoFormer's (`SUPERNET` maxima and `SEARCH_SPACE` choices)."""
        if not isinstance(data, dict):
            raise HwawareError(f"{source}: expected a mapping describing a search space")
        if "SEARCH_SPACE" in data:
            return _from_autoformer(data, source)
        known = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise HwawareError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for name in CHOICE_LISTS:
            if name not in data:
                raise HwawareError(f"{source}: missing field {name!r}")
        return _build(source, **{"name": Path(source).stem, **data})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- the one check of a space definition ----------------------------------------------------------
#
# Every way a SearchSpace is made (a YAML file, a built-in, a checkpoint's recorded space, a latency table's
# space_def, an import, dataclasses.replace) ends in SearchSpace.__post_init__, which calls check_definition:
# types and ranges first, then the memory the largest subnet needs, all before any tensor exists.

CHOICE_LISTS = {"embed_dims": int, "depths": int, "num_heads": int, "mlp_ratios": float}
POSITIVE_INTS = ("head_dim", "img_size", "patch_size", "in_chans", "num_classes")
# each supernet maximum and the choices it bounds; 0 (the default) takes the largest choice
MAXIMA = {"max_embed_dim": "embed_dims", "max_depth": "depths", "max_heads": "num_heads", "max_mlp_ratio": "mlp_ratios"}
MAX_CHOICES = 1024  # per list: far above any space anyone searches, far below a list that stalls sampling
MAX_DEPTH = 1024  # layers: ViTs run to ~50; a deeper "space" is a typo, and its subnet count a number too long to print
MAX_SIZE = 2**31 - 1  # any one number (a width, a size, a ratio): what a tensor dimension can hold in int32
FLOAT32_BYTES = 4


def check_definition(space: SearchSpace) -> None:
    """Refuse (HwawareError naming the field and the limit) a space that could not be built or would not fit
    this machine's memory, and normalise the rest: choices sorted and unique, maxima at least the choices."""
    if not isinstance(space.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}", space.name):
        raise HwawareError(f"space: name {excerpt(space.name)} is not a plain name (letters, digits, . _ + -); "
                           "it names table and export files")
    where = f"space {space.name}"
    for name, kind in CHOICE_LISTS.items():
        values = getattr(space, name)
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise HwawareError(f"{where}: {name} must be a list of numbers, got {excerpt(values)}")
        values = tuple(values)
        if not values:
            raise HwawareError(f"{where}: {name} needs at least one choice")
        if len(values) > MAX_CHOICES:
            raise HwawareError(f"{where}: {name} has {len(values)} choices, over the limit of {MAX_CHOICES}")
        cast = tuple(_positive(v, f"{name}[{i}]", kind, where) for i, v in enumerate(values))
        object.__setattr__(space, name, tuple(sorted(set(cast))))
    for name in POSITIVE_INTS:
        object.__setattr__(space, name, _positive(getattr(space, name), name, int, where))
    for name, choices in MAXIMA.items():
        kind, value = CHOICE_LISTS[choices], getattr(space, name)
        declared = 0 if value in (0, None) else _positive(value, name, kind, where)
        object.__setattr__(space, name, kind(max(declared, max(getattr(space, choices)))))
    if space.max_depth > MAX_DEPTH:
        raise HwawareError(f"{where}: depth {space.max_depth} is over the limit of {MAX_DEPTH} layers")
    if space.img_size % space.patch_size:
        raise HwawareError(f"{where}: img_size {space.img_size} is not a multiple of patch_size {space.patch_size}")
    if int(min(space.embed_dims) * min(space.mlp_ratios)) < 1:
        raise HwawareError(f"{where}: embed_dim {min(space.embed_dims)} with mlp_ratio {min(space.mlp_ratios):g} "
                           "gives an MLP with no hidden units")
    space._check_compute_fields()
    need, limit = largest_model_bytes(space), memory_limit_bytes()
    if limit is not None and need > limit:
        raise HwawareError(f"{where}: its largest subnet needs about {_gib(need)} (float32 weights plus the "
                           f"activations of one image), more than this machine's {_gib(limit)} of memory")


def _positive(value: Any, field: str, kind: type, where: str) -> int | float:
    """`value` as a positive int (a whole number) or a positive finite float up to MAX_SIZE, else one line
    naming `field`."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value))
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not (whole if kind is int else finite):
        what = "a positive integer" if kind is int else "a positive number"
        raise HwawareError(f"{where}: {field} must be {what}, got {excerpt(value)}")
    if value <= 0:
        raise HwawareError(f"{where}: {field} must be positive, got {excerpt(value)}")
    if value > MAX_SIZE:
        raise HwawareError(f"{where}: {field} = {excerpt(value)} is over the limit of {MAX_SIZE:,}")
    return kind(value)


def largest_model_bytes(space: SearchSpace, batch_size: int = 1) -> int:
    """Bytes the supernet's float32 weights (sized to the maxima) plus the activations a training step keeps
    for `batch_size` images through the largest subnet take: an estimate, exact to within a small factor."""
    dim, depth, hidden = space.max_embed_dim, space.max_depth, space.max_mlp_hidden
    attn, tokens = space.max_heads * space.head_dim, space.num_tokens
    per_block = 4 * dim + 3 * dim * attn + 3 * attn + attn * dim + dim + 2 * dim * hidden + hidden + dim
    activations = tokens * (6 * dim + 5 * attn + 2 * hidden) + 2 * space.max_heads * tokens**2
    if space.relative_position:  # k and v: two tables each, int64 index buffers, and a gathered vector per pair
        per_block += 4 * (2 * space.max_relative_position + 2) * space.head_dim + 8 * tokens**2
        activations += 2 * tokens**2 * space.head_dim
    weights = (space.in_chans * space.patch_size**2 * dim + dim + (tokens + 1) * dim + depth * per_block
               + 2 * dim + dim * space.num_classes + space.num_classes)
    activations = depth * activations
    return FLOAT32_BYTES * (weights + batch_size * (activations + space.in_chans * space.img_size**2))


@functools.cache
def memory_limit_bytes() -> int | None:
    """The memory this process may use: the machine's physical memory, or its container's (cgroup v2) limit
    where that is lower; None where the OS says neither. No space may need more."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:  # "max" when unlimited
            text = f.read(64).strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits) if limits else None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**30:.2e} GiB"


GLOBAL_POOLS = ("token", "avg")
QKV_LAYOUTS = ("timm", "autoformer")
# hwaware's original computation: timm's ViT (class-token pooling, eps 1e-6, q/k/v stacked as blocks).
TIMM_COMPUTE = {"relative_position": False, "max_relative_position": 14, "global_pool": "token", "norm_eps": 1e-6,
                "qkv_layout": "timm"}
# What AutoFormer's README trains and evaluates with (--gp --change_qkv --relative_position): relative position
# encoding on top of the absolute one, mean of the normed patch tokens, torch's LayerNorm eps, and its qkv
# layout (weight rows interleaved q/k/v, bias a contiguous prefix).
AUTOFORMER_COMPUTE = {"relative_position": True, "max_relative_position": 14, "global_pool": "avg", "norm_eps": 1e-5,
                      "qkv_layout": "autoformer"}


def _from_autoformer(data: dict, source: str) -> SearchSpace:
    choices = data["SEARCH_SPACE"]
    supernet = data.get("SUPERNET") or {}
    if not isinstance(choices, dict) or not isinstance(supernet, dict):
        raise HwawareError(f"{source}: SEARCH_SPACE and SUPERNET must be mappings")
    for name in ("EMBED_DIM", "DEPTH", "NUM_HEADS", "MLP_RATIO"):
        if name not in choices:
            raise HwawareError(f"{source}: SEARCH_SPACE is missing {name}")
        _require_list(choices, name, f"{source}: SEARCH_SPACE")
    return _build(
        source,
        name=Path(source).stem,
        embed_dims=tuple(choices["EMBED_DIM"]),
        depths=tuple(choices["DEPTH"]),
        num_heads=tuple(choices["NUM_HEADS"]),
        mlp_ratios=tuple(choices["MLP_RATIO"]),
        max_embed_dim=supernet.get("EMBED_DIM", 0),
        max_depth=supernet.get("DEPTH", 0),
        max_heads=supernet.get("NUM_HEADS", 0),
        max_mlp_ratio=supernet.get("MLP_RATIO", 0.0),
        **AUTOFORMER_COMPUTE,
    )


def _build(source: str, **fields: Any) -> SearchSpace:
    """SearchSpace(**fields), its refusal prefixed with where the fields came from (a file, a checkpoint)."""
    try:
        return SearchSpace(**fields)
    except HwawareError as exc:
        raise HwawareError(f"{source}: {exc}" if source != "space" else str(exc)) from None


def _median(values: Sequence):
    return sorted(values)[(len(values) - 1) // 2]


def _require_int(data: dict, key: str, source: str) -> int:
    if key not in data:
        raise HwawareError(f"{source}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise HwawareError(f"{source}: {key} must be an integer, got {excerpt(value)}")
    return int(value)


def _require_list(data: dict, key: str, source: str) -> list:
    if key not in data:
        raise HwawareError(f"{source}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise HwawareError(f"{source}: {key} must be a non-empty list, got {excerpt(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise HwawareError(f"{source}: {key} must hold numbers, got {excerpt(v)}")
    return list(value)


CONFIG_DIR = Path(__file__).parent / "configs"
# AutoFormer's released subnets (microsoft/Cream, AutoFormer/experiments/subnet), shipped as they are: each file
# holds the supernet maxima, the search space and the released architecture (RETRAIN).
AUTOFORMER_CONFIGS = {"autoformer-t": "AutoFormer-T.yaml", "autoformer-s": "AutoFormer-S.yaml",
                      "autoformer-b": "AutoFormer-B.yaml"}


def _builtin_spaces() -> dict[str, SearchSpace]:
    """AutoFormer's three spaces, read from their released configs, then every `configs/spaces/*.yaml`.

    `autoformer-t/s/b` compute as AutoFormer does, so its released checkpoints import exactly;
    `autoformer-t/s/b-timm` are the same choices computed as a plain timm ViT (hwaware's original).
    """
    spaces = {}
    for name, file in AUTOFORMER_CONFIGS.items():
        spaces[name] = dataclasses.replace(load_space(CONFIG_DIR / "autoformer" / file), name=name)
    for name in AUTOFORMER_CONFIGS:
        spaces[f"{name}-timm"] = dataclasses.replace(spaces[name], name=f"{name}-timm", **TIMM_COMPUTE)
    for path in sorted((CONFIG_DIR / "spaces").glob("*.yaml")):
        spaces[path.stem] = load_space(path)
    return spaces


def released_arch(space: SearchSpace) -> Arch:
    """The subnet AutoFormer released for one of its spaces (AutoFormer-T for autoformer-t, ...)."""
    family = space.name.removesuffix("-timm")
    if family not in AUTOFORMER_CONFIGS:
        raise HwawareError(f"arch: space {space.name!r} has no released subnet (only {', '.join(AUTOFORMER_CONFIGS)})")
    return load_arch(CONFIG_DIR / "autoformer" / AUTOFORMER_CONFIGS[family], space)


def get_space(name_or_path: str | SearchSpace) -> SearchSpace:
    """A built-in space by name, or a YAML file in hwaware's or AutoFormer's format."""
    if isinstance(name_or_path, SearchSpace):
        return name_or_path
    if name_or_path in BUILTIN_SPACES:
        return BUILTIN_SPACES[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        return load_space(path)
    raise HwawareError(f"unknown space {name_or_path!r}; built-in spaces: {', '.join(BUILTIN_SPACES)}")


def load_space(path: str | Path) -> SearchSpace:
    return SearchSpace.from_dict(_read_yaml(path), source=str(path))


def load_arch(path: str | Path, space: SearchSpace | None = None) -> Arch:
    """An Arch from hwaware YAML/JSON or from AutoFormer's `RETRAIN` block; validated if `space` is given."""
    data = _read_yaml(path)
    if isinstance(data, dict) and "RETRAIN" in data:
        arch = Arch.from_dict(data["RETRAIN"], source=f"{path}: RETRAIN")
    elif isinstance(data, dict) and isinstance(data.get("arch"), dict):
        arch = Arch.from_dict(data["arch"], source=f"{path}: arch")
    else:
        arch = Arch.from_dict(data, source=str(path))
    return space.validate(arch) if space is not None else arch


def resolve_arch(spec: str, space: SearchSpace) -> Arch:
    """`largest`, `smallest`, `middle`, `released` (AutoFormer's own subnet of its spaces), or a path to an
    Arch file, validated against `space`."""
    named = {"largest": space.largest, "smallest": space.smallest, "middle": space.middle,
             "released": lambda: released_arch(space)}
    if spec in named:
        return named[spec]()
    return load_arch(spec, space)


def save_arch(arch: Arch, path: str | Path, **extra: Any) -> None:
    """Write an Arch as YAML atomically; `extra` keys (space, metrics) are kept beside it."""
    from hwaware.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump({**extra, "arch": arch.to_dict()}, sort_keys=False))


def _read_yaml(path: str | Path) -> Any:
    """A small YAML file (space, Arch, recipe): FIFOs, devices and files over 1 MiB are refused unread."""
    from hwaware.io import read_yaml

    return read_yaml(path, "yaml")


BUILTIN_SPACES: dict[str, SearchSpace] = _builtin_spaces()
