"""A latency table read from disk is validated, not trusted: edits with a recomputed checksum, renamed
files, malformed sidecar fields and unsafe names are each one line."""

import hashlib
import json
import shutil

import pytest

from hwaware.errors import HwawareError
from hwaware.latency import LatencyTable
from hwaware.latency.table import table_name
from hwaware.space import CONFIG_DIR

COMMITTED = CONFIG_DIR.parents[1] / "latency_tables" / "cpu-onnxruntime-fp32-digits-b1.csv"


@pytest.fixture
def table(tmp_path):
    csv = tmp_path / COMMITTED.name
    shutil.copy(COMMITTED, csv)
    shutil.copy(COMMITTED.with_suffix(".json"), csv.with_suffix(".json"))
    return csv


def edit_csv(csv, change):
    """Change the CSV and recompute the sidecar's checksum, as a careful tamperer would."""
    lines = csv.read_text().splitlines()
    lines = change(lines)
    data = ("\n".join(lines) + "\n").encode()
    csv.write_bytes(data)
    meta = json.loads(csv.with_suffix(".json").read_text())
    meta.update(csv_sha256=hashlib.sha256(data).hexdigest(), rows=len(lines) - 1)
    csv.with_suffix(".json").write_text(json.dumps(meta))


def edit_meta(csv, change):
    meta = json.loads(csv.with_suffix(".json").read_text())
    change(meta)
    csv.with_suffix(".json").write_text(json.dumps(meta))


def test_the_committed_table_loads(table):
    assert LatencyTable.load(table).predict(LatencyTable.load(table).space.smallest()) > 0


@pytest.mark.parametrize("change, message", [
    (lambda lines: [lines[0], lines[1].replace(lines[1].split(",")[5], "-0.2", 1), *lines[2:]],
     "must be finite and positive"),
    (lambda lines: [*lines, lines[1]], "twice"),
    (lambda lines: [lines[0], lines[1].replace(lines[1].split(",")[0], "block-dX", 1), *lines[2:]], "is not a piece"),
])
def test_an_edited_csv_with_a_recomputed_checksum_is_refused(table, change, message):
    edit_csv(table, change)
    with pytest.raises(HwawareError, match=message):
        LatencyTable.load(table)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(calibration="fast"), "calibration must be a mapping"),
    (lambda m: m.update(calibration=[1, 2, 3]), "calibration must be a mapping"),
    (lambda m: m["calibration"].update(scale=-1.0), "scale must be positive"),
    (lambda m: m.update(statistic="mean"), "statistic must be median or min"),
    (lambda m: m.update(batch_size=0), "batch_size must be a positive integer"),
    (lambda m: m.update(estimated=True), "holds cpu-onnxruntime-fp32-digits-b1-estimated.csv by its sidecar"),
    (lambda m: m.update(device="h200"), "holds h200-onnxruntime-fp32-digits-b1.csv"),
])
def test_malformed_or_mismatched_sidecar_fields_are_one_line(table, change, message):
    edit_meta(table, change)
    with pytest.raises(HwawareError, match=message):
        LatencyTable.load(table)


def test_nan_in_a_sidecar_is_refused(table):
    side = table.with_suffix(".json")
    side.write_text(side.read_text().replace('"scale": ', '"scale": NaN, "was": ', 1))
    with pytest.raises(HwawareError, match="NaN is not a number"):
        LatencyTable.load(table)


def test_a_space_name_cannot_lead_a_table_out_of_its_folder():
    with pytest.raises(HwawareError, match="space name 'x/../../escaped' is not a plain name"):
        table_name("cpu", "onnxruntime", "fp32", "x/../../escaped", 1)
    assert table_name("cpu", "onnxruntime", "fp32", "autoformer-t", 1) == "cpu-onnxruntime-fp32-autoformer-t-b1.csv"


def test_a_noisy_fit_falls_back_to_a_positive_scale():
    from hwaware.latency.table import Calibration

    noisy = Calibration.fit([1.0, 2.0, 3.0], [3, 4, 5], [3.0, 2.0, 1.0])  # anti-correlated: scale would be < 0
    assert noisy.scale > 0 and noisy.per_piece == 0 and noisy.intercept == 0
    clean = Calibration.fit([1.0, 2.0, 3.0, 4.0], [3, 4, 5, 3], [1.5, 2.6, 3.7, 4.2])
    assert clean.scale > 0 and clean.apply(2.0, 4) == pytest.approx(2.6, rel=0.05)
