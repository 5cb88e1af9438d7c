"""Public GPU latency measurements the GPU estimate is fitted on, shipped as data (`gpu_latency.csv`).

Each row is one published measurement of a plain ViT: its shape, the GPU (a device profile name),
the software stack, the batch and the latency of one batch, with the file, commit and license it
came from. Only figures are copied from the sources, never their code; the CSV's header says how
each figure was read. `load_reference` validates a file before anything is fitted on it.
"""

from __future__ import annotations

import io
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from hwaware.errors import HwawareError
from hwaware.io import excerpt, read_text_file

COLUMNS = ["source", "file", "commit", "license", "model", "gpu", "stack", "stack_version", "attention", "precision",
           "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "extra_tokens", "batch",
           "measured_ms"]
INTEGER_COLUMNS = ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "extra_tokens", "batch"]
ATTENTION = ("fused", "unfused")  # fused: flash/SDPA/fused MHA, no N^2 scores in memory; unfused: scores written


def reference_path() -> Path:
    return Path(str(files("hwaware.reference") / "gpu_latency.csv"))


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """The reference table, checked: every column present, shapes positive integers, times finite and
    positive, every GPU a device profile with the peak figures of its precision, no row twice."""
    from hwaware.latency.devices import load_device_profile

    path = Path(path) if path is not None else reference_path()
    text = read_text_file(path, "reference data")
    try:
        rows = pd.read_csv(io.StringIO(text), comment="#", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HwawareError(f"reference data: {path} is not a CSV ({str(exc).splitlines()[0][:80]})") from None
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise HwawareError(f"reference data: {path} lacks the column {missing[0]!r}")
    if rows.empty:
        raise HwawareError(f"reference data: {path} has no rows")
    rows = rows[COLUMNS].copy()
    for column in [*INTEGER_COLUMNS, "mlp_ratio", "measured_ms"]:
        values = pd.to_numeric(rows[column], errors="coerce")
        bad = ~(np.isfinite(values) & (values > 0))
        if column == "extra_tokens":
            bad = ~(np.isfinite(values) & (values >= 0))
        if column in INTEGER_COLUMNS:
            bad |= values.notna() & (values != values.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise HwawareError(f"reference data: {path} row {i + 1} ({excerpt(rows['model'].iloc[i], 40)}): {column} "
                               f"must be a finite positive {'integer' if column in INTEGER_COLUMNS else 'number'}, "
                               f"got {excerpt(rows[column].iloc[i], 20)}")
        rows[column] = values.astype(int) if column in INTEGER_COLUMNS else values.astype(float)
    bad_attention = ~rows["attention"].isin(ATTENTION)
    if bad_attention.any():
        value = rows.loc[bad_attention, "attention"].iloc[0]
        raise HwawareError(f"reference data: {path}: attention must be fused or unfused, got {excerpt(value, 20)}")
    key = ["gpu", "stack", "stack_version", "model", "img_size", "batch", "precision"]
    duplicated = rows.duplicated(key)
    if duplicated.any():
        r = rows[duplicated].iloc[0]
        raise HwawareError(f"reference data: {path} lists {excerpt(r['model'], 40)} on {excerpt(r['gpu'], 30)} "
                           f"({excerpt(r['stack_version'], 40)}, batch {r['batch']}) twice")
    for gpu, precision in rows[["gpu", "precision"]].drop_duplicates().itertuples(index=False):
        try:
            profile = load_device_profile(gpu)
        except HwawareError:
            raise HwawareError(f"reference data: {path}: unknown GPU {excerpt(gpu, 30)} (no device profile "
                               "of that name)") from None
        if profile.kind != "cuda":
            raise HwawareError(f"reference data: {path}: {gpu} is a {profile.kind} profile, not a GPU")
        check_peaks(profile, precision)
    return rows.reset_index(drop=True)


def check_peaks(profile, precision: str) -> None:
    """The figures the GPU model scales: a positive peak for `precision` and a memory bandwidth."""
    profile.peak_flops_for(precision)
    if not profile.memory_bandwidth > 0:
        raise HwawareError(f"profile {profile.name}: no memory_bandwidth under peak in {profile.path}")
