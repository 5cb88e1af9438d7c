"""benchmarks/ranking.py: which subnets it picks, its rank statistics, and a whole run on digits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hwaware.pipeline import standard_costs
from hwaware.space import get_space
from hwaware.train import make_config, train_supernet

ROOT = Path(__file__).resolve().parents[1]


def _ranking():
    spec = importlib.util.spec_from_file_location("ranking", ROOT / "benchmarks" / "ranking.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spread_subnets_span_the_space_in_params():
    ranking, space = _ranking(), get_space("animals")
    archs = ranking.spread_subnets(space, 12, seed=0)
    params = [standard_costs(space)["params_m"](a) for a in archs]
    assert len(set(archs)) == 12 and all(map(space.contains, archs)) and params == sorted(params)
    assert params[-1] > 10 * params[0]  # from the smallest corner to the largest


def test_rank_correlations():
    ranking = _ranking()
    assert ranking.rank_correlations([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.9]) == pytest.approx((1.0, 1.0))
    assert ranking.rank_correlations([0.4, 0.3, 0.2, 0.1], [0.5, 0.6, 0.7, 0.9]) == pytest.approx((-1.0, -1.0))


def test_bad_supernet_argument_is_one_line(capsys):
    assert _ranking().main(["--space", "digits", "--data", "digits", "--supernet", "no-equals-sign"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NAME=CHECKPOINT" in err


@pytest.mark.slow
def test_whole_run_on_digits(tmp_path, capsys):
    supernet = tmp_path / "supernet"
    train_supernet(make_config(space="digits", data="digits", out=str(supernet), epochs=2, batch_size=256,
                               progress=False, threads=1))
    args = ["--space", "digits", "--data", "digits", "--supernet", f"tiny={supernet}/last.pt", "--runs",
            str(tmp_path / "standalone"), "--subnets", "3", "--epochs", "2", "--jobs", "2"]
    assert _ranking().main(args) == 0
    out = capsys.readouterr().out
    assert "standalone spread" in out and "tiny: Kendall tau" in out and len(list((tmp_path / "standalone").iterdir())) == 3
    assert _ranking().main(args) == 0  # complete runs are reused, not retrained
    assert capsys.readouterr().out.split("trained standalone")[1].count("\n") > 3
