"""The one torch -> ONNX step that `hwaware export` and the latency table's pieces share.

Its own module so the latency package can use it without importing export: what a table
times is the graph that ships.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hwaware.errors import HwawareError

DEFAULT_OPSET = 17  # the newest opset TensorRT 8.6 parses; LayerNormalization needs 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and opset-conversion notices; errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def write_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, opset: int = DEFAULT_OPSET,
               dynamo: bool = False, output_name: str = OUTPUT_NAME) -> None:
    """The one torch -> ONNX step, dynamic batch axis: `hwaware export` and the latency table's pieces
    both go through it, so what a table times is the graph that ships.

    The module is wrapped in `nn.Sequential`: exported bare, a timm Block's optional arguments
    (attn_mask, is_causal) become traced inputs that the fused attention refuses.
    """
    wrapped = nn.Sequential(module).eval()
    if dynamo:
        dynamic = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},), "external_data": False}
    else:
        dynamic = {"dynamic_axes": {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}}}
    with _quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=dynamo, input_names=[INPUT_NAME], output_names=[output_name],
                opset_version=opset, verbose=False, **dynamic,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise HwawareError(f"onnx: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
