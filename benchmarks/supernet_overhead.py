"""Forward+backward time of SuperViT running an Arch against the extracted timm model of that Arch.

Both run the same batch in the same process; runs alternate (supernet, timm, supernet, ...)
so drift hits both alike, and the ratio is the median of per-pair ratios.
Ratio 1.00 means weight entanglement costs nothing; the target is at most 1.05.

Cases: digits and autoformer-t-timm (plain timm ViT) on a sampled Arch, and autoformer-t (AutoFormer's
relative position encoding, average pooling, its qkv layout) on AutoFormer's released T at batch 8,
whose static twin is the timm ViT with hwaware's `RelPosAttention`.

    python benchmarks/supernet_overhead.py [--pairs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from hwaware.space import BUILTIN_SPACES, released_arch
from hwaware.supernet import SuperViT


def step_seconds(model, x, arch=None) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(x, arch) if arch is not None else model(x)
    out.float().logsumexp(-1).mean().backward()
    return time.perf_counter() - start


def compare(space_name: str, batch: int, pairs: int, seed: int = 0, released: bool = False) -> dict:
    space = BUILTIN_SPACES[space_name]
    torch.manual_seed(seed)
    supernet = SuperViT(space).train()
    arch = released_arch(space) if released else space.sample(random.Random(seed))
    static = supernet.extract(arch).train()
    x = torch.randn(batch, space.in_chans, space.img_size, space.img_size)
    for _ in range(3):  # warm-up both paths (allocator, oneDNN primitives)
        step_seconds(supernet, x, arch), step_seconds(static, x)
    ratios, super_t, static_t = [], [], []
    for i in range(pairs):
        # alternate which goes first so neither always follows the other
        if i % 2:
            s, t = step_seconds(supernet, x, arch), step_seconds(static, x)
        else:
            t, s = step_seconds(static, x), step_seconds(supernet, x, arch)
        super_t.append(s), static_t.append(t), ratios.append(s / t)
    return {
        "space": space_name, "arch": arch.short(), "batch": batch,
        "supernet_ms": 1e3 * statistics.median(super_t), "timm_ms": 1e3 * statistics.median(static_t),
        "ratio": statistics.median(ratios),
        "ratio_iqr": statistics.quantiles(ratios, n=4)[2] - statistics.quantiles(ratios, n=4)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, forward+backward, median of {args.pairs} interleaved pairs")
    print(f"{'space':18s} {'batch':>5s} {'supernet ms':>12s} {'timm ms':>9s} {'ratio':>6s} {'IQR':>6s}  arch")
    for space_name, batch, released in (("digits", 128, False), ("autoformer-t-timm", 2, False),
                                        ("autoformer-t", 8, True)):
        r = compare(space_name, batch, args.pairs, released=released)
        print(f"{r['space']:18s} {r['batch']:5d} {r['supernet_ms']:12.2f} {r['timm_ms']:9.2f} "
              f"{r['ratio']:6.3f} {r['ratio_iqr']:6.3f}  {r['arch']}")


if __name__ == "__main__":
    main()
