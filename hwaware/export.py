"""Export one Arch as artifacts a serving stack takes as they are: timm, ONNX, TensorRT, Triton.

Every artifact is checked against the PyTorch model it came from (ONNX Runtime and the
TensorRT engine are run on random and, when given, real inputs) and the differences go
into `card.json`. The output folder is built under a hidden temporary name beside the
target and renamed into place only when complete, so a failed or killed export never
leaves a half-written folder where a user (or Triton) would pick it up.

ONNX: opset 17 by default, the newest TensorRT 8.6 parses. With torch 2.14 both exporters
give the same timm ViT (fused attention decomposed to MatMul/Softmax, dynamic batch, outputs
within 1e-6 of PyTorch); the TorchScript one (`dynamo=False`, deprecated since torch 2.9 but
present) is the default because it writes opset 17 natively and takes ~0.6 s on a digits
model and ~2.5 s on AutoFormer-T on this 2-core machine, where the torch.export one
(`dynamo=True`) takes 5-15 s and 16-25 s and must convert down from opset 18. A traced
graph could bake the example batch in; running ONNX Runtime at every export batch size
catches that. `dynamo=True` stays one argument away for when the TorchScript one is gone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwaware.errors import HwawareError
from hwaware.io import as_user_file, atomic_write_text, loads_strict, read_json, read_text_file, utc_timestamp
from hwaware.onnx_writer import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, write_onnx
from hwaware.precision import EXPORT_PRECISIONS, Precision, check_mode, check_runs, get_precision
from hwaware.quantize import check_accuracy_drop, compare_accuracy, quantize_onnx, quantized_file_name
from hwaware.space import Arch, SearchSpace
from hwaware.tensorrt_build import DEFAULT_BATCH_SIZES

FORMATS = ("timm", "onnx", "tensorrt", "triton")
ONNX_FORMATS = frozenset({"onnx", "tensorrt", "triton"})  # formats built from the ONNX file
PRECISIONS = EXPORT_PRECISIONS
WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE, PLAN_FILE, CARD_FILE = (
    "model.safetensors", "config.json", "model.onnx", "model.plan", "card.json",
)
TIMING_CACHE_FILE = "timing.cache"
# Card fields export computes; `card_extra` / `update_card` may not overwrite them.
COMPUTED_CARD_FIELDS = frozenset({
    "name", "created", "hwaware_version", "space", "arch", "arch_short", "params", "flops", "precision",
    "batch_sizes", "formats", "onnx", "tensorrt", "triton", "warnings", "quantized",
})
# max |ONNX or TensorRT - PyTorch|, relative to the largest PyTorch logit (at least 1). The quantized
# bounds catch a broken graph; how much accuracy quantization costs is measured on labelled data.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.25, "fp8": 0.35}

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What `export_model` wrote: the folder, the formats in it, its card, and what was skipped and why."""

    out_dir: Path
    formats: tuple[str, ...]
    card: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# ---- argument parsing the CLI shares --------------------------------------------------------


def parse_formats(spec: str | Iterable[str]) -> tuple[str, ...]:
    """`"timm,onnx"` or an iterable of names -> a tuple in canonical order; unknown names are an error."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        what = f"unknown format {unknown[0]!r}" if unknown else "no format given"
        raise HwawareError(f"format: {what}; valid formats: {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in names)


def parse_batch_sizes(spec: str | Iterable[int]) -> tuple[int, ...]:
    """`"1,8,32"` or an iterable -> sorted unique positive ints."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        sizes = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise HwawareError(f"batch sizes: expected comma-separated integers, got {spec!r}") from None
    if not sizes or sizes[0] < 1:
        raise HwawareError(f"batch sizes: need at least one size, all >= 1, got {spec!r}")
    return tuple(sizes)


def _check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise HwawareError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)} for export")
    return get_precision(precision)


# ---- timm -----------------------------------------------------------------------------------


def save_timm(model: nn.Module, arch: Arch, space: SearchSpace, folder: str | Path,
              dtype: torch.dtype | None = None) -> None:
    """`model.safetensors` (the state dict, cast to `dtype` if given) and `config.json` (what `build_vit` needs)
    in `folder`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from hwaware.vit import vit_config

    folder = Path(folder)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    except SafetensorError as exc:  # safetensors reports I/O failures (a full disk) as its own error
        raise HwawareError(f"export: cannot write {folder / WEIGHTS_FILE} ({str(exc)[:160]})") from None
    as_user_file(folder / WEIGHTS_FILE)  # safetensors writes 0600: a Triton container of another user could not read it
    atomic_write_text(folder / CONFIG_FILE, json.dumps(vit_config(arch, space), indent=2) + "\n")


def read_model_config(path: str | Path) -> tuple[Arch, SearchSpace]:
    """The Arch and SearchSpace of an export folder (or its `config.json`)."""
    path = Path(path)
    config_path = path if path.name == CONFIG_FILE else path / CONFIG_FILE
    if not config_path.is_file():
        raise HwawareError(f"{config_path.parent}: no {CONFIG_FILE}; export with --format timm to get a loadable model")
    try:
        config = loads_strict(read_text_file(config_path, "model config"))
    except ValueError as exc:  # NaN and Infinity too: not JSON other tools read
        raise HwawareError(f"{config_path}: unreadable ({str(exc)[:120]})") from None
    if not isinstance(config, dict) or config.get("architecture") != "hwaware_vit":
        raise HwawareError(f"{config_path}: not an hwaware model config (architecture must be 'hwaware_vit')")
    space = SearchSpace.from_dict(config.get("space"), source=f"{config_path}: space")
    return space.validate(Arch.from_dict(config.get("arch"), source=f"{config_path}: arch")), space


def load_model(path: str | Path) -> nn.Module:
    """The timm `VisionTransformer` of an export folder (or its `config.json`), weights loaded, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from hwaware.vit import build_vit

    path = Path(path)
    folder = path.parent if path.name == CONFIG_FILE else path
    arch, space = read_model_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise HwawareError(f"{folder}: no {WEIGHTS_FILE}; export with --format timm to get a loadable model")
    model = build_vit(arch, space)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise HwawareError(f"{weights_path}: unreadable ({exc})") from None
    _load_exact(model, state, str(weights_path))
    return model.eval()


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise HwawareError(f"{source}: weights do not fit the config (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise HwawareError(
                f"{source}: {name} has shape {list(tensor.shape)}, the config needs {list(expected[name].shape)}"
            )
    model.load_state_dict(state)


def check_model_matches(model: nn.Module, arch: Arch, space: SearchSpace) -> None:
    """Raise unless `model` has exactly the parameter names and shapes `build_vit(arch, space)` has."""
    from hwaware.vit import build_vit

    with torch.device("meta"):
        reference = build_vit(arch, space).state_dict()
    actual = model.state_dict()
    for name, tensor in reference.items():
        if name not in actual or actual[name].shape != tensor.shape:
            got = list(actual[name].shape) if name in actual else "nothing"
            raise HwawareError(
                f"model: does not match arch {arch.short()}: {name} should be {list(tensor.shape)}, got {got}"
            )
    extra = sorted(set(actual) - set(reference))
    if extra:
        raise HwawareError(f"model: does not match arch {arch.short()}: unexpected parameter {extra[0]}")


# ---- ONNX -----------------------------------------------------------------------------------


_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype(precision: str) -> torch.dtype:
    """The torch dtype a precision's graph is written in (the registry's `graph_dtype`: fp32 for quantized ones)."""
    return _TORCH_DTYPES[get_precision(precision).graph_dtype]


def _serves_onnx(spec: Precision) -> bool:
    """Whether a backend that takes ONNX files runs this precision (bf16 runs with torch only)."""
    return any(backend in ("onnxruntime", "tensorrt") for backend, _ in spec.runs_on)


def export_onnx(
    model: nn.Module,
    space: SearchSpace,
    path: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
) -> None:
    """Write `model` as ONNX with input `input` [batch, C, H, W], output `logits` [batch, classes], dynamic batch.

    fp16 exports a half-precision graph (inputs and outputs fp16): what TensorRT 11's strongly
    typed networks and Triton's fp16 models need. `dynamo` picks the torch.export-based exporter
    over the TorchScript one (see the module doc). Checked with `onnx.checker` before returning.
    """
    import onnx

    spec = _check_precision(precision)
    if spec.quantized:
        raise HwawareError(f"onnx: {precision} is written as an fp32 graph and quantized (hwaware.quantize)")
    if not _serves_onnx(spec):
        raise HwawareError(f"onnx: {precision} runs only with {spec.where()}, which serves the timm weights; "
                           "no ONNX backend hwaware supports runs it")
    if opset < 17:
        raise HwawareError(f"opset: {opset} is too old; LayerNormalization needs opset 17 or later")
    dtype = _dtype(precision)
    static = copy.deepcopy(model).to("cpu", dtype).eval()
    # batch 2: torch.export specialises dimensions of size 0 and 1, so the example must not be 1
    example = torch.randn(2, space.in_chans, space.img_size, space.img_size, dtype=dtype)
    write_onnx(static, example, path, opset, dynamo)
    onnx.checker.check_model(str(path), full_check=True)
    written = onnx_opset(path)
    if written != opset:
        raise HwawareError(f"onnx: asked for opset {opset}, the exporter could only write opset {written}")


def _exporter_name(dynamo: bool) -> str:
    kind = "torch.export (dynamo=True)" if dynamo else "TorchScript (dynamo=False)"
    return f"torch.onnx {kind}, torch {torch.__version__}"


def onnx_opset(path: str | Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_io(path: str | Path) -> dict[str, dict[str, Any]]:
    """Name, shape (None for symbolic dims) and element type of the ONNX graph's input and output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        return {"name": value.name, "shape": dims, "elem_type": onnx.TensorProto.DataType.Name(tensor.elem_type)}

    inputs = [describe(v) for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise HwawareError(f"{path}: expected one input and one output")
    return {"input": inputs[0], "output": describe(graph.output[0])}


def onnx_runner(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function: images -> logits from ONNX Runtime (CPU), fed in the file's precision."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    half = "float16" in session.get_inputs()[0].type

    def run(images: torch.Tensor) -> torch.Tensor:
        feed = images.to(torch.float16 if half else torch.float32).numpy()
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: feed})[0])

    return run


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, precision: str) -> tuple[float, float]:
    """(max |got - want|, top-1 agreement); raises if the difference is beyond `precision`'s tolerance."""
    got, want = got.float().cpu(), want.float().cpu()
    diff = (got - want).abs().max().item()
    allowed = TOLERANCE[precision] * max(1.0, want.abs().max().item())
    if not diff <= allowed:  # `not <=` also catches NaN
        raise HwawareError(
            f"{what}: outputs differ from PyTorch by {diff:.3g} (allowed {allowed:.3g} for {precision}); "
            "the exported model is not the same model"
        )
    return diff, (got.argmax(-1) == want.argmax(-1)).float().mean().item()


def _batches_of(space: SearchSpace, batch_sizes: tuple[int, ...], real: torch.Tensor | None) -> list[torch.Tensor]:
    """One input per batch size: random images, or (for a quantized model, whose scales were calibrated on real
    images and clip what lies far outside them) real images repeated to each size."""
    if real is not None:
        return [real[torch.arange(b) % len(real)] for b in batch_sizes]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(b, space.in_chans, space.img_size, space.img_size, generator=generator) for b in batch_sizes]


def _verify(
    what: str,
    run: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    space: SearchSpace,
    batch_sizes: tuple[int, ...],
    sample_inputs: torch.Tensor | None,
    precision: str,
) -> dict[str, Any]:
    """Compare `run(images)` with the fp32 PyTorch model at every batch size (random images; real ones for a
    quantized precision) and on the real sample."""

    def check(images: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            return _compare(what, run(images), model(images), precision)

    real = sample_inputs if get_precision(precision).quantized else None
    key = "max_abs_diff_random" if real is None else "max_abs_diff_sample_batches"
    report: dict[str, Any] = {key: max(check(x)[0] for x in _batches_of(space, batch_sizes, real))}
    if sample_inputs is not None:
        diff, agreement = check(sample_inputs)
        report["max_abs_diff_sample"] = diff
        report["sample_top1_agreement"] = agreement
        report["sample_count"] = int(sample_inputs.shape[0])
    return report


# ---- Triton ---------------------------------------------------------------------------------

_TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16"}


def triton_config(
    name: str, platform: str, io: dict[str, dict[str, Any]], batch_sizes: tuple[int, ...], gpu_only: bool
) -> str:
    """A Triton `config.pbtxt`: batch dim left out of `dims` (implied by `max_batch_size`), dynamic batching on."""

    def tensor(kind: str, spec: dict[str, Any]) -> str:
        dims = ", ".join(str(d) for d in spec["shape"][1:])
        data_type = _TRITON_TYPES.get(spec["elem_type"])
        if data_type is None or None in spec["shape"][1:]:
            raise HwawareError(f"triton: cannot describe {kind} {spec['name']} ({spec['elem_type']}, {spec['shape']})")
        body = f'    name: "{spec["name"]}"\n    data_type: {data_type}\n    dims: [ {dims} ]\n'
        return f"{kind} [\n  {{\n{body}  }}\n]\n"

    preferred = [b for b in batch_sizes if b > 1]
    lines = [
        f'name: "{name}"\n',
        f'platform: "{platform}"\n',
        f"max_batch_size: {max(batch_sizes)}\n",
        tensor("input", io["input"]),
        tensor("output", io["output"]),
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else "")
        + "  max_queue_delay_microseconds: 100\n}\n",
    ]
    if gpu_only:
        lines.append("instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n")
    return "".join(lines)


def write_triton_model(
    repository: Path, name: str, artifact: Path, io: dict, batch_sizes: tuple[int, ...]
) -> Path:
    """`repository/name/config.pbtxt` and `repository/name/1/<artifact>`; the platform follows the artifact."""
    platform, gpu_only = {".onnx": ("onnxruntime_onnx", False), ".plan": ("tensorrt_plan", True)}[artifact.suffix]
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    # Triton loads model.onnx / model.plan by default, whatever the export called the file
    shutil.copyfile(artifact, folder / "1" / (ONNX_FILE if artifact.suffix == ".onnx" else PLAN_FILE))
    atomic_write_text(folder / "config.pbtxt", triton_config(name, platform, io, batch_sizes, gpu_only))
    return folder


def write_triton_per_gpu_model(
    repository: Path, name: str, plans: dict[str, Path], io: dict, batch_sizes: tuple[int, ...]
) -> Path:
    """One Triton `tensorrt_plan` model holding a plan per GPU kind, `plans` keyed by compute capability ("7.5"):
    Triton loads the one whose `cc_model_filenames` key is the GPU's capability, so one repository serves T4 and
    A100 nodes alike. No default file: a GPU without its own plan refuses to load rather than run another's."""
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    entries = []
    for capability, plan in sorted(plans.items()):
        if not re.fullmatch(r"[0-9]{1,2}\.[0-9]", capability):
            raise HwawareError(f"triton: {capability!r} is not a compute capability such as 7.5")
        file = f"model.sm{capability.replace('.', '')}.plan"
        shutil.copyfile(plan, folder / "1" / file)
        entries.append(f'  {{\n    key: "{capability}"\n    value: "{file}"\n  }}')
    config = triton_config(name, "tensorrt_plan", io, batch_sizes, True)
    config += "cc_model_filenames [\n" + ",\n".join(entries) + "\n]\n"
    atomic_write_text(folder / "config.pbtxt", config)
    return folder


def triton_name(out_dir: str | Path) -> str:
    """A Triton model name from the export folder's name (letters, digits, `_` and `-` only)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(out_dir).resolve().name).strip("_")
    return name or "hwaware_vit"


# ---- the card -------------------------------------------------------------------------------


def read_card(out_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(out_dir) / CARD_FILE, f"{out_dir}: no {CARD_FILE}; is this an hwaware export folder?")


def _card_json(card: dict[str, Any]) -> str:
    try:
        return json.dumps(card, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise HwawareError(f"card: a field is not plain JSON ({exc})") from None


def _check_extra(fields: dict[str, Any]) -> None:
    clash = sorted(set(fields) & COMPUTED_CARD_FIELDS)
    if clash:
        raise HwawareError(f"card: {clash[0]!r} is computed by export and cannot be set")


def update_card(out_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Add or replace fields of an export's `card.json` atomically (accuracy, predicted/measured latency)."""
    _check_extra(fields)
    card = {**read_card(out_dir), **fields}
    atomic_write_text(Path(out_dir) / CARD_FILE, _card_json(card))
    return card


# ---- the output folder ----------------------------------------------------------------------


def check_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """Raise unless `out_dir` is free: absent, empty, or (with `force`) a previous export."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise HwawareError(f"out: {out_dir} exists and is not a folder")
    contents = list(out_dir.iterdir())
    if not contents:
        return
    if not force:
        raise HwawareError(f"out: {out_dir} already exists; pass --force to replace it")
    if not (out_dir / CARD_FILE).is_file():
        raise HwawareError(f"out: {out_dir} is not an hwaware export folder (no {CARD_FILE}); refusing to replace it")
    foreign = sorted(p.name for p in contents if not _written_by_export(p.name))
    if foreign:
        raise HwawareError(f"out: {out_dir} also holds {foreign[0]!r}, which export did not write; --force replaces "
                           "the whole folder, so move it out first")


def _written_by_export(name: str) -> bool:
    """Whether a file or folder of that name in an export folder is one an export writes."""
    return (name in (WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE, PLAN_FILE, CARD_FILE, TIMING_CACHE_FILE, "triton")
            or name == PLAN_FILE + ".json" or re.fullmatch(r"model\.[a-z0-9]+\.onnx", name) is not None)


@contextlib.contextmanager
def staged_folder(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `out_dir`; on success it replaces `out_dir`, on error it is removed.

    Replacing renames the old folder away, renames the new one in, then deletes the old one, so at
    every moment `out_dir` is either the complete old export or the complete new one.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    as_user_file(staging, directory=True)  # mkdtemp's 0700 would hide the export from a Triton container
    try:
        yield staging
        check_out_dir(out_dir, force)  # something may have appeared there meanwhile
        retired = None
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, retired)  # rename(2) may replace an empty folder
        os.replace(staging, out_dir)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- the entry point ------------------------------------------------------------------------


def preflight(
    out_dir: str | Path, formats: str | Iterable[str] = FORMATS, force: bool = False, precision: str = "fp32"
) -> tuple[tuple[str, ...], list[str]]:
    """The checks that need no model: (formats, warnings), or a HwawareError. Cheap, so callers run it first.

    Unknown formats or precisions, a taken output folder and TensorRT asked for alone where it
    cannot run are errors; TensorRT asked for with other formats where it cannot run is a warning
    and is dropped. fp8 runs only in TensorRT on compute capability 8.9+: it needs the tensorrt
    format and such a GPU here (the engine is checked against the outputs of the model).
    """
    from hwaware.tensorrt_build import present_environment, tensorrt_unavailable_reason

    spec = _check_precision(precision)
    wanted = parse_formats(formats)
    check_out_dir(out_dir, force)
    if not _serves_onnx(spec) and ONNX_FORMATS & set(wanted):
        raise HwawareError(f"precision: {precision} runs only with {spec.where()}; it exports as timm weights in "
                           f"{precision} (format timm), not as {', '.join(f for f in wanted if f in ONNX_FORMATS)}")
    if spec.quantized and not ONNX_FORMATS & set(wanted):
        raise HwawareError(f"precision: {precision} ships as a quantized ONNX model (the timm weights stay float); "
                           "add the onnx format")
    if ("onnxruntime", "cpu") not in spec.runs_on and spec.quantized:
        if "tensorrt" not in wanted:
            raise HwawareError(f"precision: {precision} runs only with {spec.where()}; add the tensorrt format")
        if tensorrt_unavailable_reason() is None:
            environment = present_environment()
            check_runs(precision, "tensorrt", "cuda", environment["gpu"],
                       tuple(int(p) for p in environment["compute_capability"].split(".")))
    if "tensorrt" not in wanted:
        return wanted, []
    reason = tensorrt_unavailable_reason()
    if reason is None:
        return wanted, []
    if spec.quantized and ("onnxruntime", "cpu") not in spec.runs_on:
        raise HwawareError(f"tensorrt: {reason}; {precision} runs only there, so nothing was exported")
    if wanted == ("tensorrt",):
        raise HwawareError(f"tensorrt: {reason}; nothing else was asked for, so nothing was exported")
    skipped = f"tensorrt: skipped, {reason}; the other formats were exported"
    return tuple(f for f in wanted if f != "tensorrt"), [skipped]


def export_model(
    model: nn.Module,
    arch: Arch,
    space: SearchSpace,
    out_dir: str | Path,
    formats: str | Iterable[str] = FORMATS,
    precision: str = "fp32",
    batch_sizes: str | Iterable[int] = DEFAULT_BATCH_SIZES,
    force: bool = False,
    card_extra: dict[str, Any] | None = None,
    sample_inputs: torch.Tensor | None = None,
    opset: int = DEFAULT_OPSET,
    onnx_dynamo: bool = False,
    timing_cache: str | Path | None = None,
    quantize_mode: str | None = None,
    calibration_inputs: torch.Tensor | None = None,
    accuracy_batches: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    max_accuracy_drop: float | None = None,
    table_batch: int | None = None,
    measure_settings: Any = None,
) -> ExportResult:
    """Export `model` (the timm ViT of `arch`, e.g. `SuperViT.extract(arch)`) into `out_dir`.

    `formats`: any of timm, onnx, tensorrt, triton (TensorRT and Triton are built from the ONNX
    file, so asking for them writes it too). `precision` applies to ONNX/TensorRT/Triton; timm
    weights stay as they are. `batch_sizes` set the verification batches, the TensorRT profile
    (1/median/max) and Triton's `max_batch_size` and preferred batches. `sample_inputs`: real
    images the ONNX/TensorRT outputs are also checked on. `card_extra`: fields for `card.json`
    (val_top1, test_top1, predicted_latency_ms, measured_latency_ms, ...). `timing_cache`: a
    TensorRT timing cache file to reuse across builds (default: `timing.cache` in the export).
    `onnx_dynamo`: use the torch.export-based ONNX exporter instead of the TorchScript one.
    Where TensorRT cannot run, the other formats are still written and `warnings` says why;
    asking for TensorRT alone there is an error.

    int8/fp8: `model.onnx` stays fp32 and `model.<precision>.onnx` beside it is quantized in
    `quantize_mode` (static calibrates on `calibration_inputs`: real training images); TensorRT
    and Triton serve the quantized file. `accuracy_batches` ({"val": [(images, labels), ...],
    "test": ...}) give the card float and quantized top-1 and their agreement per split;
    `max_accuracy_drop` (points) refuses, in one line and with nothing written, a quantized
    model that loses more on any of them.

    TensorRT: the plan's optimisation profile follows `hwaware.tensorrt_build.profile_shapes`, its opt
    batch the latency table's batch (`table_batch`) so the table priced engines tuned like this one;
    the card carries the `trtexec` command that builds and times the same engine (timed with
    `measure_settings`, a `MeasureSettings`, default the profiling defaults).
    """
    wanted, result_warnings = preflight(out_dir, formats, force, precision)
    for warning in result_warnings:
        log.warning(warning)
    batch_sizes = parse_batch_sizes(batch_sizes)
    if get_precision(precision).quantized:  # None: the default tables use too (static where TensorRT reads it)
        quantize_mode = check_mode(precision, quantize_mode, "tensorrt" in wanted)
    elif quantize_mode is not None:
        raise HwawareError(f"quantize: {precision} is not quantized; a quantize mode needs int8 or fp8")
    card_extra = _check_inputs(model, arch, space, card_extra, precision, quantize_mode, calibration_inputs,
                               sample_inputs, accuracy_batches, max_accuracy_drop)
    sample_inputs = _checked_images("sample inputs", sample_inputs, space)
    calibration_inputs = _checked_images("calibration data", calibration_inputs, space)
    model = copy.deepcopy(model).float().cpu().eval()
    out_dir = Path(out_dir)
    card = _card_base(triton_name(out_dir), arch, space, precision, batch_sizes)
    stages = [f for f in FORMATS if f in wanted or (f == "onnx" and ONNX_FORMATS & set(wanted))]
    with staged_folder(out_dir, force) as staging, _progress_bar(len(stages)) as bar:
        for stage in stages:
            bar.set_postfix_str(stage)
            if stage == "timm":  # float weights; bf16, which only torch serves, ships its weights in bf16
                save_timm(model, arch, space, staging, None if _serves_onnx(get_precision(precision)) else
                          _dtype(precision))
            elif stage == "onnx":
                card["onnx"] = _write_onnx(staging, model, space, precision, batch_sizes, sample_inputs, opset,
                                           onnx_dynamo)
                if get_precision(precision).quantized:
                    card["quantized"] = _write_quantized(staging, model, space, precision, batch_sizes, sample_inputs,
                                                         quantize_mode, calibration_inputs, accuracy_batches,
                                                         max_accuracy_drop)
            elif stage == "tensorrt":
                card["tensorrt"] = _export_tensorrt(staging, model, space, precision, batch_sizes, sample_inputs,
                                                    Path(timing_cache) if timing_cache else None, table_batch,
                                                    measure_settings)
            else:
                card["triton"] = _write_triton(staging, card["name"], precision, batch_sizes, "tensorrt" in wanted)
            bar.update()
        written = stages
        card.update(formats=written, warnings=result_warnings, **card_extra)
        atomic_write_text(staging / CARD_FILE, _card_json(card))
    return ExportResult(out_dir=out_dir, formats=tuple(written), card=card, warnings=result_warnings)


def _progress_bar(total: int):
    from hwaware.progress import progress

    return progress(total=total, desc="export", unit="stage", every=1)


def _check_inputs(model, arch, space, card_extra, precision, quantize_mode, calibration_inputs, sample_inputs,
                  accuracy_batches, max_accuracy_drop) -> dict[str, Any]:
    """Everything that can be refused before a file is written; returns the card fields to add."""
    space.validate(arch)
    check_model_matches(model, arch, space)
    card_extra = dict(card_extra or {})
    _check_extra(card_extra)
    if get_precision(precision).quantized:
        if quantize_mode == "static" and calibration_inputs is None:
            raise HwawareError(f"quantize: static {precision} needs calibration images (real training images); "
                               "pass calibration_inputs")
        if calibration_inputs is None and sample_inputs is None:
            raise HwawareError(f"quantize: {precision} is checked on real images; pass sample_inputs")
        if max_accuracy_drop is not None and not accuracy_batches:
            raise HwawareError("quantize: a maximum accuracy drop needs labelled batches to measure it on")
    elif max_accuracy_drop is not None or calibration_inputs is not None:
        raise HwawareError(f"quantize: {precision} is not quantized; calibration and an accuracy limit need int8 or fp8")
    if max_accuracy_drop is not None and not (math.isfinite(max_accuracy_drop) and max_accuracy_drop >= 0):
        raise HwawareError(f"max accuracy drop: must be a number of points >= 0, got {max_accuracy_drop!r}")
    return card_extra


def _checked_images(what: str, images: torch.Tensor | None, space: SearchSpace) -> torch.Tensor | None:
    if images is None:
        return None
    expected = (space.in_chans, space.img_size, space.img_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        raise HwawareError(f"{what}: expected shape [N, {', '.join(map(str, expected))}], got {list(images.shape)}")
    return images.detach().float().cpu()


def _card_base(name: str, arch: Arch, space: SearchSpace, precision: str, batch_sizes: tuple[int, ...]) -> dict:
    import hwaware
    from hwaware.costs import arch_cost

    cost = arch_cost(arch, space)
    return {
        "name": name, "created": utc_timestamp(),
        "hwaware_version": hwaware.__version__, "space": space.name, "arch": arch.to_dict(),
        "arch_short": arch.short(), "params": cost.params, "flops": cost.flops, "precision": precision,
        "batch_sizes": list(batch_sizes), "onnx": None, "tensorrt": None, "triton": None,
    }


def _write_onnx(staging: Path, model: nn.Module, space: SearchSpace, precision: str, batch_sizes: tuple[int, ...],
                sample_inputs: torch.Tensor | None, opset: int, dynamo: bool) -> dict[str, Any]:
    """`model.onnx` in the precision's graph dtype (fp32 for quantized precisions), checked against PyTorch."""
    graph_precision = get_precision(precision).graph_dtype
    onnx_path = staging / ONNX_FILE
    export_onnx(model, space, onnx_path, graph_precision, opset, dynamo)
    checks = _verify("onnx", onnx_runner(onnx_path), model, space, batch_sizes, sample_inputs, graph_precision)
    return {"file": ONNX_FILE, "opset": onnx_opset(onnx_path), "exporter": _exporter_name(dynamo),
            "input": INPUT_NAME, "output": OUTPUT_NAME, **checks}


def _write_quantized(staging: Path, model: nn.Module, space: SearchSpace, precision: str,
                     batch_sizes: tuple[int, ...], sample_inputs: torch.Tensor | None, mode: str,
                     calibration_inputs: torch.Tensor | None,
                     accuracy_batches: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]] | None,
                     max_accuracy_drop: float | None) -> dict[str, Any]:
    """`model.<precision>.onnx` from the staged fp32 file: how it was quantized, its outputs against
    PyTorch, float and quantized top-1 per split (refused beyond `max_accuracy_drop`), and, where ONNX
    Runtime's CPU runs it, both files timed side by side."""
    float_path, quantized_path = staging / ONNX_FILE, staging / quantized_file_name(precision)
    how = quantize_onnx(float_path, quantized_path, precision, mode, calibration_inputs)
    real = sample_inputs if sample_inputs is not None else calibration_inputs
    checks = _verify(f"onnx {precision}", onnx_runner(quantized_path), model, space, batch_sizes, real, precision)
    section: dict[str, Any] = {"file": quantized_path.name, **how, **checks}
    if accuracy_batches:
        section["accuracy"] = compare_accuracy(float_path, quantized_path, accuracy_batches)
        check_accuracy_drop(section["accuracy"], max_accuracy_drop, precision)
        section["max_accuracy_drop_points"] = max_accuracy_drop
    if ("onnxruntime", "cpu") in get_precision(precision).runs_on:
        section["cpu_latency"] = _time_side_by_side(float_path, quantized_path, space)
    return section


def _time_side_by_side(float_path: Path, quantized_path: Path, space: SearchSpace) -> dict[str, Any]:
    """Batch 1, one ONNX Runtime CPU thread, interleaved so load from elsewhere falls on both alike."""
    from hwaware.latency.backends import OnnxRuntimeBackend
    from hwaware.latency.devices import MeasureSettings
    from hwaware.latency.protocol import time_interleaved

    settings = MeasureSettings(warmup=5, min_repeats=20, min_time_s=0.5, threads=1)
    backend = OnnxRuntimeBackend("cpu", "fp32", threads=settings.threads)
    example = torch.randn(1, space.in_chans, space.img_size, space.img_size)
    runners = [backend.prepare_onnx(path, example) for path in (float_path, quantized_path)]
    float_stats, quantized_stats = time_interleaved(runners, settings)
    return {"float_ms": float_stats.median_ms, "quantized_ms": quantized_stats.median_ms,
            "ratio": quantized_stats.median_ms / float_stats.median_ms, "batch_size": 1, "threads": settings.threads,
            "statistic": "median", "note": "measured at export on this machine; a shared host perturbs it"}


def _write_triton(staging: Path, name: str, precision: str, batch_sizes: tuple[int, ...], with_tensorrt: bool) -> dict:
    """Triton models for the served ONNX file (the quantized one for int8/fp8) and, if built, the engine."""
    served = served_onnx(staging, precision)
    io = onnx_io(served)
    repository = staging / "triton"
    models = [write_triton_model(repository, name, served, io, batch_sizes).name]
    if with_tensorrt:
        models.append(write_triton_model(repository, f"{name}_trt", staging / PLAN_FILE, io, batch_sizes).name)
    return {"repository": "triton", "models": models}


def served_onnx(folder: Path, precision: str) -> Path:
    """The ONNX file of an export folder that serves `precision`: model.onnx, or the quantized one beside it."""
    return folder / (quantized_file_name(precision) if get_precision(precision).quantized else ONNX_FILE)


def _export_tensorrt(
    staging: Path, model: nn.Module, space: SearchSpace, precision: str, batch_sizes: tuple[int, ...],
    sample_inputs: torch.Tensor | None, timing_cache: Path | None, table_batch: int | None, measure_settings: Any,
) -> dict[str, Any]:
    """Build `model.plan` from the staged (for int8/fp8, quantized) ONNX file, check the engine's outputs against
    PyTorch on the GPU with the one TensorRT runner, and record the `trtexec` command that rebuilds and times it."""
    from hwaware.latency.backends import TensorRTRunner
    from hwaware.latency.devices import MeasureSettings
    from hwaware.tensorrt_build import build_engine, load_engine, metadata_path, trtexec_command

    plan = staging / PLAN_FILE
    served = served_onnx(staging, precision)
    metadata = build_engine(served, plan, precision, batch_sizes, timing_cache or staging / TIMING_CACHE_FILE,
                            opt_batch=table_batch)
    settings = measure_settings or MeasureSettings()
    metadata["trtexec"] = trtexec_command(metadata, served.name, PLAN_FILE,
                                          str(timing_cache) if timing_cache else TIMING_CACHE_FILE, settings,
                                          cuda_graph=settings.cuda_graph)
    metadata["profile_rule"] = ("min batch 1, opt the latency table's batch (else the median batch size), "
                                "max the largest batch size")
    atomic_write_text(metadata_path(plan), json.dumps(metadata, indent=2) + "\n")
    engine = load_engine(plan)

    def run(images: torch.Tensor) -> torch.Tensor:
        return TensorRTRunner(engine, images.to("cuda")).outputs()

    # TensorRT may use TF32 for fp32 layers, so its fp32 engine is held to the fp16 tolerance
    tolerance = precision if get_precision(precision).quantized else "fp16"
    checks = _verify("tensorrt", run, model, space, batch_sizes, sample_inputs, tolerance)
    return {"file": PLAN_FILE, "metadata": metadata_path(plan).name, **metadata, **checks}
