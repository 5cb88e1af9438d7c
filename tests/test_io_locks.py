"""Output-folder locks and in-place writes that hostile leftovers cannot fool: FIFOs, symlinks, huge pids,
a live holder behind a stale-looking record, a restarted container's pid 1, and links out of the folder."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hwaware.errors import HwawareError
from hwaware.io import (
    LOCK_FILE,
    ODD_LOCK_SECONDS,
    atomic_write_text,
    folder_lock,
    holder_alive,
    open_regular,
    process_identity,
)

HOLD = ("import sys, time; from hwaware.io import folder_lock\n"
        "with folder_lock(sys.argv[1], 'profile'):\n    print('held', flush=True); time.sleep(60)\n")


def _age(path, seconds):
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "folder", "dangling symlink"])
def test_a_lock_that_is_no_lock_file_is_refused_young_and_taken_over_old(tmp_path, capsys, kind):
    lock = tmp_path / LOCK_FILE
    {"fifo": lambda: os.mkfifo(lock), "symlink to /dev/zero": lambda: lock.symlink_to("/dev/zero"),
     "folder": lambda: lock.mkdir(), "dangling symlink": lambda: lock.symlink_to(tmp_path / "gone")}[kind]()
    with pytest.raises(HwawareError, match="not an hwaware lock; remove it"):  # at once: no hang on the FIFO
        folder_lock(tmp_path, "profile").__enter__()
    _age(lock, ODD_LOCK_SECONDS + 5)
    with folder_lock(tmp_path, "profile"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "took it over" in capsys.readouterr().err and not os.path.lexists(lock)


@pytest.mark.parametrize("record", ['{"pid": 99999999999999999999999, "host": "%s"}', '{"pid": true}',
                                    "garbage", '{"pid": -3, "host": "%s"}'])
def test_a_malformed_or_absurd_record_nobody_holds_is_taken_over(tmp_path, record):
    (tmp_path / LOCK_FILE).write_text(record.replace("%s", os.uname().nodename))
    with folder_lock(tmp_path, "profile") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_live_holder_keeps_the_folder_even_when_its_record_says_a_dead_pid(tmp_path):
    """The race of check-then-delete: the record is only what people read; the kernel's lock decides."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
        with pytest.raises(HwawareError, match="in use by hwaware"):
            folder_lock(tmp_path, "search").__enter__()
        holder.kill()  # SIGKILL: no clean-up ran, the record stays, the kernel dropped the lock
        holder.wait()
        with folder_lock(tmp_path, "search"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_taker_gets_the_folder_when_the_holder_ends(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("60", "1"), str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        with folder_lock(tmp_path, "init", wait=30) as lock:
            assert time.monotonic() - started > 0.5 and json.loads(lock.read_text())["command"] == "init"
    finally:
        holder.kill()
        holder.wait()


def test_a_restarted_container_and_an_unrelated_live_process_are_not_holders(tmp_path):
    me = process_identity()
    assert not holder_alive(me)  # pid 1 again after a restart: its own old record
    unrelated = subprocess.Popen(["sleep", "30"])
    cmdline = Path(f"/proc/{unrelated.pid}/cmdline")
    for _ in range(100):  # until the child shows its own command line, not the forking interpreter's
        if cmdline.exists() and cmdline.read_bytes().startswith(b"sleep"):
            break
        time.sleep(0.05)
    try:
        record = {**me, "pid": unrelated.pid, "started": "1"}  # the pid was reused by a program started later
        if me["started"]:
            assert not holder_alive(record)
        assert holder_alive({**record, "started": process_identity.__globals__["_start_time"](unrelated.pid)})
        old_format = {"pid": unrelated.pid, "host": me["host"], "command": "train"}  # as earlier hwaware wrote it
        assert not holder_alive(old_format) or not Path(f"/proc/{unrelated.pid}/cmdline").exists()  # `sleep 30`
        (tmp_path / LOCK_FILE).write_text(json.dumps(old_format))
        with folder_lock(tmp_path, "train"):
            pass
    finally:
        unrelated.kill()
        unrelated.wait()
    assert not holder_alive({**me, "pid": 123, "boot": "another-boot"}) or not me["boot"]
    assert holder_alive({**me, "host": "elsewhere"})  # cannot be checked: a holder
    (tmp_path / LOCK_FILE).write_text(json.dumps({**me, "command": "train"}))  # as SIGKILLed pid 1 left it
    with folder_lock(tmp_path, "train"):
        pass


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_lock_holder(tmp_path):
    orphan = tmp_path / ".last.pt.k3j9x_2a.tmp"
    orphan.write_bytes(b"half a checkpoint")
    project_tmp = tmp_path / ".hwaware.yaml.abcdefgh.tmp"
    project_tmp.write_text("space: digits\n")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    with folder_lock(tmp_path, "train"):
        assert not orphan.exists() and project_tmp.exists() and keep.exists()


def test_writes_in_place_never_follow_a_symlink_out_of_the_folder(tmp_path):
    from hwaware.latency.profile import PartialLog

    outside = tmp_path / "precious.csv"
    outside.write_text("kind,key\nline one\ntorn")
    partial = tmp_path / "out" / "t.csv.partial"
    partial.parent.mkdir()
    partial.symlink_to(outside)
    with pytest.raises(HwawareError, match="symlink"):
        PartialLog(partial).read()
    with pytest.raises(HwawareError, match="symlink"):
        PartialLog(partial).append([])
    with pytest.raises(HwawareError, match="not a regular file"):
        open_regular("/dev/null", "a")
    assert outside.read_text() == "kind,key\nline one\ntorn"
    atomic_write_text(partial, "x")  # an atomic write replaces the link itself
    assert outside.read_text() == "kind,key\nline one\ntorn" and not partial.is_symlink()


def test_without_filesystem_locks_the_record_decides_and_take_over_is_a_rename(tmp_path, monkeypatch):
    import hwaware.io as io

    monkeypatch.setattr(io, "_flock", lambda fd: None)  # as on a filesystem without flock
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = {**process_identity(), "pid": sleeper.pid, "command": "train"}
        live["started"] = io._start_time(sleeper.pid)
        (tmp_path / LOCK_FILE).write_text(json.dumps(live))
        with pytest.raises(HwawareError, match=f"in use by hwaware train \\(pid {sleeper.pid}"):
            folder_lock(tmp_path, "search").__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()
    with folder_lock(tmp_path, "search") as lock:  # its holder is dead now
        assert json.loads(lock.read_text())["command"] == "search"
    assert not lock.exists()
