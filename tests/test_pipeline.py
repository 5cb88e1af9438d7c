"""Search, export and bench from a real (briefly trained) digits checkpoint, through the CLI a user types."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hwaware.space import BUILTIN_SPACES, load_arch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "latency_tables" / "cpu-onnxruntime-fp32-digits-b1.csv"
SMALL_SEARCH = ["--population", "12", "--generations", "3", "--parents", "4", "--mutation-children", "4",
                "--crossover-children", "4", "--quiet"]




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hwaware.train import train_supernet

    out = tmp_path_factory.mktemp("run") / "digits"
    train_supernet(space="digits", data="digits", out=str(out), epochs=2, threads=1, progress=False)
    return out / "last.pt"


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The committed CPU digits table, in a folder of its own so `--device cpu` finds it."""
    folder = tmp_path_factory.mktemp("tables")
    for suffix in (".csv", ".json"):
        shutil.copy(TABLE.with_suffix(suffix), folder / TABLE.with_suffix(suffix).name)
    return folder


def _one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_search_export_bench(run_cli, checkpoint, tables, tmp_path):
    out = tmp_path / "search"
    result = run_cli("search", "--checkpoint", checkpoint, "--device", "cpu", "--tables", tables,
                     "--latency-ms", "0.15,0.2", "--params-m", "0.1", "--out", out, *SMALL_SEARCH)
    assert result.returncode == 0, result.stderr
    space = BUILTIN_SPACES["digits"]
    best = sorted(out.glob("best_*.yaml"))
    assert len(best) == 2
    for path in (out / "candidates.csv", out / "pareto.csv", out / "pareto.png"):
        assert path.stat().st_size > 0
    arch = load_arch(best[0], space)

    from hwaware.latency import LatencyTable

    assert LatencyTable.load(TABLE).predict(arch) <= 0.2

    export_dir = tmp_path / "digits-vit"
    result = run_cli("export", "--checkpoint", checkpoint, "--arch", best[0], "--format", "timm,onnx,triton",
                     "--device", "cpu", "--tables", tables, "--out", export_dir)
    assert result.returncode == 0, result.stderr
    card = json.loads((export_dir / "card.json").read_text())
    assert card["arch"] == arch.to_dict()
    assert 0 <= card["test_top1"] <= 1 and card["predicted_latency_ms"] > 0

    import torch

    import hwaware
    from hwaware.evaluation import load_supernet

    supernet, _ = load_supernet(checkpoint)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(hwaware.load_model(export_dir)(x), supernet(x, arch), atol=1e-5)

    result = run_cli("bench", export_dir, "--device", "cpu", "--tables", tables, "--json")
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert bench["measured_ms"] > 0 and bench["predicted_ms"] == pytest.approx(card["predicted_latency_ms"])
    assert json.loads((export_dir / "card.json").read_text())["measured_latency_ms"] == bench["measured_ms"]


@pytest.mark.parametrize(
    "budget, message",
    [
        (["--latency-ms", "0"], "budget latency_ms"),
        (["--latency-ms", "-1"], "budget latency_ms"),
        (["--latency-ms", "fast"], "budget latency_ms"),
        (["--latency-ms", "0.001"], "the cheapest reaches"),
        (["--params-m", "0.0001"], "the cheapest reaches"),
    ],
)
def test_search_bad_budgets_leave_nothing(run_cli, checkpoint, tables, tmp_path, budget, message):
    out = tmp_path / "search"
    result = run_cli("search", "--checkpoint", checkpoint, "--device", "cpu", "--tables", tables, *budget,
                     "--out", out, *SMALL_SEARCH)
    _one_line_error(result, message)
    assert not out.exists()


def test_search_names_the_profile_command_for_a_missing_table(run_cli, checkpoint, tmp_path):
    result = run_cli("search", "--checkpoint", checkpoint, "--device", "cpu", "--tables", tmp_path / "none",
                     "--latency-ms", "1", "--out", tmp_path / "s")
    _one_line_error(result, "hwaware profile --device cpu --space digits")


def test_search_refuses_a_table_for_another_space(run_cli, checkpoint, tmp_path):
    other = ROOT / "latency_tables" / "cpu-onnxruntime-fp32-autoformer-t-timm-b1.csv"
    result = run_cli("search", "--checkpoint", checkpoint, "--table", other, "--latency-ms", "1",
                     "--out", tmp_path / "s")
    _one_line_error(result, "autoformer-t")


def test_export_refuses_bad_requests(run_cli, checkpoint, tmp_path):
    _one_line_error(run_cli("export", "--checkpoint", checkpoint, "--arch", "largest", "--format", "tflite",
                            "--out", tmp_path / "e"), "tflite")
    arch = tmp_path / "big.yaml"
    arch.write_text("embed_dim: 96\nnum_heads: [1]\nmlp_ratio: [2]\n")
    _one_line_error(run_cli("export", "--checkpoint", checkpoint, "--arch", arch, "--out", tmp_path / "e"),
                    "embed_dim 96")
    assert not (tmp_path / "e").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not an export")
    _one_line_error(run_cli("export", "--checkpoint", checkpoint, "--arch", "smallest", "--out", taken), "exists")


@pytest.mark.slow
def test_pipeline_runs_and_resumes(tmp_path):
    """The README's main job, end to end (minutes) in a real process: a second run finds every stage done."""

    def run_cli(*args):
        return subprocess.run([sys.executable, "-m", "hwaware.cli", *map(str, args)], capture_output=True, text=True)

    out = tmp_path / "pipeline"
    first = run_cli("pipeline", "--out", out, "--quiet")
    assert first.returncode == 0, first.stderr
    report = (out / "report.md").read_text()
    assert "measured latency" in report and len(list(out.glob("search-*ms/pareto.png"))) == 1
    again = run_cli("pipeline", "--out", out, "--quiet")
    assert again.returncode == 0, again.stderr
    assert first.stdout.split("budget")[1].split(",")[0] == again.stdout.split("budget")[1].split(",")[0]
