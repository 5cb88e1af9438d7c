"""Latency of the exported ONNX model under ONNX Runtime against the same timm model in PyTorch eager, on this CPU.

For AutoFormer-T's released Arch and a digits Arch, at each batch size: the model is exported
with `hwaware.export.export_onnx` (the very file `hwaware export` ships), both runtimes get the
same thread count, and timings alternate (torch, ORT, ORT, torch, ...) so drift and other load
on the machine hit both alike. Each timing is the mean of enough calls to take ~50 ms; the
ratio is the median of per-pair ratios. Ratio < 1 means ONNX Runtime is faster. Random weights:
latency does not depend on their values.

    python benchmarks/export_latency.py [--pairs 15] [--threads 2] [--batches 1,32] [--digits-arch middle|FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from hwaware.export import export_onnx, parse_batch_sizes
from hwaware.space import BUILTIN_SPACES, released_arch, resolve_arch
from hwaware.supernet import SuperViT


def per_call_seconds(run, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def compare(label, space, arch, batch: int, pairs: int, threads: int, folder: Path) -> dict:
    torch.manual_seed(0)
    model = SuperViT(space).extract(arch).eval()
    path = folder / f"{space.name}-b{batch}.onnx"
    export_onnx(model, space, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, space.in_chans, space.img_size, space.img_size)
    feed = {"input": x.numpy()}

    def run_torch():
        with torch.inference_mode():
            return model(x)

    def run_ort():
        return session.run(["logits"], feed)[0]

    max_diff = float(np.abs(run_ort() - run_torch().numpy()).max())
    warm = min(per_call_seconds(run_torch, 2), per_call_seconds(run_ort, 2))
    calls = max(1, round(0.05 / warm))
    torch_t, ort_t, ratios = [], [], []
    for i in range(pairs):
        if i % 2:
            o, t = per_call_seconds(run_ort, calls), per_call_seconds(run_torch, calls)
        else:
            t, o = per_call_seconds(run_torch, calls), per_call_seconds(run_ort, calls)
        torch_t.append(t), ort_t.append(o), ratios.append(o / t)
    q = statistics.quantiles(ratios, n=4)
    return {
        "model": label, "batch": batch, "calls": calls, "torch_ms": 1e3 * statistics.median(torch_t),
        "ort_ms": 1e3 * statistics.median(ort_t), "ratio": statistics.median(ratios), "iqr": q[2] - q[0],
        "max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--digits-arch", default="middle", help="largest|smallest|middle or an Arch file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_space, d_space = BUILTIN_SPACES["autoformer-t"], BUILTIN_SPACES["digits"]
    models = [
        ("AutoFormer-T (released)", t_space, released_arch(t_space)),
        (f"digits {resolve_arch(args.digits_arch, d_space).short()}", d_space, resolve_arch(args.digits_arch, d_space)),
    ]
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, {args.pairs} pairs")
    print(f"{'model':<28} {'batch':>5} {'torch ms':>10} {'ORT ms':>10} {'ORT/torch':>9} {'IQR':>6} {'max|diff|':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for label, space, arch in models:
            for batch in parse_batch_sizes(args.batches):
                r = compare(label, space, arch, batch, args.pairs, args.threads, Path(folder))
                print(f"{r['model']:<28} {r['batch']:>5} {r['torch_ms']:>10.3f} {r['ort_ms']:>10.3f} "
                      f"{r['ratio']:>9.3f} {r['iqr']:>6.3f} {r['max_abs_diff']:>9.2g}", flush=True)


if __name__ == "__main__":
    main()
