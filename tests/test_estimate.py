"""The latency estimate: reference data, the GPU kernel model, its expected error, the CPU roofline, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hwaware.errors import HwawareError
from hwaware.latency.devices import list_profiles, load_device_profile
from hwaware.latency.estimate import (
    KernelParams,
    Shapes,
    error_summary,
    estimate_table,
    expected_error_line,
    fit_kernel_params,
    gpu_peaks,
    half_split,
    leave_one_gpu_out,
    model_ms,
    predict_reference,
    stack_rows,
)
from hwaware.latency.table import COLUMNS, LatencyTable, find_table, table_name
from hwaware.reference import load_reference, reference_path
from hwaware.space import SearchSpace
from hwaware.vit import Piece, pieces

ROOT = Path(__file__).resolve().parents[1]
TINY = SearchSpace(name="tiny", embed_dims=(16,), depths=(1, 2), num_heads=(1, 2), mlp_ratios=(2.0,), head_dim=8,
                   img_size=16, patch_size=8, num_classes=10)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return load_reference()


def reference_text() -> str:
    return reference_path().read_text()


def write_reference(path: Path, edit) -> Path:
    """The shipped reference file with its first data row changed by `edit(fields) -> fields or rows`."""
    lines = reference_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("huggingface"))
    header = lines[first - 1].split(",")
    fields = dict(zip(header, lines[first].split(",")))
    edited = edit(dict(fields))
    rows = edited if isinstance(edited, list) else [edited]
    lines[first:first + 1] = [",".join(r[h] for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- reference data ---------------------------------------------------------------------------------


def test_shipped_reference_is_facts_with_their_source(reference):
    assert len(reference) == 278
    assert set(reference["gpu"]) == {"rtx3090", "rtx4090", "rtx5090", "rtx-pro-6000-maxq", "t4", "a100"}
    assert set(reference["license"]) == {"Apache-2.0"}
    assert reference["commit"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert set(reference["source"]) == {"huggingface/pytorch-image-models", "NVIDIA/FasterTransformer"}
    # FasterTransformer's guide: ViT-B/16 at 224 px on an A100, batch 1, fp16
    ft = reference[(reference["gpu"] == "a100") & (reference["model"] == "ViT-B_16-224") & (reference["batch"] == 1)]
    assert ft["measured_ms"].tolist() == [1.53]
    # timm's file gives img/s per batch: measured_ms = 1000 * batch / throughput
    vit = reference[(reference["model"] == "vit_base_patch16_224") & (reference["gpu"] == "rtx5090")]
    assert len(vit) == 1 and 50 < vit["measured_ms"].iloc[0] < 1000


@pytest.mark.parametrize("edit, message", [
    (lambda r: {**r, "measured_ms": "-3.0"}, "measured_ms must be a finite positive number"),
    (lambda r: {**r, "measured_ms": "0"}, "measured_ms must be a finite positive number"),
    (lambda r: {**r, "measured_ms": "nan"}, "measured_ms must be a finite positive number"),
    (lambda r: {**r, "measured_ms": "inf"}, "measured_ms must be a finite positive number"),
    (lambda r: {**r, "batch": "2.5"}, "batch must be a finite positive integer"),
    (lambda r: {**r, "gpu": "rtx9999"}, "unknown GPU 'rtx9999'"),
    (lambda r: {**r, "gpu": "cpu"}, "cpu is a cpu profile, not a GPU"),
    (lambda r: [r, r], "twice"),
    (lambda r: {**r, "attention": "maybe"}, "attention must be fused or unfused"),
])
def test_bad_reference_rows_are_one_line_errors(tmp_path, edit, message):
    path = write_reference(tmp_path / "ref.csv", edit)
    with pytest.raises(HwawareError, match=message) as info:
        load_reference(path)
    assert "\n" not in str(info.value)


def test_reference_without_a_column_is_refused(tmp_path):
    path = tmp_path / "ref.csv"
    path.write_text("model,gpu\nvit,rtx3090\n")
    with pytest.raises(HwawareError, match="lacks the column 'source'"):
        load_reference(path)


# ---- the GPU kernel model ---------------------------------------------------------------------------


def test_fit_recovers_the_parameters_that_made_the_data(reference):
    """Latencies made by known parameters (batch 1 to 1024, so the overheads matter) are fitted back."""
    rows = reference[reference["gpu"].isin(["rtx3090", "rtx5090"])].drop_duplicates(["gpu", "model"]).copy()
    rows = pd.concat([rows.assign(batch=b) for b in (1, 8, 1024)], ignore_index=True)
    truth = KernelParams(gemm_efficiency=0.7, attention_efficiency=0.4, memory_efficiency=0.5,
                         layer_overhead_ms=0.03, model_overhead_ms=0.2)
    rows["measured_ms"] = predict_reference(rows, truth)
    fitted = fit_kernel_params(rows)
    for name, value in vars(truth).items():
        assert getattr(fitted, name) == pytest.approx(value, rel=0.05), name


def test_overheads_are_not_fitted_from_large_batches_alone(reference):
    rows = stack_rows(reference, "torch")
    rows = rows[rows["gpu"] == "rtx5090"].reset_index(drop=True)
    assert rows["batch"].min() >= 256
    fitted = fit_kernel_params(rows)
    assert fitted.layer_overhead_ms == 0 and fitted.model_overhead_ms == 0


def test_fused_attention_writes_no_scores():
    """At many tokens and a small width the unfused N^2 scores dominate the block; fused attention is cheaper."""
    space = SearchSpace(name="wide", embed_dims=(192,), depths=(12,), num_heads=(3,), mlp_ratios=(4.0,), img_size=384)
    peaks = gpu_peaks(pd.DataFrame({"gpu": ["rtx4090"], "precision": ["fp16"]}))
    params = KernelParams()
    block = [model_ms(Shapes.from_piece(space, Piece("block", 192, 3, 4.0), 256, fused), peaks, params)[0]
             for fused in (True, False)]
    assert block[1] > 1.3 * block[0]


def test_leave_one_gpu_out_on_fastertransformer_meets_its_aim(reference):
    """Fit on the T4, predict the A100 and back: batch 1 to 32, MAPE at most 25 % (the issue's aim)."""
    rows = stack_rows(reference, "tensorrt")
    logo = leave_one_gpu_out(rows)
    assert set(logo["per_gpu"]) == {"a100", "t4"} and logo["n"] == len(rows) == 40
    assert logo["mape"] <= 0.25 and logo["kendall_tau"] >= 0.9
    assert logo["batch_range"] == [1, 32]
    assert half_split(rows)["mape"] < logo["mape"]  # a GPU the model has seen is easier than one it has not


@pytest.mark.slow
def test_leave_one_gpu_out_on_timm_sets(reference):
    """Measured on the shipped data: MAPE 14.2 %, tau 0.96, 49 % within 10 % (the issue's 60 % is not met)."""
    logo = leave_one_gpu_out(stack_rows(reference, "torch"))
    assert logo["mape"] <= 0.15 and logo["kendall_tau"] > 0.9 and logo["within_25pct"] > 0.75


def test_fused_stacks_price_all_bytes_at_one_efficiency(reference):
    """Eager PyTorch's elementwise kernels and its GEMM streams get their own efficiencies; FasterTransformer's
    two GPUs cannot separate them, so they are tied (separate, its leave-one-GPU-out error went 15 % -> 24 %)."""
    eager = fit_kernel_params(stack_rows(reference, "torch"))
    fused = fit_kernel_params(stack_rows(reference, "tensorrt"))
    assert fused.gemm_memory_efficiency == fused.memory_efficiency
    assert eager.gemm_memory_efficiency > 2 * eager.memory_efficiency


def test_error_summary_ranks_within_sets():
    summary = error_summary([1, 2, 3, 10, 20, 30], [1.05, 2.1, 3.6, 30, 20, 10], ["a"] * 3 + ["b"] * 3)
    assert summary["kendall_tau"] == pytest.approx(0.0)  # +1 in set a, -1 in set b
    assert summary["within_10pct"] == pytest.approx(3 / 6) and summary["within_25pct"] == pytest.approx(4 / 6)


# ---- estimated tables -------------------------------------------------------------------------------


def test_gpu_estimate_carries_its_leave_one_gpu_out_error(tmp_path, capsys):
    path = estimate_table("a100", TINY, backend="tensorrt", precision="fp16", batch=8, out=tmp_path)
    assert path.name == "a100-tensorrt-fp16-tiny-b8-estimated.csv"
    table = LatencyTable.load(path)
    estimate = table.meta["estimate"]
    assert table.estimated and estimate["stacks"] == ["fastertransformer", "tensorrt"]
    error = estimate["expected_error"]
    assert error["method"] == "leave one GPU out" and error["n"] == 40 and 0 < error["mape"] < 0.25
    assert estimate["reference"]["sha256"] and "a100 is in the reference data" in estimate["coverage"]
    small, large = TINY.smallest(), TINY.largest()
    assert 0 < table.predict(small) < table.predict(large)
    line = expected_error_line(table)
    assert "ESTIMATED" in line and f"{100 * error['mape']:.0f} %" in line and "batches 1-32" in line
    # the pipeline's table loader shows it wherever a search or export prices with the table
    from hwaware.pipeline import load_table_for

    load_table_for(TINY, table=path)
    assert "on GPUs it never saw" in capsys.readouterr().err


def test_gpu_estimate_outside_the_data_says_so(tmp_path):
    table = LatencyTable.load(estimate_table("h100", TINY, backend="tensorrt", batch=64, out=tmp_path))
    coverage = table.meta["estimate"]["coverage"]
    assert "h100 is not in the reference data" in coverage and "batch 64 is outside" in coverage
    assert "not 64: unknown there" in expected_error_line(table)
    # more work costs more: a batch of 64 is slower than a batch of 1 on the same GPU
    one = LatencyTable.load(estimate_table("h100", TINY, backend="tensorrt", batch=1, out=tmp_path))
    assert table.predict(TINY.largest()) > one.predict(TINY.largest())


@pytest.mark.parametrize("backend, precision, message", [
    ("onnxruntime", "fp16", "do not cover onnxruntime fp16"),
    ("tensorrt", "int8", "do not cover tensorrt int8"),
])
def test_uncovered_stacks_are_refused(tmp_path, backend, precision, message):
    with pytest.raises(HwawareError, match=message):
        estimate_table("a100", TINY, backend=backend, precision=precision, out=tmp_path)
    assert not list(tmp_path.iterdir())


def test_gpu_estimate_is_never_fitted_on_a_cpu_table(tmp_path):
    with pytest.raises(HwawareError, match="not on a measured table"):
        estimate_table("t4", TINY, backend="tensorrt", out=tmp_path,
                       calibrate_from=ROOT / "latency_tables" / "cpu-onnxruntime-fp32-digits-b1.csv")


def test_cpu_estimate_fits_efficiencies_on_a_measured_cpu_table(tmp_path):
    from hwaware.latency.estimate import _roofline, fit_efficiency, piece_work
    from hwaware.latency.profile import space_pieces

    cpu = load_device_profile("cpu")
    peak, bw = cpu.peak_flops_for("fp32"), cpu.memory_bandwidth
    records = []
    for p in space_pieces(TINY):
        flops, bytes_ = piece_work(TINY, p, 1, "fp32")
        ms = float(_roofline(flops, bytes_, peak, bw, 0.1, 0.1, 0.02))
        records.append({"piece": p.key, "kind": p.kind, "embed_dim": p.embed_dim, "num_heads": p.num_heads,
                        "mlp_ratio": p.mlp_ratio, "median_ms": ms, "iqr_ms": 0.0, "p90_ms": ms, "min_ms": ms,
                        "n": 10, "attempts": 1, "drifted": False})
    meta = {"device": "cpu", "backend": "onnxruntime", "precision": "fp32", "batch_size": 1, "space": "tiny",
            "space_def": TINY.to_dict(), "statistic": "median", "calibration": {"scale": 1.0}}
    source = LatencyTable(pd.DataFrame.from_records(records, columns=COLUMNS), meta)
    source.save(tmp_path / table_name("cpu", "onnxruntime", "fp32", "tiny", 1))
    fitted = fit_efficiency(LatencyTable.load(tmp_path / table_name("cpu", "onnxruntime", "fp32", "tiny", 1)), cpu)
    assert fitted["fit_rms_relative_error"] < 0.02
    path = estimate_table("cpu", TINY, out=tmp_path / "est", calibrate_from=source.path)
    table = LatencyTable.load(path)
    assert table.estimated and table.meta["estimate"]["compute_efficiency"] == pytest.approx(0.1, rel=0.2)
    largest = TINY.largest()
    assert table.predict(largest) == pytest.approx(sum(source.piece_ms[p] for p in pieces(largest)), rel=0.1)
    assert "error is unknown" in expected_error_line(table)
    assert find_table("cpu", "tiny", root=tmp_path / "est", estimated=True) == path


def test_every_gpu_profile_has_the_figures_the_model_scales():
    for name in list_profiles():
        profile = load_device_profile(name)
        if profile.kind != "cuda":
            continue
        fp16, fp32 = profile.peak_flops_for("fp16"), profile.peak_flops_for("fp32")
        assert fp16 > fp32 > 0 and profile.memory_bandwidth > 0, name  # tensor cores beat the CUDA cores
        assert 1e11 < profile.memory_bandwidth < 1e13 and 1e13 < fp16 < 1e16, name  # bytes/s and FLOP/s, not TB/s


# ---- the command line -------------------------------------------------------------------------------


def test_cli_estimate_prints_the_expected_error(tmp_path, capsys):
    from hwaware.cli import main

    assert main(["profile", "--device", "t4", "--space", "digits", "--estimate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED" in out and "on GPUs it never saw" in out
    sidecar = json.loads((tmp_path / "t4-tensorrt-fp16-digits-b1-estimated.json").read_text())
    assert sidecar["estimate"]["expected_error"]["n"] == 40


def test_cli_bad_reference_and_profile_without_peaks_are_one_line(tmp_path, capsys, monkeypatch):
    from hwaware.cli import main

    bad = write_reference(tmp_path / "bad.csv", lambda r: {**r, "measured_ms": "0"})
    out = str(tmp_path / "t")
    assert main(["profile", "--device", "t4", "--space", "digits", "--estimate", "--reference-data", str(bad),
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "measured_ms must be a finite positive number" in err
    mine = tmp_path / "profiles"
    mine.mkdir()
    text = (ROOT / "profiles" / "a100.yaml").read_text().replace("name: a100", "name: nopeak")
    (mine / "nopeak.yaml").write_text(text.replace("fp16: 312.0e12, ", ""))
    monkeypatch.setenv("HWAWARE_PROFILES", str(mine))
    assert main(["profile", "--device", "nopeak", "--space", "digits", "--estimate", "--out", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no peak FLOP/s for fp16" in err
    assert not (tmp_path / "t").exists()
