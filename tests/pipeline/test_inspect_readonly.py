"""The inspector only reads: hostile statements are refused with exit 2 and leave every file of the run
byte-identical; run paths with glob characters are read as paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest

from winnow.pipeline.store import RunDir

from cli_runner import run_cli, sql_json


def _make(root: Path, n: int) -> RunDir:
    rd = RunDir(root, create=True)
    samples = pa.table(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "input_ids": pa.array([[5, 6]] * n, pa.list_(pa.int32())),
            "offsets": pa.array([[0, 1]] * n, pa.list_(pa.int32())),
            "loss_mask": pa.array([[0, 1]] * n, pa.list_(pa.uint8())),
            "n_tokens": pa.array([2] * n, pa.int32()),
        }
    )
    rd.table("samples").write(0, samples, fingerprint="s")
    (rd.root / "manifest.json").write_text('{"steps": {}}\n')
    (rd.root / "plan.json").write_text('{"shards": 1}\n')
    return rd


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _hostile(run: Path, other: Path) -> list[str]:
    """Statements that would write, delete, attach, install or read outside the run (issue 10's
    list; benchmarks/reliability.py counts them too)."""
    shard = run / "samples" / "part-00000.parquet"
    return [
        f"COPY (SELECT 1 AS p) TO '{run}/samples' (FORMAT parquet, PARTITION_BY (p), OVERWRITE)",
        f"COPY samples TO '{shard}' (FORMAT parquet)",
        f"COPY (SELECT 1) TO '{run}/manifest.json'",
        f"ATTACH '{run}/x.db' AS x",
        f"EXPORT DATABASE '{run}/export'",
        f"SELECT 1; COPY samples TO '{shard}' (FORMAT parquet)",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT * FROM read_text('/etc/hostname')",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW samples",
        "CALL pragma_version()",
        f"SELECT * FROM read_parquet('{other}/samples/part-00000.parquet')",
        f"SELECT * FROM read_csv('{run}/plan.json')",
    ]


def test_hostile_statements_refused_and_run_unchanged(tmp_path):
    rd = _make(tmp_path / "run", 3)
    _make(tmp_path / "other", 5)
    before = _hashes(rd.root)
    statements = _hostile(rd.root, tmp_path / "other")
    assert len(statements) == 16
    for sql in statements:
        code, _, err = run_cli("inspect", rd.root, "--sql", sql)
        assert code == 2, (sql, err)
        assert "refused" in err or "Permission" in err or "disabled" in err, (sql, err)
        assert _hashes(rd.root) == before, sql
    code, _, err = run_cli(
        "inspect",
        rd.root,
        "--sql",
        "select 1 as x",
        "--format",
        "parquet",
        "--out",
        rd.root / "samples" / "part-00000.parquet",
    )
    assert code == 2 and "inside the run" in err
    assert _hashes(rd.root) == before
    # reads still work, including the statement kinds DuckDB parses as SELECT
    assert sql_json(rd.root, "with t as (select count(*) n from samples) select n from t") == [{"n": 3}]
    for sql in ("DESCRIBE samples", "SUMMARIZE samples", "SHOW TABLES", "EXPLAIN SELECT * FROM samples"):
        assert run_cli("inspect", rd.root, "--sql", sql)[0] == 0, sql
    assert _hashes(rd.root) == before


def test_interactive_prompt_refuses_writes(tmp_path, monkeypatch, capsys):
    from winnow.pipeline.inspect_run import repl

    rd = _make(tmp_path / "run", 3)
    before = _hashes(rd.root)
    shard = rd.root / "samples" / "part-00000.parquet"
    lines = iter([f"COPY samples TO '{shard}';", "select count(*) * 1000 + 7 as n from samples;", ".quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    repl(str(rd.root))
    cap = capsys.readouterr()
    assert "refused: COPY" in cap.err and "3007" in cap.out
    assert _hashes(rd.root) == before


@pytest.mark.parametrize("name", ["g[1]", "g*", "g?", "with space", "qu'o\"te"])
def test_run_paths_are_not_globs(tmp_path, name):
    _make(tmp_path / "g1", 7)  # what a glob would also match
    _make(tmp_path / "gx", 11)
    rd = _make(tmp_path / name, 3)
    assert sql_json(rd.root, "select count(*) n from samples") == [{"n": 3}]


def test_csv_of_a_list_column(tmp_path):
    rd = _make(tmp_path / "run", 2)
    code, out, err = run_cli(
        "inspect", rd.root, "--sql", "select sample_id, input_ids from samples order by 1", "--format", "csv"
    )
    assert code == 0, err
    assert out.splitlines()[1:] == ['"s0","[5, 6]"', '"s1","[5, 6]"']


def test_no_verify_warns(tmp_path):
    rd = _make(tmp_path / "run", 2)
    code, _, err = run_cli("inspect", rd.root, "--no-verify", "--sql", "select 1")
    assert code == 0 and "--no-verify" in err
