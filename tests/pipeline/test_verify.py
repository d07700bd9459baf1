"""Verified reads: tampered shards, records, plan and manifest are reported naming the file, refused
by readers, and repaired by a rerun of the owning step; `winnow verify` exits nonzero on any problem."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from winnow.pipeline import store
from winnow.pipeline.store import RunDir

from cli_runner import WINNOW, run_cli, sql_json

ROWS = [{"question": f"What is {i} plus 7?", "answer": f"{i} plus 7 is {i + 7}."} for i in range(12)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    store.VERIFY.clear()


def _ingest(inp: Path, run: Path, model: Path, rows=ROWS) -> tuple[int, str]:
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = run_cli("ingest", inp, "--run", run, "--model", model, "--set", "shard_rows=5")
    return code, err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(run: Path) -> dict[str, str]:
    """sha256 of every data file of the run (not manifest timestamps)."""
    return {p.relative_to(run).as_posix(): _sha(p) for p in sorted(run.rglob("*.parquet"))}


def _age(path: Path) -> None:
    """Push a file's mtime into the past, as if it had been written long ago (no racy cache entry)."""
    t = time.time() - 60
    os.utime(path, (t, t))


@pytest.fixture
def built(tmp_path, chatml_model_dir):
    run = tmp_path / "run"
    code, err = _ingest(tmp_path / "in.jsonl", run, chatml_model_dir)
    assert code == 0, err
    for p in run.rglob("*.parquet"):
        _age(p)
    return run, _snapshot(run), chatml_model_dir


def _rerun(run: Path, model: Path) -> None:
    code, _, err = run_cli(
        "ingest", run.parent / "in.jsonl", "--run", run, "--model", model, "--set", "shard_rows=5"
    )
    assert code == 0, err


def _flip_bit(path: Path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    if keep_mtime:  # same size, same mtime: only a fresh hash can tell
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bit_flip_is_refused_and_repaired(built):
    run, before, model = built
    shard = run / "samples" / "part-00001.parquet"
    assert sql_json(run, "select count(*) n from samples") == [{"n": 12}]  # verified and cached
    _flip_bit(shard, shard.stat().st_size // 2)
    code, _, err = run_cli("inspect", run, "--sql", "select count(*) from samples")
    assert code == 2 and "checksum" in err and str(shard) in err and "winnow ingest" in err
    assert run_cli("verify", run)[0] == 1
    _rerun(run, model)
    assert _snapshot(run) == before and run_cli("verify", run)[0] == 0
    # an edit that keeps size and mtime escapes the cache; `verify --full` hashes again and finds it
    _age(shard)
    assert run_cli("verify", run)[0] == 0
    store.VERIFY.clear()
    _flip_bit(shard, 200, keep_mtime=True)
    code, _, err = run_cli("verify", run, "--full")
    assert code == 1 and "checksum" in err and str(shard) in err
    _rerun(run, model)
    assert _snapshot(run) == before


def test_truncation_deletion_and_stray_files(built):
    run, before, model = built
    samples = run / "samples"
    (samples / "part-00000.parquet").write_bytes((samples / "part-00000.parquet").read_bytes()[:100])
    (run / "rejects" / "part-00002.parquet").unlink()
    # a stray committed shard beyond the plan (3 shards), and a data file without a commit record
    for name in ("part-00007.parquet", "_commits/part-00007.json"):
        (samples / name).write_bytes((samples / name.replace("7", "1")).read_bytes())
    (samples / "part-00009.parquet").write_bytes(b"junk")
    code, _, err = run_cli("verify", run)
    assert code == 1
    for what in (
        "part-00000.parquet: checksum",
        "part-00002.parquet: committed shard is missing",
        "part-00007.parquet: shard beyond the plan",
        "part-00009.parquet: data file without",
    ):
        assert what in err, what
    _rerun(run, model)
    assert _snapshot(run) == before and run_cli("verify", run)[0] == 0
    assert sql_json(run, "select count(*) n from samples") == [{"n": 12}]


def test_damaged_records_plan_and_manifest_are_named_and_rebuilt(built):
    run, before, model = built
    rec = run / "samples" / "_commits" / "part-00001.json"
    rec.write_bytes(b"\x00\xff\xfe garbage")
    claims = run / "rejects" / "_commits" / "part-00000.json"
    claims.write_text(json.dumps(json.loads(claims.read_text()) | {"rows": 999}))
    (run / "plan.json").write_text("{garbage")
    (run / "manifest.json").write_text("{garbage")
    code, _, err = run_cli("inspect", run, "--sql", "select count(*) from rejects")
    assert code == 2, err  # the rejects table is refused, not answered from a subset
    for f in (rec, claims, run / "plan.json"):
        assert str(f) in err, f
    assert "999" in err
    code, _, err = run_cli("verify", run)
    assert code == 1 and "unreadable commit record" in err and str(run / "manifest.json") in err
    _rerun(run, model)
    assert _snapshot(run) == before and run_cli("verify", run)[0] == 0
    man = json.loads((run / "manifest.json").read_text())
    assert man["tables"]["rejects"]["rows"] == 0 and man["tables"]["samples"]["rows"] == 12


def test_cached_verification_hashes_each_unchanged_file_once(built, monkeypatch):
    run, _, _ = built
    calls = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    n_files = len(list(run.rglob("part-*.parquet")))
    assert run_cli("verify", run)[0] == 0
    assert len(calls) == n_files
    store.VERIFY.clear()  # a new process: the on-disk cache answers
    assert run_cli("verify", run)[0] == 0 and len(calls) == n_files
    shard = run / "samples" / "part-00000.parquet"
    os.utime(shard, (time.time() - 30, time.time() - 30))  # touched (not racy): hashed again, once
    assert run_cli("verify", run)[0] == 0 and len(calls) == n_files + 1


def test_reingest_of_other_inputs_marks_old_shards_and_downstream_stale(built, tmp_path):
    run, _, model = built
    rd = RunDir(run)
    lists = pa.array([[0.5] * 3], pa.list_(pa.float32()))
    rd.table("signals/x").write(
        0,
        pa.table({"sample_id": ["a"], "v": lists}),
        fingerprint="m",
        inputs={"samples/part-00002": rd.table("samples").part_digest(2)},
    )
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r | {"answer": r["answer"] + "!"}) for r in ROWS) + "\n")
    cmd = [
        WINNOW,
        "ingest",
        str(other),
        "--run",
        str(run),
        "--model",
        str(model),
        "--set",
        "shard_rows=5",
    ]
    env = {**os.environ, "WINNOW_FAULT_KILL_AFTER_SHARDS": "1", "WINNOW_PROGRESS": "0"}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=240).returncode == -9
    stale = RunDir(run).stale_tables()
    assert "samples" in stale and "signals/x" in stale and "older plan:plan.json" in stale["samples"][0]
    # the killed writer's lock is taken over by the rerun
    assert (run / ".winnow.lock").exists()
    code, _, err = run_cli("ingest", other, "--run", run, "--model", model, "--set", "shard_rows=5")
    assert code == 0 and "taking over the lock" in err
    assert "samples" not in RunDir(run).stale_tables()


def test_leftover_temporaries_are_removed_on_resume(built):
    run, before, model = built
    dead = subprocess.run(
        [sys.executable, "-P", "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    leftovers = [run / "samples" / f".part-00001.parquet.tmp-{pid}", run / f".manifest.json.tmp-{pid}"]
    for f in leftovers:
        f.write_bytes(b"half")
    live = run / "samples" / f".part-00002.parquet.tmp-{os.getpid()}"  # a live writer's file stays
    live.write_bytes(b"mine")
    _rerun(run, model)
    assert not any(f.exists() for f in leftovers) and live.exists()
    live.unlink()
    assert _snapshot(run) == before


def test_zero_row_input_gives_empty_tables_with_schema(tmp_path, chatml_model_dir):
    run = tmp_path / "run"
    (tmp_path / "empty.jsonl").write_bytes(b"")
    code, _, err = run_cli("ingest", tmp_path / "empty.jsonl", "--run", run, "--model", chatml_model_dir)
    assert code == 0, err
    assert sql_json(run, "select count(*) n from samples") == [{"n": 0}]
    assert sql_json(run, "select count(*) n from rejects") == [{"n": 0}]
    assert sql_json(run, "select count(*) n from tokens") == [{"n": 0}]


@pytest.mark.parametrize("bad", ["", "file"])
def test_bad_run_argument_exits_2(tmp_path, chatml_model_dir, bad):
    (tmp_path / "in.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    target = ""
    if bad == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
    code, _, err = run_cli("ingest", tmp_path / "in.jsonl", "--run", target, "--model", chatml_model_dir)
    assert code == 2 and ("empty" in err or "is a file" in err), err
    assert not (Path.cwd() / "plan.json").exists()
