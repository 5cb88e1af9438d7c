"""The latency table: per-piece medians plus a fitted correction, saved as CSV with a JSON sidecar.

`predict(arch)` is dictionary look-ups and a few multiplications (a search calls it a million
times). The sidecar carries provenance, the calibration and its held-out validation; a
CSV whose checksum or row count disagrees with its sidecar is refused as truncated.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd

from hwaware.errors import HwawareError
from hwaware.io import atomic_write, atomic_write_text, dumps_strict, loads_strict, read_text_file
from hwaware.space import Arch, SearchSpace
from hwaware.vit import Piece, pieces

FORMAT = "hwaware-latency-table/1"
COLUMNS = ["piece", "kind", "embed_dim", "num_heads", "mlp_ratio", "median_ms", "iqr_ms", "p90_ms", "min_ms", "n",
           "attempts", "drifted"]


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def table_name(device: str, backend: str, precision: str, space: str, batch: int, estimated: bool = False) -> str:
    """The file name that says what a table is; every part must be a plain name (no path can be smuggled in)."""
    for what, value in (("device", device), ("backend", backend), ("precision", precision), ("space", space)):
        if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
            raise HwawareError(f"latency table: {what} name {str(value)[:40]!r} is not a plain name "
                               "(letters, digits, . _ + -): it would leave the tables folder")
    return f"{device}-{backend}-{precision}-{space}-b{int(batch)}{'-estimated' if estimated else ''}.csv"


@dataclass(frozen=True)
class Calibration:
    """Whole-model latency from the piece sum: scale * sum + per_piece * pieces + intercept.

    A whole model pays the per-call overhead once where the pieces pay it each, and fuses
    across piece boundaries; the per-piece term and the scale absorb both.
    """

    scale: float = 1.0
    per_piece: float = 0.0
    intercept: float = 0.0

    def apply(self, piece_sum: float, num_pieces: int) -> float:
        return self.scale * piece_sum + self.per_piece * num_pieces + self.intercept

    @classmethod
    def fit(cls, piece_sums, num_pieces, measured) -> Calibration:
        """Least squares on relative error (each row weighted by 1/measured), as accuracy is judged in %.

        Where noise makes the three collinear terms fit a non-positive scale (seen with 3 subnets on a
        busy host), the scale alone is fitted: a table must keep ranking subnets as its pieces do.
        """
        s, p, y = (np.asarray(v, dtype=np.float64) for v in (piece_sums, num_pieces, measured))
        if len(y) < 3:
            raise HwawareError(f"calibration: needs at least 3 measured subnets, got {len(y)}")
        design = np.stack([s, p, np.ones_like(s)], axis=1) / y[:, None]
        coef, *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
        if np.all(np.isfinite(coef)) and coef[0] > 0:
            return cls(*(float(c) for c in coef))
        return cls(relative_scale(s, y), 0.0, 0.0)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "per_piece": self.per_piece, "intercept": self.intercept,
                "model": "scale * piece_sum_ms + per_piece * (depth + 2) + intercept"}


def relative_scale(predicted, measured) -> float:
    """The factor k minimising the squared relative errors (k * predicted - measured) / measured."""
    ratios = np.asarray(predicted, dtype=np.float64) / np.asarray(measured, dtype=np.float64)
    factor = float(ratios.sum() / (ratios**2).sum())
    if not (np.isfinite(factor) and factor > 0):
        raise HwawareError(f"calibration: the fitted scale {factor!r} is not a positive number")
    return factor


def validation_metrics(measured, predicted) -> dict:
    """MAPE and shares within 5 % / 10 % (all as fractions) and Kendall's tau of the ranking."""
    from scipy.stats import kendalltau

    y, p = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(y) == 0:
        return {"mape": None, "within_5pct": None, "within_10pct": None, "kendall_tau": None, "n": 0}
    rel = np.abs(p - y) / y
    tau = float(kendalltau(y, p).statistic) if len(y) > 1 else None
    tau = tau if tau is not None and np.isfinite(tau) else None  # constant inputs: no ranking to score
    return {"mape": float(rel.mean()), "within_5pct": float((rel <= 0.05).mean()),
            "within_10pct": float((rel <= 0.10).mean()), "kendall_tau": tau, "n": int(len(y)),
            "max_error": float(rel.max())}


class LatencyTable:
    """Per-piece latencies of one space on one device/backend/precision/batch, and their correction."""

    def __init__(self, rows: pd.DataFrame, meta: dict, path: Path | None = None):
        self.rows, self.meta, self.path = rows, meta, path
        self.calibration = Calibration(**{k: v for k, v in (meta.get("calibration") or {}).items()
                                          if k in ("scale", "per_piece", "intercept")})
        column = f"{meta.get('statistic', 'median')}_ms"
        self.piece_ms: dict[Piece, float] = {
            Piece.from_key(key): float(ms) for key, ms in zip(rows["piece"], rows[column], strict=True)
        }
        # The hot path: stem+head per embed dim, and blocks by (embed dim, heads, ratio) tuples.
        self._ends = {p.embed_dim: ms + self.piece_ms.get(Piece("head", p.embed_dim), float("nan"))
                      for p, ms in self.piece_ms.items() if p.kind == "stem"}
        self._blocks = {(p.embed_dim, p.num_heads, p.mlp_ratio): ms for p, ms in self.piece_ms.items()
                        if p.kind == "block"}

    # ---- identity -----------------------------------------------------------------------------
    space_name = property(lambda self: self.meta["space"])
    device = property(lambda self: self.meta["device"])
    backend = property(lambda self: self.meta["backend"])
    precision = property(lambda self: self.meta["precision"])
    batch_size = property(lambda self: int(self.meta["batch_size"]))
    estimated = property(lambda self: bool(self.meta.get("estimated", False)))
    validation = property(lambda self: self.meta.get("validation") or {})
    # how int8/fp8 pieces were quantized (hwaware.quantize); None for float tables
    quantize_mode = property(lambda self: (self.meta.get("backend_settings") or {}).get("quantize_mode"))

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.meta["space_def"], source=f"{self.path}: space_def")

    def check_space(self, space: SearchSpace) -> None:
        if space.name != self.space_name or space.to_dict() != self.meta["space_def"]:
            raise HwawareError(f"latency table: {self.path} was measured for space {self.space_name!r}, "
                               f"not {space.name!r}; profile that space with hwaware profile --space {space.name}")

    # ---- prediction -----------------------------------------------------------------------------
    def piece_sum(self, arch: Arch) -> float:
        """Sum of the pieces' latencies (median, or min where the table says so), ms, before the correction."""
        d = arch.embed_dim
        try:
            return self._ends[d] + sum(map(self._blocks.__getitem__, zip(repeat(d), arch.num_heads, arch.mlp_ratios)))
        except KeyError:
            missing = [p.key for p in pieces(arch) if p not in self.piece_ms]
            raise HwawareError(f"latency table: {self.path or 'table'} has no row for {', '.join(missing)} "
                               f"(arch {arch.short()} is outside the space {self.space_name})") from None

    def predict(self, arch: Arch) -> float:
        """Predicted whole-model latency of `arch`, milliseconds per batch."""
        return self.calibration.apply(self.piece_sum(arch), arch.depth + 2)

    def cheapest(self, space: SearchSpace | None = None) -> tuple[float, Arch]:
        """The lowest predicted latency of any subnet of the space, and that subnet.

        The prediction is linear in each layer's block latency, so per (embed dim, depth) the
        cheapest subnet repeats the cheapest block; that makes the minimum exact.
        """
        space = space or self.space
        best: tuple[float, Arch] | None = None
        for d in space.embed_dims:  # the scale is positive (checked on load), so the cheapest block wins
            h, r = min(((h, r) for h in space.num_heads for r in space.mlp_ratios),
                       key=lambda hr: self._blocks.get((d, *hr), float("inf")))
            for depth in space.depths:
                arch = Arch(d, (h,) * depth, (r,) * depth)
                ms = self.predict(arch)
                if best is None or ms < best[0]:
                    best = (ms, arch)
        assert best is not None
        return best

    # ---- files ----------------------------------------------------------------------------------
    def save(self, csv_path: str | Path) -> Path:
        """Write the CSV, then the sidecar that vouches for it (checksum, row count)."""
        csv_path = Path(csv_path)
        data = self.rows[COLUMNS].to_csv(index=False, float_format="%.6g").encode()
        self.meta.update(format=FORMAT, complete=True, rows=len(self.rows), csv_sha256=hashlib.sha256(data).hexdigest())
        self.meta["sidecar_sha256"] = _sidecar_sha256(self.meta)
        atomic_write(csv_path, lambda tmp: tmp.write_bytes(data))
        atomic_write_text(sidecar_path(csv_path), dumps_strict(self.meta, indent=1, sort_keys=False) + "\n")
        self.path = csv_path
        return csv_path

    @classmethod
    def load(cls, csv_path: str | Path) -> LatencyTable:
        """Read a finished table; anything partial, truncated or mismatched is a one-line error."""
        csv_path = Path(csv_path)
        if csv_path.name.endswith(".partial") or not csv_path.suffix == ".csv":
            raise HwawareError(f"latency table: {csv_path} is not a finished table (expected a .csv)")
        side = sidecar_path(csv_path)
        for p in (csv_path, side):
            if not p.is_file():
                raise HwawareError(f"latency table: {p} does not exist; a table is a .csv plus its .json sidecar")
        try:
            meta = loads_strict(read_text_file(side, "latency table"))
        except ValueError as exc:
            raise HwawareError(f"latency table: sidecar {side} is truncated or not JSON ({str(exc)[:80]})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("complete") is not True:
            raise HwawareError(f"latency table: {side} is not a complete {FORMAT} sidecar")
        for key in ("device", "backend", "precision", "batch_size", "space", "space_def", "calibration", "rows"):
            if key not in meta:
                raise HwawareError(f"latency table: sidecar {side} lacks {key!r}")
        _check_meta(meta, side)
        expected = table_name(meta["device"], meta["backend"], meta["precision"], meta["space"], meta["batch_size"],
                              bool(meta.get("estimated", False)))
        if csv_path.name != expected:
            raise HwawareError(f"latency table: {csv_path.name} holds {expected} by its sidecar (renamed?); "
                               "a table's name must say what it measured")
        data = read_text_file(csv_path, "latency table").encode()
        if hashlib.sha256(data).hexdigest() != meta.get("csv_sha256"):
            raise HwawareError(f"latency table: {csv_path} does not match its sidecar's checksum (truncated or edited); "
                               f"profile again")
        import io

        rows = pd.read_csv(io.BytesIO(data))
        if list(rows.columns) != COLUMNS or len(rows) != meta["rows"]:
            raise HwawareError(f"latency table: {csv_path} has {len(rows)} rows/columns unlike its sidecar")
        _check_rows(rows, csv_path)
        table = cls(rows, meta, csv_path)
        fastest_ms, fastest = table.cheapest()
        if not fastest_ms > 0:
            raise HwawareError(f"latency table: sidecar {side}: its calibration predicts {fastest_ms:.4g} ms for "
                               f"{fastest.short()}; a correction must keep every prediction positive")
        return table

    def __repr__(self) -> str:
        v = self.validation
        return (f"LatencyTable({self.device}/{self.backend}/{self.precision}/b{self.batch_size}, {self.space_name}, "
                f"{len(self.rows)} pieces, mape={v.get('mape')})")


def _check_meta(meta: dict, side: Path) -> None:
    """The sidecar's fields have the types and ranges prediction relies on."""
    def bad(what: str):
        return HwawareError(f"latency table: sidecar {side}: {what}")

    batch = meta["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise bad(f"batch_size must be a positive integer, got {str(batch)[:20]}")
    if not isinstance(meta["space_def"], dict):
        raise bad("space_def must be a mapping")
    if meta.get("statistic", "median") not in ("median", "min"):
        raise bad(f"statistic must be median or min, got {str(meta.get('statistic'))[:20]!r}")
    if not isinstance(meta.get("estimated", False), bool):
        raise bad("estimated must be true or false")
    calibration = meta["calibration"]
    if not isinstance(calibration, dict):
        raise bad("calibration must be a mapping of scale, per_piece, intercept")
    for key in ("scale", "per_piece", "intercept"):
        value = calibration.get(key, 1.0 if key == "scale" else 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"calibration {key} must be a finite number, got {str(value)[:20]}")
    if calibration.get("scale", 1.0) <= 0:
        raise bad(f"calibration scale must be positive, got {calibration['scale']}")
    if "settings" in meta:  # bench times with them: the bounds of `hwaware profile`'s flags
        from hwaware.latency.devices import MeasureSettings

        if not isinstance(meta["settings"], dict):
            raise bad("settings must be a mapping")
        MeasureSettings.from_dict(meta["settings"], f"latency table: sidecar {side}: settings")
    if "sidecar_sha256" in meta and meta["sidecar_sha256"] != _sidecar_sha256(meta):  # older tables lack it
        raise bad("does not match its own checksum (edited by hand?); profile again")


def _sidecar_sha256(meta: dict) -> str:
    """SHA-256 of the sidecar's fields other than this checksum, in a canonical JSON form."""
    fields = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return hashlib.sha256(dumps_strict(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_rows(rows: pd.DataFrame, csv_path: Path) -> None:
    """Every piece once, with finite positive latencies and a key that parses."""
    if not rows["piece"].is_unique:
        duplicate = rows["piece"][rows["piece"].duplicated()].iloc[0]
        raise HwawareError(f"latency table: {csv_path} lists piece {str(duplicate)[:40]} twice")
    for column in ("median_ms", "min_ms"):
        values = pd.to_numeric(rows[column], errors="coerce")
        if not (np.isfinite(values) & (values > 0)).all():
            raise HwawareError(f"latency table: {csv_path}: {column} must be finite and positive in every row")
    for key in rows["piece"]:
        try:
            Piece.from_key(str(key))
        except (ValueError, KeyError, IndexError):
            raise HwawareError(f"latency table: {csv_path}: {str(key)[:40]!r} is not a piece") from None


def sidecar_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def find_table(device: str, space_name: str, backend: str | None = None, precision: str | None = None,
               batch: int | None = None, root: str | Path = "latency_tables", estimated: bool = False) -> Path:
    """The finished table for these settings (defaults from the device profile), or an error naming
    the `hwaware profile` command that creates it. With `estimated`, a roofline table may stand in."""
    from hwaware.latency.devices import load_device_profile

    if backend is None or precision is None or batch is None:
        profile = load_device_profile(device)
        backend, precision = backend or profile.backend, precision or profile.precision
        batch = batch or profile.batch_sizes[0]
    root = Path(root)
    measured = root / table_name(device, backend, precision, space_name, batch)
    candidates = [measured] + ([root / table_name(device, backend, precision, space_name, batch, True)] if estimated else [])
    for path in candidates:
        if path.is_file() and sidecar_path(path).is_file():
            return path
    command = (f"hwaware profile --device {device} --space {space_name} --backend {backend} "
               f"--precision {precision} --batch {batch} --out {root}")
    partial = " (a partial run is there: the same command resumes it)" if Path(f"{measured}.partial").exists() else ""
    raise HwawareError(f"latency table: no {measured}{partial}; create it with: {command}"
                       + (" (or add --estimate for a roofline estimate)" if not estimated else ""))
