"""INT8 against fp32 under ONNX Runtime on this CPU, one thread, batch 1, measured side by side in one run.

The model is written by `hwaware.export.export_onnx` and quantized by `hwaware.quantize.quantize_onnx`
(the files `hwaware export --precision int8` ships), statically (Q/DQ, the default) and dynamically.
The three sessions are timed interleaved by the profiling protocol (`time_interleaved`), so load
from elsewhere falls on all alike; several rounds, each giving a ratio, and the median ratio is
reported with its range. Random weights and random calibration images: the Q/DQ placement, not
the weight or scale values, decides the speed. Also prints the share of fp32 time spent in each
ONNX op type, since ops left in fp32 bound what quantizing the matmuls can gain.

    python benchmarks/int8_latency.py [--space autoformer-t] [--arch middle] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from hwaware.export import export_onnx
from hwaware.latency.backends import OnnxRuntimeBackend
from hwaware.latency.devices import MeasureSettings
from hwaware.latency.protocol import time_interleaved
from hwaware.quantize import onnx_session, quantize_onnx
from hwaware.space import get_space, resolve_arch
from hwaware.vit import build_vit


def op_shares(onnx_path: Path, example: np.ndarray, runs: int = 5) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per op type (its own profiler, one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = 1, True
    options.profile_file_prefix = str(onnx_path.with_suffix(""))
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {session.get_inputs()[0].name: example})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values())
    return {op: round(t / whole, 3) for op, t in totals.most_common(5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="autoformer-t")
    parser.add_argument("--arch", default="middle")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    space = get_space(args.space)
    arch = resolve_arch(args.arch, space)
    model = build_vit(arch, space).eval()
    images = torch.randn(8, space.in_chans, space.img_size, space.img_size)
    settings = MeasureSettings(warmup=3, min_repeats=10, min_time_s=1.0, threads=1)
    backend = OnnxRuntimeBackend("cpu", "fp32", threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "model.onnx"}
        export_onnx(model, space, paths["fp32"])
        for mode in ("static", "dynamic"):
            paths[f"int8 {mode}"] = Path(tmp) / f"model.int8.{mode}.onnx"
            quantize_onnx(paths["fp32"], paths[f"int8 {mode}"], "int8", mode, calibration=images)
        example = images[:1]
        reference = onnx_session(paths["fp32"]).run(None, {"input": example.numpy()})[0]
        runners = [backend.prepare_onnx(p, example) for p in paths.values()]
        rounds = [time_interleaved(runners, settings) for _ in range(args.rounds)]
        print(f"{args.space} {arch.short()}, batch 1, 1 thread, {args.rounds} rounds of interleaved timing")
        for i, (name, path) in enumerate(paths.items()):
            medians = [r[i].median_ms for r in rounds]
            ratios = [r[i].median_ms / r[0].median_ms for r in rounds]
            out = onnx_session(path).run(None, {"input": example.numpy()})[0]
            cosine = float((out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference))
            print(f"  {name:13s} median {statistics.median(medians):8.2f} ms   ratio to fp32 "
                  f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})   "
                  f"output cosine {cosine:.4f}")
        print(f"  fp32 time by op: {op_shares(paths['fp32'], example.numpy())}")


if __name__ == "__main__":
    main()
