"""The CLI as a user meets it: real subprocesses, one-line errors, exit status 2, no tracebacks."""

import json
import subprocess
import sys

import pytest

from hwaware.space import CONFIG_DIR

AUTOFORMER = CONFIG_DIR / "autoformer"  # AutoFormer's released configs, shipped as they are


def hwaware(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hwaware.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_space_list_and_show():
    listed = hwaware("space", "list")
    assert listed.returncode == 0 and "autoformer-t" in listed.stdout and "digits" in listed.stdout
    shown = hwaware("space", "show", "autoformer-t", "--json")
    info = json.loads(shown.stdout)
    assert info["num_subnets"] == 3 * (4**12 + 4**13 + 4**14)
    assert info["params"][0] < info["params"][1]
    assert hwaware("space", "show", str(AUTOFORMER / "AutoFormer-B.yaml")).returncode == 0


@pytest.mark.parametrize(
    "args, files, message",
    [
        (["cost", "--space", "nope", "--arch", "largest"], {}, "unknown space 'nope'"),
        (["cost", "--space", "digits", "--arch", "a.yaml"], {"a.yaml": "embed_dim: [\n"}, "malformed YAML"),
        (["cost", "--space", "digits", "--arch", "a.yaml"],
         {"a.yaml": "embed_dim: 32\ndepth: 2\nnum_heads: [1]\nmlp_ratio: [2]\n"}, "num_heads has 1 entries but depth is 2"),
        (["cost", "--space", "digits", "--arch", str(AUTOFORMER / "AutoFormer-T.yaml")], {}, "embed_dim 192"),
        (["space", "show", "s.yaml"], {"s.yaml": "embed_dims: [8]\ndepths: [1]\n"}, "missing field 'num_heads'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = hwaware(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
