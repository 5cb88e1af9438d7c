"""Hostile conditions at the edges: locked folders, bounded reads, permissions, non-finite weights, and
every failure as one line on stderr."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hwaware.checkpoint import check_finite
from hwaware.cli import main
from hwaware.errors import HwawareError
from hwaware.io import LOCK_FILE, atomic_write_text, folder_lock, read_text_file


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["pipeline", "--latency-ms", "nan"], "--latency-ms: must be a finite number"),
    (["bench", "x", "--batch", "0"], "--batch: must be a finite number in 1..65536"),
    (["bench", "x", "--batch", "-1"], "--batch: must be a finite number"),
    (["profile", "--device", "cpu", "--min-time", "inf"], "--min-time: must be a finite number"),
    (["profile", "--device", "cpu", "--fit-subnets", "100000000"], "--fit-subnets: must be a finite number in 2..1000"),
    (["search", "--latency-ms", "5", "--population", "1e9"], "--population: expected an integer"),
])
def test_numeric_flags_are_range_checked_while_parsing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_second_process_is_told_who_holds_the_folder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    with folder_lock(tmp_path, "search"):
        child = subprocess.run([sys.executable, "-c", (
            "import sys; from hwaware.io import folder_lock\n"
            "from hwaware.errors import HwawareError\n"
            f"try:\n    folder_lock({str(tmp_path)!r}, 'search').__enter__()\n"
            "except HwawareError as e:\n    print(e)")], capture_output=True, text=True, timeout=60)
        assert f"is in use by hwaware search (pid {os.getpid()}" in child.stdout
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "command": "profile"}}')
    with folder_lock(tmp_path, "profile") as lock:
        assert str(os.getpid()) in lock.read_text()


def test_reads_refuse_fifos_devices_and_huge_files_before_reading(tmp_path):
    fifo = tmp_path / "arch.yaml"
    os.mkfifo(fifo)
    with pytest.raises(HwawareError, match="is not a regular file"):
        read_text_file(fifo, "arch")
    with pytest.raises(HwawareError, match="is not a regular file"):
        read_text_file("/dev/zero", "arch")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(HwawareError, match="over the 0 MiB limit"):
        read_text_file(big, "arch", max_bytes=1024)


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "table.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "table.json").stat().st_mode) == 0o644


def test_non_finite_weights_are_refused_naming_the_tensor():
    state = {"blocks.0.attn.qkv.weight": torch.ones(2), "head.weight": torch.tensor([1.0, float("nan")])}
    with pytest.raises(HwawareError, match="head.weight holds non-finite values"):
        check_finite(state, "last.pt")
    check_finite({"w": torch.ones(3), "step": torch.tensor(3)}, "ok.pt")


def test_unexpected_errors_and_os_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import hwaware.cli.space as space_cli

    monkeypatch.setattr(space_cli, "cmd_space_list", lambda args: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
    monkeypatch.setattr(space_cli, "cmd_cost", lambda args: open(tmp_path / "missing" / "x"))
    assert main(["space", "list"]) == 1
    assert one_line(capsys.readouterr().err) == ("hwaware space: unexpected error: RuntimeError: boom "
                                                 "(rerun with --debug for the traceback)")
    assert main(["cost", "--space", "digits", "--arch", "largest"]) == 2
    assert "No such file or directory" in one_line(capsys.readouterr().err)


def test_version_module_entry_and_a_closed_pipe():
    version = subprocess.run([sys.executable, "-m", "hwaware", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("hwaware ")
    piped = subprocess.run(f"{sys.executable} -m hwaware space list | head -c 1", shell=True, capture_output=True,
                           text=True, timeout=60)
    assert piped.stderr == ""


def test_yaml_inputs_that_would_hang_or_mislead_are_one_line(tmp_path, capsys):
    bomb = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]\n"
    files = {
        "bomb.yaml": bomb + "embed_dim: *i\ndepth: 1\nnum_heads: [1]\nmlp_ratio: [2]\n",  # 9**9 when printed
        "heads.yaml": "embed_dim: 32\ndepth: 2\nnum_heads: [1.7, 2]\nmlp_ratio: [2, 2]\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    os.mkfifo(tmp_path / "fifo.yaml")
    for name, message in [("bomb.yaml", "embed_dim must be an integer, got [[[...]"),
                          ("heads.yaml", "num_heads[0] must be a whole number, got 1.7"),
                          ("fifo.yaml", "is not a regular file")]:
        assert main(["cost", "--space", "digits", "--arch", str(tmp_path / name)]) == 2
        err = one_line(capsys.readouterr().err)
        assert message in err and len(err) < 300


def test_a_space_name_that_would_leave_its_folder_is_refused(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text('name: "x/../../../escaped"\nembed_dims: [8]\ndepths: [1]\nnum_heads: [1]\nmlp_ratios: [2]\n')
    assert main(["space", "show", str(space)]) == 2
    assert "name 'x/../../../escaped' is not a plain name" in one_line(capsys.readouterr().err)


def test_an_exports_clean_up_leaves_a_sibling_exports_staging_alone(tmp_path):
    import tempfile

    from hwaware.pipeline import export_lock

    dead = Path(tempfile.mkdtemp(prefix=".model.", suffix=".tmp", dir=tmp_path))  # a killed export of model/
    sibling = Path(tempfile.mkdtemp(prefix=".model.int8.", suffix=".tmp", dir=tmp_path))  # model.int8/ in progress
    with export_lock(tmp_path / "model"):
        pass
    assert not dead.exists() and sibling.exists()


# ---- preemption: SIGTERM as Slurm, Kubernetes and `docker stop` send it ----------------------------

def test_sigterm_stops_training_at_the_next_step_with_a_checkpoint_and_one_line(tmp_path, capsys):
    import threading

    from hwaware.checkpoint import read_checkpoint

    out = tmp_path / "run"
    sent = []

    def preempt():  # as a scheduler would: once the run is under way
        while not (out / "run.json").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    status = main(["train", "--space", "digits", "--data", "digits", "--out", str(out), "--epochs", "50",
                   "--batch-size", "64", "--checkpoint-every", "0", "--quiet"])
    assert status == 143 and time.monotonic() - sent[0] < 30
    assert f"hwaware train: stopped by SIGTERM after writing {out}/last.pt at step" in one_line(capsys.readouterr().err)
    state = read_checkpoint(out / "last.pt")
    assert state["step"] >= 1 and not state["complete"]
    assert {p.name for p in out.iterdir()} <= {"last.pt", "metrics.csv", "run.json"}  # no temporary, no lock


def test_sigterm_outside_a_safe_point_stops_at_once_and_a_stuck_one_within_the_grace(monkeypatch):
    from hwaware.stopping import Stopped, deferred_stop, stop_requested, stop_signals_handled

    with stop_signals_handled():
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        assert stopped.value.exit_status == 143
        monkeypatch.setenv("HWAWARE_STOP_GRACE", "0.3")
        started = time.monotonic()
        with pytest.raises(Stopped), deferred_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop_requested()  # the safe point would see it; this block never reaches one
            time.sleep(10)
        assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI hands the old handlers back
    monkeypatch.setenv("HWAWARE_STOP_GRACE", "nan")
    assert main(["space", "list"]) == 2


@pytest.mark.skipif(subprocess.run(["unshare", "-rpf", "true"], capture_output=True).returncode != 0
                    if shutil.which("unshare") else True, reason="cannot start a PID namespace here (unshare -rpf)")
def test_sigterm_reaches_hwaware_running_as_pid_1_in_a_container(tmp_path):
    """The kernel drops a signal to a namespace's pid 1 that has no handler: `docker stop` then waits for SIGKILL."""
    code = ("import os, sys, time\nfrom hwaware.stopping import Stopped, stop_signals_handled\n"
            "assert os.getpid() == 1\nwith stop_signals_handled():\n    try:\n        print('ready', flush=True)\n"
            "        time.sleep(60)\n    except Stopped as stop:\n        sys.exit(stop.exit_status)\n")  # ready inside the try: no race
    box = subprocess.Popen(["unshare", "-rpf", sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert box.stdout.readline() == "ready\n"
        children = Path(f"/proc/{box.pid}/task/{box.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)
        assert box.wait(timeout=20) == 143
    finally:
        box.kill()
        box.wait()



class _StopSignalsInWorker(torch.utils.data.Dataset):
    """Item i: whether the worker ignores SIGTERM; item 3 raises, as a bad image does."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index == 3:
            raise ValueError("item 3")
        return int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)


def test_training_loader_workers_leave_a_stop_to_the_training():
    from hwaware.data import build_run_loader

    batches = list(build_run_loader(torch.utils.data.Subset(_StopSignalsInWorker(), [0, 1]), 1, False, num_workers=1))
    assert [int(batch) for batch in batches] == [1, 1]


def test_a_loader_whose_worker_raised_does_not_hang_the_exit():
    """multiprocessing ends workers at exit with SIGTERM, which they ignore, and then waits for them:
    a loader kept alive by its error (a bad image's one line) hung pytest itself for CI's 90 minutes."""
    code = ("import sys\nfrom hwaware.data import dataloader\nfrom tests.test_reliability import _StopSignalsInWorker\n"
            "try:\n    list(dataloader(_StopSignalsInWorker(), num_workers=1, persistent_workers=True))\n"
            "except ValueError as error:\n    kept = error\n    print('raised', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout == "raised\n", result.stderr
    assert "Traceback" not in result.stderr and "killed by signal" not in result.stderr, result.stderr


# ---- a full disk while a checkpoint is written --------------------------------------------------

def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import builtins
    import errno

    import hwaware.checkpoint as checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.ones(4)})
    real_open = builtins.open

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 2048:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(HwawareError, match=f"no space left on device writing {path}; the previous checkpoint"):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.ones(100_000)})
    assert checkpoint.read_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]

    from hwaware.stopping import Stopped

    class StoppedMidWrite(FullDisk):  # a second SIGTERM while the checkpoint is written
        def write(self, data):
            raise Stopped(signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: StoppedMidWrite(real_open(*a, **k)), raising=False)
    with pytest.raises(Stopped):  # not torch's 'unexpected pos' RuntimeError
        checkpoint.save_checkpoint(path, {"step": 3, "w": torch.ones(10)})
    assert checkpoint.read_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.skipif(subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                                   capture_output=True).returncode != 0 if shutil.which("unshare") else True,
                    reason="cannot mount a small tmpfs here (needs unshare -rm and tmpfs in a user namespace)")
def test_a_really_full_tmpfs_during_a_checkpoint_write(tmp_path):
    code = ("import torch, sys\nfrom hwaware.checkpoint import save_checkpoint, read_checkpoint\n"
            "from hwaware.errors import HwawareError\n"
            "save_checkpoint(sys.argv[1] + '/last.pt', {'step': 1, 'w': torch.ones(1000)})\n"
            "try:\n    save_checkpoint(sys.argv[1] + '/last.pt', {'step': 2, 'w': torch.ones(1_000_000)})\n"
            "except HwawareError as e:\n    print(e)\n"
            "print(read_checkpoint(sys.argv[1] + '/last.pt')['step'])\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "$1" && '
                          f'"{sys.executable}" -c "$2" "$1" && ls -A "$1"', "sh", str(disk), code],
                         capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and "no space left on device writing" in lines[0], run.stderr
    assert lines[1:] == ["1", "last.pt"]  # the previous checkpoint whole, no temporary left


# ---- tables, device profiles: the CLI's bounds hold for what is read from disk ----------------------

REPO = Path(__file__).resolve().parents[1]
DIGITS_TABLE = "cpu-onnxruntime-fp32-digits-b1"


def _table_copy(tmp_path: Path, **changes) -> Path:
    import json

    shutil.copy(REPO / "latency_tables" / f"{DIGITS_TABLE}.csv", tmp_path)
    meta = json.loads((REPO / "latency_tables" / f"{DIGITS_TABLE}.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = meta
        for parent in parents:
            node = node[parent]
        node[key] = value
    (tmp_path / f"{DIGITS_TABLE}.json").write_text(json.dumps(meta))
    return tmp_path / f"{DIGITS_TABLE}.csv"


@pytest.mark.parametrize("changes, message", [
    ({"calibration__intercept": -10}, "a correction must keep every prediction positive"),
    ({"settings__warmup": 1e10}, "warmup must be in 0..100000"),
    ({"settings__max_repeats": 10**12}, "max_repeats must be in 1..10000000"),
    ({"settings__threads": 5000}, "threads must be in 1..1024"),
])
def test_a_sidecar_that_would_mislead_or_hang_bench_is_refused(tmp_path, changes, message):
    from hwaware.latency.table import LatencyTable

    with pytest.raises(HwawareError, match=message):
        LatencyTable.load(_table_copy(tmp_path, **changes))


def test_a_sidecar_is_covered_by_its_own_checksum(tmp_path):
    import json

    from hwaware.latency.table import LatencyTable

    table = LatencyTable.load(_table_copy(tmp_path))
    out = tmp_path / "saved"
    table.save(out / f"{DIGITS_TABLE}.csv")
    LatencyTable.load(out / f"{DIGITS_TABLE}.csv")
    side = out / f"{DIGITS_TABLE}.json"
    meta = json.loads(side.read_text())
    meta["calibration"]["scale"] *= 0.5  # in range, but not what was measured
    side.write_text(json.dumps(meta))
    with pytest.raises(HwawareError, match="does not match its own checksum"):
        LatencyTable.load(out / f"{DIGITS_TABLE}.csv")


@pytest.mark.parametrize("change, message", [
    ({"peak": {"flops": {"fp32": -1e12}}}, "peak.flops.fp32 must be a positive FLOP/s figure"),
    ({"peak": {"flops": {"fp32": 1e12}, "memory_bandwidth": -5e10}}, "peak.memory_bandwidth must be a positive"),
    ({"measurement": {"warmup": 10**10}}, "warmup must be in 0..100000"),
])
def test_a_device_profile_with_negative_peaks_or_endless_settings_is_refused(tmp_path, monkeypatch, change, message):
    import yaml

    from hwaware.latency.devices import load_device_profile, profile_dirs

    profile = yaml.safe_load((profile_dirs()[-1] / "cpu.yaml").read_text())
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump({**profile, **change}))
    monkeypatch.setenv("HWAWARE_PROFILES", str(tmp_path))
    with pytest.raises(HwawareError, match=message):
        load_device_profile("hostile")


def test_one_held_out_subnet_prints_without_a_ranking(capsys):
    from hwaware.cli.profile import _print_validation

    _print_validation("held-out validation", {"n": 1, "mape": 0.1, "within_5pct": 0.0, "within_10pct": 1.0,
                                              "kendall_tau": None})
    assert "Kendall tau n/a (needs 2 subnets)" in capsys.readouterr().out


@pytest.mark.parametrize("setting, message", [("num_random: 1000000", "num_random: must be in 0..64"),
                                              ("threads: 100000", "threads: must be in 0..1024"),
                                              ("epochs: 1.0e+300", "epochs: must be in 1..100000")])
def test_a_recipe_meets_the_bounds_of_the_train_flags(tmp_path, capsys, setting, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(setting + "\n")
    assert main(["train", "--space", "digits", "--data", "digits", "--out", str(tmp_path / "run"),
                 "--recipe", str(recipe)]) == 2
    assert message in one_line(capsys.readouterr().err) and not (tmp_path / "run").exists()


# ---- importing a hostile checkpoint ---------------------------------------------------------------

def test_a_deflated_checkpoint_that_would_expand_to_gigabytes_is_refused_unread(tmp_path, capsys):
    import io
    import zipfile

    from tests.test_autoformer import SPACE_FILE

    raw = io.BytesIO()
    torch.save({"model": {"cls_token": torch.zeros(50_000_000, dtype=torch.uint8)}}, raw)  # 50 MB of zeros
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(raw) as stored, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as deflated:
        for entry in stored.infolist():
            deflated.writestr(entry.filename, stored.read(entry))
    del raw
    assert bomb.stat().st_size < 1 << 20
    assert main(["import", "autoformer", str(bomb), "--space", str(SPACE_FILE), "--out", str(tmp_path / "x")]) == 2
    err = one_line(capsys.readouterr().err)  # refused from the zip directory, before torch.load decompressed it
    assert "data/0 declares 47.7 MiB, more than the largest tensor of this space" in err, err
    assert not (tmp_path / "x").exists()


# ---- no "unexpected error" for hostile YAML -----------------------------------------------------

@pytest.mark.parametrize("text, message", [("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
                                           ("a: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64 levels"),
                                           ("embed_dim: " + "9" * 5000 + "\n", "Exceeds the limit (4300 digits)")])
def test_deep_yaml_and_huge_integers_are_one_line_wherever_yaml_is_read(tmp_path, monkeypatch, capsys, text, message):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(text)
    assert main(["cost", "--space", "digits", "--arch", str(hostile)]) == 2
    assert message in one_line(capsys.readouterr().err)
    assert main(["train", "--space", "digits", "--data", "digits", "--out", str(tmp_path / "r"), "--recipe", str(hostile)]) == 2
    assert message in one_line(capsys.readouterr().err)
    monkeypatch.chdir(tmp_path)
    shutil.copy(hostile, tmp_path / "hwaware.yaml")
    assert main(["search", "--latency-ms", "5"]) == 2
    assert message in one_line(capsys.readouterr().err)


def test_too_few_open_files_for_the_loader_workers_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (16, 16))
    assert main(["train", "--space", "digits", "--data", "digits", "--out", str(tmp_path / "r"), "--workers", "2"]) == 2
    assert "need at least 32 open files, and the limit (ulimit -n) is 16" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_too_few_open_files_for_the_loader_workers_is_one_line_not_a_hang(tmp_path):
    run = subprocess.run(["sh", "-c", f'ulimit -n 16 && exec "{sys.executable}" -m hwaware train --space digits '
                          f'--data digits --out "{tmp_path / "r"}" --workers 2 --quiet'],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "need at least 32 open files" in one_line(run.stderr)


def test_running_out_of_memory_says_so_and_exits_1(tmp_path, monkeypatch, capsys):
    import hwaware.cli.space as space_cli

    for error in (MemoryError(), ImportError("libtorch_cpu.so: failed to map segment from shared object"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")):
        monkeypatch.setattr(space_cli, "cmd_space_list", lambda args, error=error: (_ for _ in ()).throw(error))
        assert main(["space", "list"]) == 1
        assert one_line(capsys.readouterr().err).startswith("hwaware space: out of memory (")
    limited = subprocess.run(["sh", "-c", f'ulimit -v 400000 && exec "{sys.executable}" -m hwaware train --space '
                              f'digits --data digits --out "{tmp_path / "r"}" --quiet'], capture_output=True, text=True,
                             timeout=120)
    assert limited.returncode == 1 and "out of memory" in one_line(limited.stderr)


# ---- export: which checkpoint state, and modes that follow the umask --------------------------------

def test_an_export_card_names_the_checkpoint_state_and_warns_while_its_run_trains(tmp_path, capsys):
    from hwaware.io import file_sha256
    from hwaware.pipeline import export_checkpoint
    from hwaware.train import train_supernet

    run = tmp_path / "run"
    train_supernet(space="digits", data="digits", out=str(run), epochs=1, batch_size=256, strategy="uniform",
                   threads=1, progress=False)
    old = os.umask(0o022)
    try:
        with folder_lock(run, "train"):  # as a training still at work there holds it
            result = export_checkpoint(run / "last.pt", "smallest", tmp_path / "export", formats="timm")
    finally:
        os.umask(old)
    state = result.card["checkpoint_state"]
    assert state["epoch"] == 1 and state["complete"] is True and state["sha256"] == file_sha256(run / "last.pt")
    assert "belongs to a run still training (hwaware train" in capsys.readouterr().err
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "export").rglob("*")}
    assert "export/model.safetensors" in modes and modes == {
        name: "0o755" if (tmp_path / name).is_dir() else "0o644" for name in modes}  # safetensors' own 0600 too
