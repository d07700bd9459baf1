"""Run store: atomic shard commits, commit records as the only source of truth, derived staleness."""

import json
import os

import pyarrow as pa
import pytest

from winnow.core.store import RunDir, UserError, atomic_write_json


def _tbl(n, start=0):
    return pa.table(
        {"sample_id": [f"s{i}" for i in range(start, start + n)], "x": list(range(start, start + n))}
    )


def test_write_then_read_only_committed(tmp_path):
    run = RunDir(tmp_path, create=True)
    t = run.table("samples")
    t.write(0, _tbl(3), fingerprint="f")
    t.write(1, _tbl(2, 3), fingerprint="f")
    # a stray temporary file and an uncommitted shard must stay invisible
    (t.dir / ".part-00002.parquet.tmp-1").write_bytes(b"garbage")
    t.part_path(3).write_bytes(b"not parquet")
    assert [r.part for r in t.records()] == [0, 1]
    assert t.read().num_rows == 5
    rec = t.record(0)
    assert rec.rows == 3 and len(rec.sha256) == 64 and "sample_id" in rec.schema


def test_record_invalid_when_file_replaced(tmp_path):
    run = RunDir(tmp_path, create=True)
    t = run.table("samples")
    t.write(0, _tbl(3), fingerprint="f")
    import pyarrow.parquet as pq

    pq.write_table(_tbl(30), t.part_path(0))  # replaced behind the store's back: size differs
    assert t.record(0) is None
    with pytest.raises(UserError):
        t.read()


def test_staleness_is_derived_and_transitive(tmp_path):
    run = RunDir(tmp_path, create=True)
    s = run.table("samples")
    s.write(0, _tbl(3), fingerprint="a")
    sig = run.table("signals/current")
    sig.write(0, _tbl(3), fingerprint="m", inputs={"samples/part-00000": s.part_digest(0)})
    sc = run.table("scores/eu_plane")
    sc.write(0, _tbl(3), fingerprint="e", inputs={"signals/current": sig.digest()})
    assert run.stale_tables() == {}
    s.write(0, _tbl(4), fingerprint="b")  # samples changed
    stale = run.stale_tables()
    assert set(stale) == {"signals/current", "scores/eu_plane"}
    man = run.update_manifest("ingest", {"x": 1})
    assert man["tables"]["scores/eu_plane"]["stale"] is True
    assert man["tables"]["samples"]["stale"] is False


def test_atomic_json_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_missing_run_dir_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RunDir(tmp_path / "nope")


def test_rewrite_withdraws_record_first(tmp_path, monkeypatch):
    run = RunDir(tmp_path, create=True)
    t = run.table("samples")
    t.write(0, _tbl(3), fingerprint="a")

    def boom(*a, **k):
        raise OSError("disk full")

    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        t.write(0, _tbl(5), fingerprint="b")
    # the failed rewrite must not leave the old record claiming a shard that is being replaced
    assert t.record(0) is None
    assert not [p for p in os.listdir(t.dir) if p.startswith(".")]
