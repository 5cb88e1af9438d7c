"""Images/s of a supernet training step (one subnet) against training the extracted timm model of that Arch.

Same batch, same optimizer (AdamW), forward + backward + step, timed in interleaved pairs so
both sides see the same machine load; prints the median of the per-pair ratios
(supernet img/s / timm img/s; 1.0 means weight entanglement costs nothing).

    .venv/bin/python benchmarks/train_throughput.py                 # digits b64 and autoformer-t b4
    .venv/bin/python benchmarks/train_throughput.py --space digits --batch 64 --pairs 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hwaware.space import get_space, resolve_arch
from hwaware.supernet import SuperViT


def _step_timer(model, forward, images, labels):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def measure(space_name: str, batch: int, pairs: int, arch_spec: str, warmup: int = 3) -> dict:
    space = get_space(space_name)
    arch = resolve_arch(arch_spec, space)
    torch.manual_seed(0)
    supernet = SuperViT(space).train()
    static = supernet.extract(arch).train()
    images = torch.randn(batch, space.in_chans, space.img_size, space.img_size)
    labels = torch.randint(space.num_classes, (batch,))
    super_step = _step_timer(supernet, lambda x: supernet(x, arch), images, labels)
    static_step = _step_timer(static, static, images, labels)
    for _ in range(warmup):
        super_step(), static_step()
    ratios, super_times, static_times = [], [], []
    for i in range(pairs):
        # alternate which side goes first so neither always inherits the other's cache state
        if i % 2:
            t_static, t_super = static_step(), super_step()
        else:
            t_super, t_static = super_step(), static_step()
        super_times.append(t_super)
        static_times.append(t_static)
        ratios.append(t_static / t_super)  # = supernet img/s / timm img/s
    return {
        "space": space_name, "arch": arch.short(), "batch": batch, "pairs": pairs,
        "supernet_img_s": batch / statistics.median(super_times), "timm_img_s": batch / statistics.median(static_times),
        "median_ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", action="append", help="space(s) to measure (default: digits and autoformer-t)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 for digits, 4 otherwise)")
    parser.add_argument("--pairs", type=int, default=20, help="interleaved timing pairs per space")
    parser.add_argument("--arch", default="middle", help="largest, smallest, middle or an Arch YAML")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); machine load is shared with other jobs")
    for name in args.space or ["digits", "autoformer-t"]:
        batch = args.batch or (64 if name == "digits" else 4)
        pairs = args.pairs if name == "digits" else max(args.pairs // 4, 3)
        r = measure(name, batch, pairs, args.arch)
        print(f"{r['space']:13s} {r['arch']:40s} b{r['batch']:<3d} supernet {r['supernet_img_s']:8.1f} img/s  "
              f"timm {r['timm_img_s']:8.1f} img/s  median ratio {r['median_ratio']:.3f} over {r['pairs']} pairs")


if __name__ == "__main__":
    main()
