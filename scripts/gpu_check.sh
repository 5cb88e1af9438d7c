#!/usr/bin/env bash
# Every GPU path of hwaware on one CUDA machine, in about 8 minutes:
#   1. the gpu-marked latency tests (torch fp16/bf16 with CUDA events; TensorRT if installed),
#   2. H200 tables for autoformer-t with the torch backend, fp16 and bf16, batch 1 and 64,
#   3. onnxruntime fp16 batch 1 through the CUDA execution provider if this onnxruntime has it,
#   4. TensorRT fp16 batch 1 if tensorrt is installed,
#   5. CUDA training with AMP, fp16 export (TensorRT where installed) and bench of digits and autoformer-t,
#   (issue 19) the TensorRT-path tests and a torch table timed from CUDA graph replays beside the eager one,
#   6. quantized TensorRT: the gpu-marked quantize tests (int8 and, on compute capability 8.9+, fp8 engines
#      from Q/DQ ONNX), an int8 (and fp8) export of autoformer-t (relative position encoding) with TensorRT,
#      and an int8 TensorRT latency table,
#   7. GPU scoring: evaluate and a 100-subnet search of autoformer-t on a 224 px ImageFolder, scored on the GPU
#      with autocast, and benchmarks/scoring_throughput.py,
#   8. the GPU estimate (fitted on public GPU data) checked against a torch table measured on this GPU.
# Tables go to $OUT/latency_tables (or ./latency_tables); each step is resumable, so a rerun
# after a timeout continues where it stopped. Settings are shortened for the time box and
# recorded in each sidecar.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TABLES=${OUT:-.}/latency_tables
mkdir -p "$TABLES"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-480} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
QUICK=(--min-repeats 50 --min-time 0.2 --warmup 10 --fit-subnets 10 --holdout-subnets 30 --quiet)

"$PY" - <<'PYEOF'
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers())
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except ImportError:
    print("tensorrt: not installed")
PYEOF
"$PY" -m pip install -q -e . --no-deps 2>/dev/null || true

run() {  # run LABEL CMD...: within the time left, report status
  local label=$1; shift
  local budget; budget=$(left)
  if [ "$budget" -le 20 ]; then echo "SKIP $label (out of time)"; return; fi
  echo "== $label (${budget}s left)"
  timeout "$budget" "$@"; echo "== $label: exit $?"
}

run "gpu tests" "$PY" -m pytest tests/test_latency.py -m gpu -q -p no:cacheprovider
DEVICE=$("$PY" - <<'PYEOF'
from hwaware.errors import HwawareError
from hwaware.latency.devices import find_present, list_profiles, load_device_profile
for name in list_profiles():
    profile = load_device_profile(name)
    if profile.kind == "cuda":
        try:
            find_present(profile)
            print(name)
            break
        except HwawareError:
            pass
PYEOF
)
DEVICE=${DEVICE:-h200}
echo "device profile: $DEVICE"
for precision in fp16 bf16; do
  for batch in 1 64; do
    run "torch $precision b$batch" "$PY" -m hwaware.cli profile --device "$DEVICE" --space autoformer-t \
      --backend torch --precision "$precision" --batch "$batch" --out "$TABLES" "${QUICK[@]}"
  done
done
# ---- The TensorRT path on a CUDA machine without TensorRT (issue 19) ----------------------------------------
# The torch backend timed eagerly (the fp16 b1 table above) and from replays of a captured CUDA graph (this table,
# in its own folder: the setting is in its sidecar, not in its name); the gpu-marked TensorRT tests, which skip
# with their reason where TensorRT is missing; the conformance test against the real bindings where cached.
run "tensorrt-path gpu tests" "$PY" -m pytest tests/test_tensorrt.py -m gpu -q -p no:cacheprovider -rs
run "tensorrt-path tests (stand-in tensorrt, real bindings)" "$PY" -m pytest tests/test_tensorrt.py \
  tests/test_tensorrt_conformance.py -q -p no:cacheprovider -rs
run "torch fp16 b1 cuda graph" "$PY" -m hwaware.cli profile --device "$DEVICE" --space autoformer-t \
  --backend torch --precision fp16 --batch 1 --cuda-graph --out "$TABLES/cuda-graph" "${QUICK[@]}"
"$PY" - "$TABLES" <<'PYEOF'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
for eager in sorted(root.glob("*-torch-fp16-autoformer-t-b1.json")):
    graph = root / "cuda-graph" / eager.name
    if graph.is_file():
        a, b = (json.loads(p.read_text()) for p in (eager, graph))
        largest = lambda m: max(s["measured_ms"] for s in m["subnets"])
        smallest = lambda m: min(s["measured_ms"] for s in m["subnets"])
        print(f"torch fp16 b1 subnets, eager vs CUDA graph: fastest {smallest(a):.3f} vs {smallest(b):.3f} ms, "
              f"slowest {largest(a):.3f} vs {largest(b):.3f} ms (cuda_graph={b['settings'].get('cuda_graph')})")
PYEOF
"$PY" -c "from hwaware.tensorrt_build import tensorrt_unavailable_reason as r; print('SKIP tensorrt plan bench and '
'trtexec check:', r()) if r() else print('tensorrt present: the sections below build, audit and bench engines')"
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  run "onnxruntime fp16 b1" "$PY" -m hwaware.cli profile --device "$DEVICE" --space autoformer-t \
    --backend onnxruntime --precision fp16 --batch 1 --out "$TABLES" "${QUICK[@]}"
else
  echo "SKIP onnxruntime on CUDA: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
fi
if "$PY" -c "import tensorrt" 2>/dev/null; then
  run "tensorrt fp16 b1" "$PY" -m hwaware.cli profile --device "$DEVICE" --space autoformer-t \
    --backend tensorrt --precision fp16 --batch 1 --out "$TABLES" "${QUICK[@]}"
else
  echo "SKIP tensorrt: not installed (pip install tensorrt)"
fi
# Export and bench on the GPU (issue 6): a supernet trained briefly on CUDA with mixed precision
# (digits, and autoformer-t on synthetic images: the weights only need to be real tensors),
# exported as timm + ONNX (+ TensorRT where installed) + Triton in fp16, then timed with the
# torch backend and, where the table exists, compared with its prediction.
RUNS=${RUNS:-/tmp/hwaware-gpu-runs}  # checkpoints are too big to bring back; the tables in $OUT are what matter
mkdir -p "$RUNS"
run "train digits (cuda, amp)" "$PY" -m hwaware.cli train --space digits --data digits --out "$RUNS/digits" \
  --epochs 3 --device cuda --quiet
run "train autoformer-t (cuda, amp, synthetic)" "$PY" -m hwaware.cli train --space autoformer-t --data synthetic \
  --recipe digits --out "$RUNS/t" --epochs 1 --batch-size 64 --device cuda --quiet
FORMATS=timm,onnx,triton
"$PY" -c "import tensorrt" 2>/dev/null && FORMATS=timm,onnx,tensorrt,triton
for space in digits t; do
  run "export $space fp16" "$PY" -m hwaware.cli export --checkpoint "$RUNS/$space/last.pt" --arch middle \
    --format "$FORMATS" --precision fp16 --batch-sizes 1,8,64 --out "$RUNS/export-$space" --tables "$TABLES" --force
  run "bench $space torch b1" "$PY" -m hwaware.cli bench "$RUNS/export-$space" --device "$DEVICE" --backend torch \
    --batch 1 --tables "$TABLES"
done
run "bench t onnxruntime b1" "$PY" -m hwaware.cli bench "$RUNS/export-t" --device "$DEVICE" --backend onnxruntime \
  --batch 1 --tables "$TABLES"
# 6. Quantized TensorRT: explicit Q/DQ int8 everywhere, fp8 where the GPU has it (refused in one line elsewhere).
run "quantize gpu tests" "$PY" -m pytest tests/test_quantize.py -m gpu -q -p no:cacheprovider
if "$PY" -c "import tensorrt" 2>/dev/null; then
  for precision in int8 fp8; do  # autoformer-t computes with relative position encoding: its TensorRT path too
    run "export t $precision tensorrt" "$PY" -m hwaware.cli export --checkpoint "$RUNS/t/last.pt" --arch middle \
      --format onnx,tensorrt,triton --precision "$precision" --quantize-mode static --calibration-images 128 \
      --batch-sizes 1,8,64 --out "$RUNS/export-t-$precision" --tables "$TABLES" --force
  done
  run "tensorrt int8 b1 table" "$PY" -m hwaware.cli profile --device "$DEVICE" --space autoformer-t \
    --backend tensorrt --precision int8 --batch 1 --out "$TABLES" "${QUICK[@]}"
else
  echo "SKIP quantized tensorrt: not installed (pip install tensorrt)"
fi
# 7. Scoring on the GPU (issue 16): a 224 px ImageFolder of 1000 classes x 3 JPEGs (ImageNet-shaped), the
#    autoformer-t checkpoint above evaluated and searched (100 subnets on 2,000 images, bf16/fp16 autocast) on
#    the GPU, and the scoring benchmark (fp32 / fp16 / bf16 img/s of the cached-scoring step).
FOLDER=$RUNS/imagenet-shaped
run "write a 224 px folder" "$PY" - "$FOLDER" <<'PYEOF'
import sys, pathlib, numpy as np
from PIL import Image
root, rng = pathlib.Path(sys.argv[1]), np.random.default_rng(0)
for split, per_class in (("train", 1), ("val", 3)):
    for c in range(1000):
        folder = root / split / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if not (folder / f"{i}.jpg").exists():
                Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
PYEOF
run "evaluate t on the gpu" "$PY" -m hwaware.cli evaluate --checkpoint "$RUNS/t/last.pt" --arch middle \
  --data "imagefolder:$FOLDER" --compute-device cuda
START=$(date +%s)
run "search t scored on the gpu" "$PY" -m hwaware.cli search --checkpoint "$RUNS/t/last.pt" --data "imagefolder:$FOLDER" \
  --flops-g 2 --population 20 --generations 4 --parents 5 --mutation-children 8 --crossover-children 7 \
  --score-images 2000 --compute-device cuda --out "$RUNS/search-t-gpu" --quiet
echo "search: $(( $(date +%s) - START )) s for 100 subnets x 2000 images (incl. start-up, decoding, held-out)"
run "scoring throughput" "$PY" benchmarks/scoring_throughput.py --cuda-only --batch 256 --batches 4 --rounds 4
# (issue 19, continued) Where TensorRT is installed: bench the fp16 plan the export shipped (loaded, never rebuilt)
# and print the trtexec command its card carries, so the same engine can be checked with NVIDIA's tool.
if "$PY" -c "import tensorrt" 2>/dev/null && [ -f "$RUNS/export-t/model.plan" ]; then
  run "bench t tensorrt plan b1" "$PY" -m hwaware.cli bench "$RUNS/export-t" --device "$DEVICE" --backend tensorrt \
    --precision fp16 --batch 1 --tables "$TABLES"
  "$PY" -c "import json, sys; t = json.load(open(sys.argv[1]))['tensorrt']; print('layer precisions:', \
t['layer_precisions']); print('trtexec:', t['trtexec'])" "$RUNS/export-t/card.json"
else
  echo "SKIP tensorrt plan bench: TensorRT is not installed or no model.plan was exported"
fi
# 8. The GPU estimate against this GPU (issue 18): a torch fp16 table of autoformer-t-timm (fused attention, as
#    timm's reference rows) at batch 256, inside the reference batches, measured here, then --estimate for the
#    same settings, which scores itself on the measured table's subnets (the sidecar's validation).
EST_ARGS=(--device "$DEVICE" --space autoformer-t-timm --backend torch --precision fp16 --batch 256 --out "$TABLES")
if [ ! -f "$TABLES/$DEVICE-torch-fp16-autoformer-t-timm-b256.csv" ]; then
  run "torch fp16 b256 autoformer-t-timm" "$PY" -m hwaware.cli profile "${EST_ARGS[@]}" "${QUICK[@]}"
fi
if [ -f "$TABLES/$DEVICE-torch-fp16-autoformer-t-timm-b256.csv" ]; then
  run "estimate vs measured (torch fp16 b256)" "$PY" -m hwaware.cli profile "${EST_ARGS[@]}" --estimate
else
  echo "SKIP estimate check: no measured torch table"
fi
"$PY" - "$TABLES" <<'PYEOF'
import json, sys, pathlib
for side in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    m = json.loads(side.read_text()); v = m.get("validation") or {}
    if v.get("n"):
        print(f"{side.stem}: n={v['n']} mape={100*v['mape']:.2f}% within5={100*v['within_5pct']:.0f}% "
              f"within10={100*v['within_10pct']:.0f}% tau={v['kendall_tau']:.3f}")
PYEOF
