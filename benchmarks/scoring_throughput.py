"""Scoring throughput (img/s) of an autoformer-t subnet: fp32 against autocast, side by side in one run.

What is timed is the scorer's inner step on decoded images, as a search sees it once its cache holds
the scoring set: a uint8 batch at 224 px normalised on the device, the supernet's forward under the
precision's autocast, top-1/top-5 counted (`hwaware.evaluation._tally`). On the CPU fp32 and bf16
autocast are timed in interleaved rounds (so both see the same machine load) and the median of the
per-round ratios is printed; on CUDA (where present) fp32, fp16 and, on compute capability 8.0+, bf16.

    .venv/bin/python benchmarks/scoring_throughput.py                       # CPU, batch 8, 1 thread
    .venv/bin/python benchmarks/scoring_throughput.py --threads 2 --rounds 8
    .venv/bin/python benchmarks/scoring_throughput.py --cuda-only --batch 256  # on a GPU node
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hwaware.evaluation import _tally, autocast_dtype
from hwaware.space import get_space, resolve_arch
from hwaware.supernet import SuperViT

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timer(model, arch, batch: int, device: torch.device, precision: str, batches: int):
    space = model.space
    images = torch.randint(0, 256, (batch, space.in_chans, space.img_size, space.img_size), dtype=torch.uint8)
    data = [(images, torch.randint(space.num_classes, (batch,)))] * batches
    normalize = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    dtype = autocast_dtype(device, precision)

    @torch.no_grad()
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        totals = _tally(model, arch, data, device, dtype, normalize)
        float(totals[3])  # waits for the device
        return batch * batches / (time.perf_counter() - start)

    return run


def measure(precisions: list[str], device: torch.device, batch: int, batches: int, rounds: int, arch_spec: str):
    space = get_space("autoformer-t")
    arch = resolve_arch(arch_spec, space)
    torch.manual_seed(0)
    model = SuperViT(space).eval().to(device)
    timers = {p: _timer(model, arch, batch, device, p, batches) for p in precisions}
    for timer in timers.values():  # warm-up: allocator, autocast caches, cuDNN/oneDNN kernel choice
        timer()
    rates: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(rounds):
        for p in precisions if r % 2 == 0 else precisions[::-1]:  # alternate the order between rounds
            rates[p].append(timers[p]())
    return arch, rates


def report(device_name: str, arch, batch: int, rates: dict[str, list[float]]) -> None:
    base = rates["fp32"]
    for precision, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"{device_name:28s} {arch.short():36s} b{batch:<4d} {precision:5s} {statistics.median(values):9.1f} img/s"
              f"  (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})  x{ratio:.2f} of fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="middle", help="largest, smallest, middle or an Arch YAML")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8 on CPU)")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per precision")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); the machine may be shared, so "
          "read the ratios (interleaved) more than the absolute rates")
    if not args.cuda_only:
        arch, rates = measure(["fp32", "bf16"], torch.device("cpu"), args.batch, args.batches, args.rounds, args.arch)
        report("cpu", arch, args.batch, rates)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.get_device_capability(device) >= (8, 0) else [])
        batch = max(args.batch, 256) if not args.cuda_only else args.batch
        arch, rates = measure(precisions, device, batch, args.batches, args.rounds, args.arch)
        report(torch.cuda.get_device_name(device), arch, batch, rates)
        auto = autocast_dtype(device, "auto")
        print(f"--score-precision auto picks {str(auto).removeprefix('torch.')} on this GPU")
    else:
        print("no CUDA device here: GPU rows skipped")


if __name__ == "__main__":
    main()
