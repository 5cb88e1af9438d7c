"""`hwaware space list|show` and `hwaware cost`: spaces and the params/FLOPs of an Arch (no torch until needed)."""

from __future__ import annotations

import argparse
import json


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def fmt_subnets(n: int) -> str:
    """A subnet count of any size: exact with separators, or a power of ten once past a float's range."""
    if n < 10**15:
        return f"{n:,}"
    exponent = n.bit_length() * 0.30103  # log10(2): a 6,000-digit count has no float and no str (CPython's limit)
    return f"about 10^{exponent:.0f}"


def cmd_space_list(args: argparse.Namespace) -> None:
    from hwaware.space import BUILTIN_SPACES

    for name, space in BUILTIN_SPACES.items():
        print(f"{name:14s} {space.img_size}px patch {space.patch_size}, {space.num_classes} classes, "
              f"{space.num_subnets():.3g} subnets")


def cmd_space_show(args: argparse.Namespace) -> None:
    from hwaware.space import get_space

    space = get_space(args.space)
    from hwaware.costs import arch_cost

    small, large = arch_cost(space.smallest(), space), arch_cost(space.largest(), space)
    subnets = space.num_subnets()
    info = {
        "name": space.name,
        "embed_dims": list(space.embed_dims),
        "depths": list(space.depths),
        "num_heads": list(space.num_heads),
        "mlp_ratios": list(space.mlp_ratios),
        "head_dim": space.head_dim,
        "image": f"{space.in_chans}x{space.img_size}x{space.img_size}, patch {space.patch_size} ({space.num_tokens} tokens)",
        "num_classes": space.num_classes,
        "supernet_maxima": {"embed_dim": space.max_embed_dim, "depth": space.max_depth,
                            "num_heads": space.max_heads, "mlp_ratio": space.max_mlp_ratio},
        "computes": space.compute_settings(),
        "num_subnets": subnets if subnets < 10**4000 else fmt_subnets(subnets),  # JSON's ints end at 4,300 digits
        "params": [small.params, large.params],
        "flops": [small.flops, large.flops],
    }
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if key in ("params", "flops"):
            value = f"{fmt_count(value[0])} .. {fmt_count(value[1])} (smallest .. largest)"
        elif key == "num_subnets":
            value = fmt_subnets(value)
        print(f"{key:16s} {value}")


# ---- hwaware cost -----------------------------------------------------------------------------


def cmd_cost(args: argparse.Namespace) -> None:
    from hwaware.space import get_space, resolve_arch

    space = get_space(args.space)
    arch = resolve_arch(args.arch, space)  # bad input is refused before torch loads
    from hwaware.costs import arch_cost, cost_breakdown

    total = arch_cost(arch, space)
    parts = cost_breakdown(arch, space)
    if args.json:
        print(json.dumps({"space": space.name, "arch": arch.to_dict(), "params": total.params,
                          "flops": total.flops, "breakdown": parts}))
        return
    print(f"arch    {arch.short()}")
    print(f"params  {total.params:,} ({fmt_count(total.params)})")
    print(f"flops   {total.flops:,} ({fmt_count(total.flops)} multiply-adds per image)")
    for name, part in parts.items():
        print(f"  {name:10s} params {fmt_count(part['params']):>8s}  flops {fmt_count(part['flops']):>8s}")


def register(sub) -> None:
    space = sub.add_parser("space", help="list or show search spaces")
    space_sub = space.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    space_sub.add_parser("list", help="the built-in spaces").set_defaults(func=cmd_space_list)
    show = space_sub.add_parser("show", help="choices, number of subnets, params/FLOPs range")
    show.add_argument("space", help="built-in name or YAML file (hwaware or AutoFormer format)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_space_show)

    cost = sub.add_parser("cost", help="params and FLOPs of an Arch (fvcore, 1 FLOP = 1 multiply-add)")
    cost.add_argument("--space", required=True, help="built-in name or YAML file")
    cost.add_argument("--arch", required=True, help="largest, smallest, middle, or an Arch YAML (AutoFormer's RETRAIN too)")
    cost.add_argument("--json", action="store_true", help="print one JSON object with absolute counts")
    cost.set_defaults(func=cmd_cost)
