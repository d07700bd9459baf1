"""One writer per run: a second writer exits 2 naming the holder; a dead holder's lock is taken over;
the ranks of one torchrun job share their job's lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from winnow.pipeline import lock
from winnow.pipeline.store import RunDir, UserError

from cli_runner import run_cli


def _holder(run, **over) -> dict:
    now = time.time()
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": "ingest",
        "since": now - 5,
        "heartbeat": now,
        "job": None,
    } | over
    (run / lock.LOCK).write_text(json.dumps(info))
    return info


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_second_writer_exits_2_naming_the_holder(tmp_path, chatml_model_dir):
    (tmp_path / "in.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2."}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    _holder(run, pid=os.getppid(), step="score:current")  # a live process on this host
    code, _, err = run_cli("ingest", tmp_path / "in.jsonl", "--run", run, "--model", chatml_model_dir)
    assert (
        code == 2 and f"pid {os.getppid()}" in err and "score:current" in err and socket.gethostname() in err
    )
    assert not (run / "samples").exists() and not (run / "plan.json").exists()  # nothing read or written
    # the holder finishes: the same command now runs and leaves no lock behind
    (run / lock.LOCK).unlink()
    code, _, err = run_cli("ingest", tmp_path / "in.jsonl", "--run", run, "--model", chatml_model_dir)
    assert code == 0, err
    assert not (run / lock.LOCK).exists()


@pytest.mark.parametrize(
    "over",
    [
        {"pid": None},  # same host, pid gone (filled in below)
        {"host": "elsewhere", "heartbeat": 0.0},  # another host, no heartbeat for long
        {},  # garbage lock file, older than STALE_S (written below)
    ],
)
def test_dead_holder_is_taken_over_with_a_warning(tmp_path, capsys, over):
    rd = RunDir(tmp_path / "run", create=True)
    if over == {}:
        (rd.root / lock.LOCK).write_bytes(b"\x00garbage")
        old = time.time() - lock.STALE_S - 5
        os.utime(rd.root / lock.LOCK, (old, old))
    else:
        _holder(rd.root, **(over | ({"pid": _dead_pid()} if "pid" in over else {})))
    with lock.run_lock(rd, "select") as info:
        assert json.loads((rd.root / lock.LOCK).read_text())["pid"] == os.getpid() == info["pid"]
    assert "taking over the lock" in capsys.readouterr().err
    assert not (rd.root / lock.LOCK).exists()


def test_live_holder_on_another_host_is_not_taken_over(tmp_path):
    rd = RunDir(tmp_path / "run", create=True)
    _holder(rd.root, host="elsewhere", pid=1)
    with pytest.raises(UserError, match="elsewhere"):
        lock.acquire(rd, "ingest")


def test_ranks_of_one_job_share_its_lock(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run", create=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("RANK", "0")
    with lock.run_lock(rd, "score:current") as held:
        assert held["job"] == "torchrun:job-a"
        monkeypatch.setenv("RANK", "1")
        with lock.run_lock(rd, "score:current") as joined:  # rank 1: checks, does not take or release
            assert joined["pid"] == held["pid"]
        assert (rd.root / lock.LOCK).exists()
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
        with pytest.raises(UserError, match="another job"):
            lock.acquire(rd, "score:current")
    assert not (rd.root / lock.LOCK).exists()


def test_heartbeat_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    rd = RunDir(tmp_path / "run", create=True)
    with lock.run_lock(rd, "ingest") as info:
        first = info["heartbeat"]
        deadline = time.time() + 5
        while json.loads((rd.root / lock.LOCK).read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads((rd.root / lock.LOCK).read_text())["heartbeat"] > first
