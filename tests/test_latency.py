"""Latency tables: profiles, protocol, table files, resumable profiling, estimate, CLI errors."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hwaware.errors import HwawareError
from hwaware.latency import (
    Calibration,
    LatencyTable,
    MeasureSettings,
    Stats,
    find_present,
    find_table,
    list_profiles,
    load_device_profile,
    measure_latency,
    time_runner,
    validation_metrics,
)
from hwaware.latency import profile as profiling
from hwaware.latency.backends import get_backend
from hwaware.latency.protocol import time_interleaved
from hwaware.latency.table import COLUMNS, table_name
from hwaware.space import Arch, SearchSpace
from hwaware.vit import Piece, build_piece, piece_input

TINY = SearchSpace(name="tiny", embed_dims=(16,), depths=(1, 2), num_heads=(1, 2), mlp_ratios=(2.0,), head_dim=8,
                   img_size=4, patch_size=2, in_chans=1, num_classes=3)
QUICK = MeasureSettings(warmup=1, min_repeats=3, min_time_s=0.0, max_repeats=50, threads=1, anchor_every=2,
                        drift_tolerance=10.0, max_remeasure=1, fit_subnets=3, holdout_subnets=3)
GPU = torch.cuda.is_available()


# ---- device profiles ------------------------------------------------------------------------------


def test_every_device_profile_loads_with_peaks():
    assert {"cpu", "v100", "t4", "a10", "a100", "l4", "h100", "h200"} <= set(list_profiles())
    for name in ("cpu", "v100", "t4", "a10", "a100", "l4", "h100", "h200"):
        p = load_device_profile(name)
        assert p.peak_flops["fp32"] > 0 and p.memory_bandwidth > 0
        assert p.backend in ("onnxruntime", "tensorrt", "torch")


def test_tensorrt_window_of_a_device_is_enforced_with_the_fix():
    from hwaware.tensorrt_build import check_supported

    v100 = load_device_profile("v100")
    check_supported(v100.tensorrt, "8.6.1")
    check_supported(v100.tensorrt, "10.4.0")
    for version in ("10.5.0", "11.4.0", "8.5.3"):
        with pytest.raises(HwawareError, match=f"TensorRT {version} does not support .*tensorrt-cu12-libs==10.4.0"):
            check_supported(v100.tensorrt, version, v100.description)
    check_supported(load_device_profile("h100").tensorrt, "11.0")


def test_profile_match_rules():
    a10, a100 = load_device_profile("a10"), load_device_profile("a100")
    assert a10.matches("cuda", "NVIDIA A10", (8, 6)) and not a10.matches("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
    assert a100.matches("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
    assert load_device_profile("h200").matches("cuda", "NVIDIA H200", (9, 0))
    assert not load_device_profile("h100").matches("cuda", "NVIDIA H200", (9, 0))


def test_absent_device_names_what_is_present():
    if GPU:
        pytest.skip("a GPU is present; the absent-device message is checked on CPU-only hosts")
    with pytest.raises(HwawareError, match="v100 .* not present .*present: CPU"):
        find_present(load_device_profile("v100"))
    assert find_present(load_device_profile("cpu")).kind == "cpu"


def test_unknown_device_and_bad_settings():
    with pytest.raises(HwawareError, match="unknown device 'tpu'.*cpu"):
        load_device_profile("tpu")
    with pytest.raises(HwawareError, match="unknown setting 'repeats'"):
        MeasureSettings.from_dict({"repeats": 3})
    with pytest.raises(HwawareError, match="statistic"):
        MeasureSettings.from_dict({"statistic": "mean"})


# ---- protocol -------------------------------------------------------------------------------------


class FakeRunner:
    """Returns a fixed sequence of timings and counts calls."""

    def __init__(self, ms: float):
        self.ms, self.calls = ms, 0

    def time(self, repeats):
        self.calls += repeats
        return [self.ms] * repeats


def test_stats_percentiles():
    s = Stats.of([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert s.median_ms == 5.5 and s.min_ms == 1 and s.n == 10
    assert s.iqr_ms == pytest.approx(np.percentile(range(1, 11), 75) - np.percentile(range(1, 11), 25))
    assert s.p90_ms == pytest.approx(9.1)


def test_time_runner_meets_min_count_and_cap():
    runner = FakeRunner(1.0)
    stats = time_runner(runner, MeasureSettings(warmup=4, min_repeats=7, min_time_s=0.0, max_repeats=100))
    assert stats.n >= 7 and runner.calls == stats.n + 4
    capped = time_runner(FakeRunner(1.0), MeasureSettings(warmup=0, min_repeats=5, min_time_s=60.0, max_repeats=40))
    assert capped.n == 40  # min time not reachable: stops at the cap


def test_time_interleaved_gives_each_runner_enough():
    fast, slow = FakeRunner(0.01), FakeRunner(5.0)
    settings = MeasureSettings(warmup=1, min_repeats=4, min_time_s=0.02, max_repeats=500)
    s_fast, s_slow = time_interleaved([fast, slow], settings)
    assert s_fast.median_ms == 0.01 and s_slow.median_ms == 5.0
    assert s_slow.n >= 4 and sum([5.0] * s_slow.n) / 1e3 >= 0.02
    assert 4 <= s_fast.n <= 500


# ---- calibration and metrics ------------------------------------------------------------------------


def test_calibration_recovers_a_linear_correction():
    rng = np.random.default_rng(0)
    sums, counts = rng.uniform(1, 10, 20), rng.integers(3, 16, 20)
    measured = 0.8 * sums + 0.05 * counts + 0.3
    cal = Calibration.fit(sums, counts, measured)
    assert (cal.scale, cal.per_piece, cal.intercept) == pytest.approx((0.8, 0.05, 0.3), abs=1e-9)
    with pytest.raises(HwawareError, match="at least 3"):
        Calibration.fit([1, 2], [3, 4], [1, 2])


def test_validation_metrics():
    m = validation_metrics([100, 100, 100, 100], [100, 104, 108, 120])
    assert m["within_5pct"] == 0.5 and m["within_10pct"] == 0.75 and m["n"] == 4
    assert m["mape"] == pytest.approx((0 + 0.04 + 0.08 + 0.2) / 4)
    assert validation_metrics([1, 2, 3], [1.1, 2.2, 3.3])["kendall_tau"] == pytest.approx(1.0)


# ---- the table file ------------------------------------------------------------------------------


def synthetic_table(space=TINY, device="cpu", per_piece=lambda p: 1.0 + p.num_heads + p.mlp_ratio) -> LatencyTable:
    records = []
    for p in profiling.space_pieces(space):
        ms = per_piece(p)
        records.append({"piece": p.key, "kind": p.kind, "embed_dim": p.embed_dim, "num_heads": p.num_heads,
                        "mlp_ratio": p.mlp_ratio, "median_ms": ms, "iqr_ms": 0.1, "p90_ms": ms * 1.1,
                        "min_ms": ms * 0.9, "n": 10, "attempts": 1, "drifted": False})
    meta = {"device": device, "backend": "onnxruntime", "precision": "fp32", "batch_size": 1, "space": space.name,
            "space_def": space.to_dict(), "statistic": "median",
            "calibration": {"scale": 0.9, "per_piece": 0.1, "intercept": 0.5}}
    return LatencyTable(pd.DataFrame.from_records(records, columns=COLUMNS), meta)


def test_table_roundtrip_and_predict(tmp_path):
    table = synthetic_table()
    path = table.save(tmp_path / table_name("cpu", "onnxruntime", "fp32", "tiny", 1))
    loaded = LatencyTable.load(path)
    arch = Arch(16, (1, 2), (2.0, 2.0))
    piece_sum = sum(1.0 + p.num_heads + p.mlp_ratio for p in [Piece("stem", 16), Piece("block", 16, 1, 2.0),
                                                                Piece("block", 16, 2, 2.0), Piece("head", 16)])
    assert loaded.predict(arch) == pytest.approx(0.9 * piece_sum + 0.1 * 4 + 0.5)
    assert (loaded.space_name, loaded.device, loaded.backend, loaded.batch_size) == ("tiny", "cpu", "onnxruntime", 1)
    with pytest.raises(HwawareError, match="no row for block-d16-h4"):
        loaded.predict(Arch(16, (4,), (2.0,)))


def test_cheapest_is_the_exact_minimum():
    table = synthetic_table()
    best_ms, best = table.cheapest(TINY)
    every = [Arch(16, hs, (2.0,) * len(hs)) for depth in TINY.depths for hs in itertools.product(TINY.num_heads, repeat=depth)]
    assert best_ms == pytest.approx(min(table.predict(a) for a in every))
    assert table.predict(best) == best_ms


def test_truncated_or_partial_tables_are_refused(tmp_path):
    path = synthetic_table().save(tmp_path / "cpu-onnxruntime-fp32-tiny-b1.csv")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(HwawareError, match="checksum"):
        LatencyTable.load(path)
    path.write_text(text)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(sidecar.read_text()[:50])
    with pytest.raises(HwawareError, match="truncated or not JSON"):
        LatencyTable.load(path)
    with pytest.raises(HwawareError, match="not a finished table"):
        LatencyTable.load(tmp_path / "cpu-onnxruntime-fp32-tiny-b1.csv.partial")


def test_table_for_another_space_is_refused(tmp_path):
    from hwaware.space import get_space

    with pytest.raises(HwawareError, match="measured for space 'tiny', not 'digits'"):
        synthetic_table().check_space(get_space("digits"))


def test_find_table_names_the_command(tmp_path):
    with pytest.raises(HwawareError, match="hwaware profile --device cpu --space digits --backend onnxruntime "
                                           "--precision fp32 --batch 1"):
        find_table("cpu", "digits", root=tmp_path)
    path = synthetic_table().save(tmp_path / table_name("cpu", "onnxruntime", "fp32", "tiny", 1))
    assert find_table("cpu", "tiny", root=tmp_path) == path


# ---- profiling: complete, resumable -------------------------------------------------------------------


def make_profiler(out, settings=QUICK, seed=0):
    backend = get_backend("torch", device="cpu", precision="fp32", threads=1)
    return profiling.Profiler(load_device_profile("cpu"), TINY, backend, 1, settings, out, seed=seed, progress=False)


def test_profile_run_writes_a_validated_table(tmp_path):
    path = make_profiler(tmp_path).run()
    table = LatencyTable.load(path)
    assert path.name == "cpu-torch-fp32-tiny-b1.csv"
    assert sorted(table.rows["piece"]) == sorted(p.key for p in profiling.space_pieces(TINY))
    assert set(table.validation) >= {"mape", "within_5pct", "within_10pct", "kendall_tau", "n"}
    assert table.validation["n"] == 3 and table.meta["calibration"]["fit_n"] == 3
    assert table.meta["environment"]["threads"] == 1 and table.meta["settings"]["min_repeats"] == 3
    assert not list(tmp_path.glob("*.partial"))
    assert all(table.predict(a) > 0 for a in [TINY.smallest(), TINY.largest()])


def test_profile_resumes_after_a_kill_without_duplicates(tmp_path, monkeypatch):
    real = profiling.time_interleaved
    calls = {"n": 0}

    def dies_on_third(runners, settings):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(runners, settings)

    monkeypatch.setattr(profiling, "time_interleaved", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_profiler(tmp_path).run()
    log = tmp_path / "cpu-torch-fp32-tiny-b1.csv.partial"
    first = [r for r in profiling.PartialLog(log).read() if r["kind"] != "anchor"]
    assert len(first) == 4  # two segments of two
    assert not (tmp_path / "cpu-torch-fp32-tiny-b1.csv").exists()
    with pytest.raises(HwawareError, match="no .*cpu-torch-fp32-tiny-b1.csv \\(a partial run is there"):
        find_table("cpu", "tiny", backend="torch", precision="fp32", batch=1, root=tmp_path)
    with open(log, "a") as f:  # a kill in the middle of a write leaves a torn line
        f.write("piece,block-d16-h1")
    measured = []
    monkeypatch.setattr(profiling, "time_interleaved", lambda runners, s: measured.append(len(runners) - 1)
                        or real(runners, s))
    profiler = make_profiler(tmp_path)
    rows = None

    def keep_rows(log_rows):
        nonlocal rows
        rows = log_rows
        return original_finalize(log_rows)

    original_finalize = profiler.finalize
    profiler.finalize = keep_rows
    path = profiler.run()
    keys = [(r["kind"], r["key"]) for r in rows if r["kind"] in ("piece", "subnet")]
    assert len(keys) == len(set(keys)) == 4 + 6
    assert sum(measured) == 10 - 4  # only what the first run had not finished
    assert LatencyTable.load(path).validation["n"] == 3


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "time_interleaved", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        make_profiler(tmp_path).run()
    with pytest.raises(HwawareError, match="partial run with other settings"):
        make_profiler(tmp_path, seed=1).run()


# ---- backends -----------------------------------------------------------------------------------------


def test_onnxruntime_times_an_exported_piece_and_its_onnx(tmp_path):
    piece = Piece("block", 16, 2, 2.0)
    module, x = build_piece(TINY, piece), piece_input(TINY, piece)
    settings = MeasureSettings(warmup=1, min_repeats=5, min_time_s=0.0)
    stats = measure_latency(module, x, backend="onnxruntime", settings=settings, workdir=tmp_path)
    assert stats["n"] >= 5 and stats["median_ms"] > 0 and stats["p90_ms"] >= stats["median_ms"]
    onnx_path = tmp_path / "model.onnx"
    assert onnx_path.is_file()
    again = measure_latency(onnx_path, x, backend="onnxruntime", settings=settings)
    assert again["median_ms"] > 0


def test_torch_backend_restores_thread_count():
    before = torch.get_num_threads()
    runner = get_backend("torch", threads=1).prepare(build_piece(TINY, Piece("head", 16)), piece_input(TINY, Piece("head", 16)))
    assert len(runner.time(3)) == 3 and torch.get_num_threads() == before


def test_missing_optional_backend_is_one_line():
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(HwawareError, match="pip install tensorrt"):
            get_backend("tensorrt", device="cuda")
    else:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(HwawareError, match="unknown backend 'tvm'"):
        get_backend("tvm")
    with pytest.raises(HwawareError, match="precision: fp16 does not run with onnxruntime on the CPU; fp16 runs with "):
        get_backend("onnxruntime", precision="fp16")


# ---- CLI ---------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hwaware.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(GPU, reason="checks the absent-device message on a CPU-only host")
def test_cli_absent_device_is_one_line(tmp_path):
    result = run_cli("profile", "--device", "v100", "--space", "autoformer-t", "--out", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "v100" in lines[0] and "present: CPU" in lines[0]
    assert not list(tmp_path.iterdir())


def test_cli_bad_inputs(tmp_path, capsys, monkeypatch):
    from hwaware.cli import main

    monkeypatch.chdir(tmp_path)  # no project file here

    for args, expected in [
        (("profile", "--device", "nope", "--space", "digits"), "unknown device 'nope'"),
        (("profile", "--validate", str(tmp_path / "missing.csv")), "does not exist"),
        (("profile", "--device", "cpu", "--space", "nope"), "unknown space"),
        (("profile", "--device", "cpu"), "--space is required (there is no hwaware.yaml here"),
    ]:
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1


# ---- GPU paths (skipped without CUDA) -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_gpu_times_with_cuda_events(precision):
    piece = Piece("block", 16, 2, 2.0)
    stats = measure_latency(build_piece(TINY, piece), piece_input(TINY, piece), backend="torch", device="cuda",
                            precision=precision, settings=MeasureSettings(warmup=2, min_repeats=5, min_time_s=0.0))
    assert stats["median_ms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_tensorrt_builds_and_times(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    piece = Piece("block", 16, 2, 2.0)
    backend = get_backend("tensorrt", device="cuda", precision="fp16", timing_cache=tmp_path / "timing.cache")
    stats = measure_latency(build_piece(TINY, piece), piece_input(TINY, piece), backend=backend,
                            settings=MeasureSettings(warmup=2, min_repeats=5, min_time_s=0.0), workdir=tmp_path)
    assert stats["median_ms"] > 0 and (tmp_path / "timing.cache").stat().st_size > 0


def test_sample_subnets_are_distinct_and_never_fewer_than_asked():
    archs = profiling.sample_subnets(TINY, 6, random.Random(0))
    assert len(archs) == len(set(archs)) == 6  # the tiny space has only 6 subnets
    with pytest.raises(HwawareError, match="20 distinct subnets asked of space tiny, which has only 6"):
        profiling.sample_subnets(TINY, 20, random.Random(0))


def test_partial_log_header_is_checked(tmp_path):
    log = tmp_path / "x.csv.partial"
    log.write_text("a,b\n1,2\n")
    with pytest.raises(HwawareError, match="not a partial profiling log"):
        profiling.PartialLog(log).read()


@pytest.mark.slow
def test_cli_profile_survives_sigkill_and_resumes(tmp_path):
    """The real thing: `hwaware profile` killed with SIGKILL mid-run, then run again to completion."""
    import signal
    import time

    args = [sys.executable, "-m", "hwaware.cli", "profile", "--device", "cpu", "--space", "digits", "--backend",
            "torch", "--out", str(tmp_path), "--min-repeats", "3", "--min-time", "0", "--warmup", "1",
            "--fit-subnets", "3", "--holdout-subnets", "3", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "cpu-torch-fp32-digits-b1.csv.partial"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert log.exists() and not (tmp_path / "cpu-torch-fp32-digits-b1.csv").exists()
    before = {(r["kind"], r["key"]) for r in profiling.PartialLog(log).read() if r["kind"] in ("piece", "subnet")}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    table = LatencyTable.load(tmp_path / "cpu-torch-fp32-digits-b1.csv")
    assert len(table.rows) == 33 and table.rows["piece"].is_unique and table.validation["n"] == 3
    assert before and not log.exists()


def test_a_stray_partial_log_never_bypasses_force(tmp_path, monkeypatch):
    """A finished table with a .partial beside it but no run record (a dead run's leftovers) is refused
    without --force, not silently re-measured over."""
    monkeypatch.setattr(profiling, "resolve_backend", lambda *a, **k: get_backend("torch", threads=1))
    path = profiling.profile_device("cpu", TINY, backend="torch", out=tmp_path, settings=QUICK, progress=False)
    finished = path.read_bytes()
    Path(f"{path}.partial").write_text(",".join(profiling.LOG_FIELDS) + "\n")
    with pytest.raises(HwawareError, match="exists already; pass --force"):
        profiling.profile_device("cpu", TINY, backend="torch", out=tmp_path, settings=QUICK, progress=False)
    assert path.read_bytes() == finished
