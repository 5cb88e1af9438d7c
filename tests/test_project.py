"""The project file (hwaware.yaml): recorded once, filled into later commands' missing flags, explicit flags win."""

import argparse
import subprocess
import sys

import pytest

from hwaware.cli import fill_from_project, main
from hwaware.errors import HwawareError
from hwaware.project import PROJECT_FILE, load_project, remember


def test_remember_stores_paths_relative_to_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    remember(space="digits", checkpoint="runs/p/supernet/last.pt", tables="runs/p/latency_tables", device="cpu")
    remember(outputs="runs/p")  # an update keeps what was there
    project = load_project()
    assert project.to_dict() == {"space": "digits", "checkpoint": "runs/p/supernet/last.pt",
                                 "tables": "runs/p/latency_tables", "device": "cpu", "outputs": "runs/p"}
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert load_project("..").get("checkpoint") == "../runs/p/supernet/last.pt"  # seen from where we are


def test_flags_left_out_come_from_the_project_and_explicit_flags_win(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    remember(checkpoint="ck/last.pt", device="cpu", tables="t")
    args = argparse.Namespace(checkpoint=None, device="h100", tables=None)
    filled = fill_from_project(args, "search", {"checkpoint": "checkpoint", "device": "device", "tables": "tables"})
    assert (args.checkpoint, args.device, args.tables) == ("ck/last.pt", "h100", "t") and filled == {"checkpoint", "tables"}
    assert "from hwaware.yaml: checkpoint ck/last.pt, tables t" in capsys.readouterr().err


def test_missing_required_flag_names_the_flag_and_how_to_record_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--latency-ms", "5"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint is required (there is no hwaware.yaml here" in err and len(err.strip().splitlines()) == 1
    remember(space="digits")
    assert main(["search", "--latency-ms", "5"]) == 2
    assert "hwaware.yaml has no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["space: [digits]\n", "nonsense: x\n", "a: [\n"])
def test_a_malformed_project_file_is_one_line(tmp_path, monkeypatch, capsys, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / PROJECT_FILE).write_text(text)
    assert main(["search", "--latency-ms", "5"]) == 2
    err = capsys.readouterr().err
    assert "project: " in err and len(err.strip().splitlines()) == 1
    with pytest.raises(HwawareError):
        load_project()


def test_init_records_validated_values(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--space", "nope"]) == 2 and not (tmp_path / PROJECT_FILE).exists()
    capsys.readouterr()
    assert main(["init", "--space", "digits", "--device", "cpu", "--tables", "tables"]) == 0
    assert "space: digits" in capsys.readouterr().out
    assert load_project().get("tables") == "tables"


def test_profile_takes_space_and_tables_from_the_project(tmp_path):
    """`hwaware profile --device v100` with nothing else: the space comes from hwaware.yaml, then the device
    (absent here) is refused in one line, quickly, before torch is imported."""
    (tmp_path / PROJECT_FILE).write_text("space: digits\ntables: tabs\n")
    result = subprocess.run([sys.executable, "-m", "hwaware", "profile", "--device", "v100"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "hwaware profile: from hwaware.yaml: space digits, out tabs"
    assert "v100" in lines[1] and "not present" in lines[1] and len(lines) == 2


@pytest.mark.parametrize("extra", [["--params-m", "0.05"], ["--latency-ms", "1", "--table", "t4.csv"]])
def test_the_projects_device_prices_latency_budgets_only_and_never_overrides_a_table(tmp_path, monkeypatch, capsys,
                                                                                    extra):
    monkeypatch.chdir(tmp_path)
    remember(checkpoint="missing.pt", device="cpu", tables="t")
    assert main(["search", *extra]) == 2
    err = capsys.readouterr().err
    assert "from hwaware.yaml: checkpoint missing.pt" in err and "device" not in err.splitlines()[0]
    assert "missing.pt: no such file" in err.splitlines()[1]


def test_a_refused_command_leaves_the_project_file_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    remember(space="animals", device="t4", checkpoint="mine/last.pt")
    before = (tmp_path / PROJECT_FILE).read_text()
    (tmp_path / "afile").write_text("not a folder")
    assert main(["pipeline", "--out", "afile"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / PROJECT_FILE).read_text() == before


def test_concurrent_updates_lose_nothing(tmp_path):
    fields = {"space": "digits", "device": "cpu", "tables": "t", "outputs": "o", "checkpoint": "c/last.pt"}
    code = "import sys; from hwaware.project import remember; remember(**{sys.argv[1]: sys.argv[2]})"
    writers = [subprocess.Popen([sys.executable, "-c", code, k, v], cwd=tmp_path) for k, v in fields.items()]
    assert [w.wait(timeout=120) for w in writers] == [0] * len(fields)
    assert load_project(tmp_path).to_dict() == fields


@pytest.mark.parametrize("spoil", ["malformed", "a folder"])
def test_a_command_that_cannot_record_the_project_keeps_its_success(tmp_path, monkeypatch, capsys, spoil):
    import json

    from safetensors.torch import load_file

    from tests.test_autoformer import FIXTURES, SPACE_FILE, official_checkpoint

    monkeypatch.chdir(tmp_path)
    if spoil == "malformed":
        (tmp_path / PROJECT_FILE).write_text("space: [unclosed\n")
    else:
        (tmp_path / PROJECT_FILE).mkdir()
    weights = {n.removeprefix("model."): t.float() for n, t in load_file(FIXTURES / "autoformer_tiny.safetensors").items()
               if n.startswith("model.")}
    args = json.loads((FIXTURES / "autoformer_tiny.json").read_text())["args"]
    ckpt = official_checkpoint(tmp_path / "c.pth", weights, args)
    status = main(["import", "autoformer", str(ckpt), "--space", str(SPACE_FILE), "--out", "imported"])
    captured = capsys.readouterr()
    assert status == 0 and "hwaware import: warning: hwaware.yaml not updated" in captured.err
    assert "records space" not in captured.out and (tmp_path / "imported" / "last.pt").is_file()
