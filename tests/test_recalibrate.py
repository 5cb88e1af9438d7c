"""A table carried to another host: the fingerprint says what differs, --recalibrate refits it here."""

import json
import random
import subprocess
import sys

import pytest

from hwaware.errors import HwawareError
from hwaware.latency import LatencyTable, get_backend, load_device_profile
from hwaware.latency import profile as profiling
from hwaware.latency.devices import MeasureSettings
from hwaware.latency.host import cpu_fingerprint, fingerprint_differences, host_fingerprint
from hwaware.latency.recalibrate import host_differences, measure_subnets, recalibrate_table, warn_if_other_host
from hwaware.space import SearchSpace
from hwaware.vit import build_vit

TINY = SearchSpace(name="tiny", embed_dims=(16,), depths=(1, 2), num_heads=(1, 2), mlp_ratios=(2.0,), head_dim=8,
                   img_size=4, patch_size=2, in_chans=1, num_classes=3)
QUICK = MeasureSettings(warmup=1, min_repeats=3, min_time_s=0.0, max_repeats=50, threads=1, anchor_every=2,
                        drift_tolerance=10.0, max_remeasure=1, fit_subnets=3, holdout_subnets=2)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    backend = get_backend("onnxruntime", device="cpu", precision="fp32", threads=1)
    return profiling.Profiler(load_device_profile("cpu"), TINY, backend, 1, QUICK, out, progress=False).run()


class _ShiftingHost:
    """A backend on a host that slows down for a few seconds now and then (bursts 1-2 and 7 run 1.5x
    slower); its runners count how many of them are alive."""

    SLOW_BURSTS = (1, 2, 7)

    def __init__(self):
        self.bursts, self.alive, self.most_alive, self.order = 0, 0, 0, []

    def prepare(self, module, example, workdir):
        return _Runner(self, _size(module))


def _size(module):
    return sum(p.numel() for p in module.parameters())


class _Runner:
    def __init__(self, host, base_ms):
        self.host, self.base_ms = host, float(base_ms)
        host.alive += 1
        host.most_alive = max(host.most_alive, host.alive)

    def __del__(self):
        self.host.alive -= 1

    def time(self, repeats):
        slow = self.host.bursts in self.host.SLOW_BURSTS
        self.host.bursts += 1
        self.host.order.append(self.base_ms)
        return [self.base_ms * (1.5 if slow else 1.0)] * repeats


@pytest.mark.parametrize("rounds", [1, 2])
def test_subnets_read_their_quickest_round_with_one_segment_of_sessions_alive(rounds):
    """Round-robin within a segment: a burst the host slowed is outvoted by the other round, and at most
    the segment plus the anchor are in memory, however many subnets are sampled."""
    host = _ShiftingHost()
    archs = [TINY.sample(random.Random(seed)) for seed in range(5)]
    settings = MeasureSettings(warmup=0, min_repeats=1, min_time_s=0.0, anchor_every=2, subnet_rounds=rounds)
    measured = measure_subnets(host, TINY, 1, archs, settings, progress=False)
    truth = [_size(build_vit(arch, TINY)) for arch in archs]
    assert host.most_alive == 3  # the anchor and a segment of 2
    if rounds == 2:
        assert measured == pytest.approx(truth)
        anchor, first, second = host.order[:3]
        assert host.order[3:6] == [anchor, first, second]  # in turn, not each subnet's rounds back to back
    else:
        assert measured != pytest.approx(truth)


def test_cpu_fingerprint_reads_this_machine():
    fp = cpu_fingerprint()
    assert fp["cpu_cores"] >= 1 and fp["cpu_model"] and isinstance(fp["cpu_flags"], list)


def test_differences_ignore_clock_wobble_but_name_real_changes():
    here = {"cpu_model": "AMD EPYC", "cpu_cores": 2, "cpu_max_mhz": 2450.0, "cpu_flags": ["avx2", "fma"]}
    assert fingerprint_differences(here, {**here, "cpu_max_mhz": 2500.0}) == []
    there = {**here, "cpu_cores": 4, "cpu_flags": ["avx2", "avx512f", "fma"], "onnxruntime": None}
    assert fingerprint_differences(there, {**here, "onnxruntime": "1.32"}) == [
        "cpu_cores 4 there, 2 here", "cpu_flags avx2,avx512f,fma there, avx2,fma here"]


def test_a_table_knows_its_host_and_warns_elsewhere(table_path, capsys):
    table = LatencyTable.load(table_path)
    assert host_differences(table) == []  # measured right here
    warn_if_other_host(table)
    assert capsys.readouterr().err == ""
    table.meta["environment"] = {**table.meta["environment"], "cpu_cores": host_fingerprint("cpu")["cpu_cores"] + 6}
    warn_if_other_host(table, "hwaware search")
    err = capsys.readouterr().err
    assert err.startswith("hwaware search: warning:") and "cpu_cores" in err and f"--recalibrate {table_path}" in err
    assert len(err.strip().splitlines()) == 1


def test_recalibrate_refits_on_this_host_and_records_where_it_came_from(table_path, tmp_path):
    original = LatencyTable.load(table_path)
    path = recalibrate_table(table_path, tmp_path, fit_subnets=3, holdout_subnets=2, progress=False)
    table = LatencyTable.load(path)
    assert path.name == table_path.name and table.rows.equals(original.rows)
    info = table.meta["recalibration"]
    assert info["from"] == str(table_path) and len(info["subnets"]) == 5
    assert table.validation["n"] == 2 and info["validation_before"]["n"] == 2
    assert table.meta["calibration"]["fit_n"] == 3 and "subnets" not in table.meta
    assert all(table.predict(a) > 0 for a in (TINY.smallest(), TINY.largest()))
    with pytest.raises(HwawareError, match="is the table being recalibrated; pass --out DIR"):
        recalibrate_table(table_path, table_path.parent, fit_subnets=3, holdout_subnets=0, progress=False)
    with pytest.raises(HwawareError, match="--fit-subnets must be at least 3"):
        recalibrate_table(table_path, tmp_path, fit_subnets=2, progress=False)


def test_cli_recalibrate_prints_before_and_after(table_path, tmp_path):
    result = subprocess.run([sys.executable, "-m", "hwaware", "profile", "--recalibrate", str(table_path), "--out",
                             str(tmp_path), "--fit-subnets", "3", "--holdout-subnets", "2", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "held-out before recalibration: n=2" in result.stdout and "held-out after recalibration: n=2" in result.stdout
    assert json.loads((tmp_path / table_path.with_suffix(".json").name).read_text())["recalibration"]["seed"] == 0


def test_cli_recalibrate_of_a_missing_table_is_one_line_and_creates_no_folder(tmp_path, capsys):
    from hwaware.cli import main

    out = tmp_path / "new"
    assert main(["profile", "--recalibrate", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_validate_reports_without_rewriting_the_table(table_path):
    from hwaware.latency.recalibrate import validate_table

    before = (table_path.read_bytes(), table_path.with_suffix(".json").read_bytes())
    report = validate_table(table_path, count=2, seed=1, progress=False)
    assert report["n"] == 2 and report["seed"] == 1 and report["mape"] >= 0
    assert (table_path.read_bytes(), table_path.with_suffix(".json").read_bytes()) == before
