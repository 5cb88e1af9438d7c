"""hwaware as a user installs it: a wheel with no checkout beside it finds its spaces, AutoFormer's
configs and the device profiles from any folder; a folder of your own profiles adds devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, unpacked into a folder of its own (its dependencies are this venv's)."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((base / "dist").glob("hwaware-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(base / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return base / "site"


def run(site: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hwaware", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_the_wheel_works_from_another_folder(installed, tmp_path):
    where = subprocess.run([sys.executable, "-c", "import hwaware; print(hwaware.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)
    assert where.stdout.startswith(str(installed))  # the wheel, not this checkout
    reference = subprocess.run([sys.executable, "-c", "from hwaware.reference import load_reference as r; "
                                "print(len(r()))"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
                               capture_output=True, text=True)
    assert reference.stdout.strip() == "278", reference.stderr  # the GPU reference data ship in the wheel
    spaces = run(installed, tmp_path, "space", "list")
    assert spaces.returncode == 0 and "autoformer-t" in spaces.stdout and "digits" in spaces.stdout
    released = run(installed, tmp_path, "cost", "--space", "autoformer-t", "--arch", "released", "--json")
    assert released.returncode == 0 and '"embed_dim": 192' in released.stdout
    absent = run(installed, tmp_path, "profile", "--device", "v100", "--space", "digits")
    assert absent.returncode == 2 and "v100 (NVIDIA Tesla V100" in absent.stderr and "not present" in absent.stderr


def test_a_folder_of_your_own_profiles_adds_devices_and_a_malformed_one_is_one_line(installed, tmp_path):
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "edge.yaml").write_text((ROOT / "profiles" / "cpu.yaml").read_text().replace("name: cpu", "name: edge"))
    (mine / "broken.yaml").write_text("match: [\n")
    env = {"HWAWARE_PROFILES": str(mine)}
    estimate = run(installed, tmp_path, "profile", "--device", "edge", "--space", "digits", "--estimate",
                   "--out", "t", "--calibrate-from",
                   str(ROOT / "latency_tables" / "cpu-onnxruntime-fp32-digits-b1.csv"), env=env)
    assert estimate.returncode == 0, estimate.stderr
    assert (tmp_path / "t" / "edge-onnxruntime-fp32-digits-b1-estimated.csv").is_file()
    broken = run(installed, tmp_path, "profile", "--device", "broken", "--space", "digits", env=env)
    assert broken.returncode == 2 and "broken.yaml: malformed YAML" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
