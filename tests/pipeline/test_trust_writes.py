"""Issue 24 (pipeline side): no command writes into the run it reads, SQL only reads on every path, the
readers reject what they cannot read instead of swallowing it, `verify` checks the manifest's numbers,
and out-of-domain values exit 2 with one line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_runner import ingest_demo, run_cli, sql_json

KEEP = "meta_corruption = 'none'"


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run = ingest_demo(tmp_path_factory.mktemp("trust") / "run")
    code, _, err = run_cli("select", run, "sql", "--keep", KEEP, "--name", "clean")
    assert code == 0, err
    return run


@pytest.mark.parametrize("where", ["", "samples", "samples/part-00000.parquet", "..", "card/../selection"])
def test_export_never_writes_into_or_over_the_run(demo, where):
    before = _hashes(demo)
    out = demo / where if where != ".." else demo.parent
    for fmt in ("parquet", "hf"):
        code, _, err = run_cli("export", demo, "--format", fmt, "--out", out, "--force")
        assert code == 2 and "run" in err, (where, fmt, err)
    assert _hashes(demo) == before
    assert run_cli("verify", demo)[0] == 0


def test_inspect_out_refuses_a_folder_holding_the_run(demo):
    code, _, err = run_cli("inspect", demo, "--sql", "select 1", "--out", demo.parent)
    assert code == 2 and "holds the run" in err, err


def test_card_out_refuses_the_run_but_keeps_its_own_place(demo, tmp_path):
    before = _hashes(demo)
    for out in (demo, demo / "samples", demo.parent):
        code, _, err = run_cli("card", demo, "--out", out)
        assert code == 2 and "run" in err, (out, err)
    assert _hashes(demo) == before


HOSTILE = [
    "EXPLAIN ANALYZE COPY (SELECT * FROM samples LIMIT 1) TO '{shard}' (FORMAT parquet)",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "EXPLAIN (FORMAT json) COPY samples TO '{shard}' (FORMAT parquet)",
    "/* c */ explain analyze copy (select 1) to '{shard}'",
    "SELECT 1; SELECT 2",
    "EXPLAIN ANALYZE EXPLAIN ANALYZE COPY samples TO '{shard}'",
]


def test_explain_around_a_write_is_refused_and_reads_still_work(demo):
    shard = demo / "samples" / "part-00000.parquet"
    before = _hashes(demo)
    for sql in HOSTILE:
        code, _, err = run_cli("inspect", demo, "--sql", sql.format(shard=shard))
        assert code == 2 and ("refused" in err or "SQL error" in err), (sql, err)
        assert _hashes(demo) == before, sql
    for sql in ("EXPLAIN SELECT count(*) FROM samples", "EXPLAIN ANALYZE SELECT 1", "DESCRIBE samples"):
        assert run_cli("inspect", demo, "--sql", sql)[0] == 0, sql


def test_select_sql_condition_cannot_smuggle_a_statement(demo, tmp_path):
    """The condition is pasted into a query: closing it and adding a statement is refused by the parser
    (on main the COPY ran and only the connection's path list stopped it)."""
    target = demo / "samples" / "part-00000.parquet"
    before = _hashes(demo)
    keep = f"true), false) FROM samples; COPY (SELECT 1) TO '{target}'; SELECT sample_id, coalesce((true"
    code, _, err = run_cli("select", demo, "sql", "--keep", keep, "--name", "smuggle")
    assert code == 2 and "refused" in err and "statements" in err, err
    assert _hashes(demo) == before


def test_unrenderable_values_become_text_not_a_traceback(demo):
    rows = sql_json(demo, "select 'infinity'::timestamp as t, ['infinity'::date] as l, 1 as n")
    assert rows == [{"t": "timestamp[us]:9223372036854775807", "l": ["date32[day]:2147483647"], "n": 1}]
    for fmt in ("table", "csv"):
        code, out, err = run_cli(
            "inspect", demo, "--sql", "select 'infinity'::timestamp as t", "--format", fmt
        )
        assert code == 0 and "9223372036854775807" in out, err


def test_selection_names_are_one_safe_folder_and_views_do_not_collide(demo):
    for name in ("..", "../../x", "a/b", "x" * 300):
        code, _, err = run_cli("select", demo, "sql", "--keep", KEEP, "--name", name)
        assert code == 2 and err.count("\n") == 1, (name, err)
    assert not (demo.parent / "x").exists()
    assert run_cli("select", demo, "sql", "--keep", KEEP, "--name", "a.b")[0] == 0
    code, _, err = run_cli("select", demo, "sql", "--keep", KEEP, "--name", "a_b")
    assert code == 2 and "selection_a_b" in err and not (demo / "selection" / "a_b").exists()
    assert sql_json(demo, "select count(*) n from selection_a_b")[0]["n"] > 0


# ---------------------------------------------------------------------------------------------- readers
def _ingest(tmp_path: Path, *inputs) -> tuple[int, str, Path]:
    run = tmp_path / "r"
    code, _, err = run_cli(
        "ingest", *inputs, "--run", run, "--model", "builtin:tiny", "--format", "prompt_response"
    )
    return code, err, run


def test_csv_unbalanced_quote_rejects_one_line_and_keeps_the_rest(tmp_path):
    rows = [f"q{i},a{i}" for i in range(100)]
    text = "prompt,response\n" + 'p,"never closed\n' + "\n".join(rows) + "\n"
    (tmp_path / "x.csv").write_text(text)
    code, err, run = _ingest(tmp_path, tmp_path / "x.csv")
    assert code == 0, err
    counts = json.loads((run / "manifest.json").read_text())["steps"]["ingest"]["counts"]
    assert counts["rows_in"] == 101 and counts["rejects"] == 1 and counts["samples"] == 100, counts
    got = sql_json(run, "select reason, raw from rejects")
    assert got == [{"reason": "malformed_csv", "raw": 'p,"never closed\n'}]


def test_csv_multiline_field_that_closes_is_still_one_row(tmp_path):
    (tmp_path / "x.csv").write_text('prompt,response\nhi,"line one\nline two, with a comma\nend"\nq,a\n')
    code, err, run = _ingest(tmp_path, tmp_path / "x.csv")
    assert code == 0, err
    counts = json.loads((run / "manifest.json").read_text())["steps"]["ingest"]["counts"]
    assert counts["rows_in"] == 2 and counts["samples"] == 2, counts


def test_parquet_values_beyond_python_become_text(tmp_path):
    t = pa.table(
        {
            "prompt": ["a", "b"],
            "response": ["x", "y"],
            "ts": pa.array([10**13, 5], pa.timestamp("s")),
            "day": pa.array([2**31 - 1, 3], pa.date32()),
            "dur": pa.array([2**62, 1], pa.duration("s")),
        }
    )
    pq.write_table(t, tmp_path / "x.parquet", version="2.6")
    code, err, run = _ingest(tmp_path, tmp_path / "x.parquet")
    assert code == 0, err
    got = sql_json(run, "select meta_day, meta_dur from samples order by row")
    assert "2147483647" in str(got[0]["meta_day"]) and str(2**62) in str(got[0]["meta_dur"]), got


def test_parquet_duplicate_columns_and_fifos_are_refused(tmp_path):
    dup = pa.Table.from_arrays(
        [pa.array(["a"]), pa.array(["b"]), pa.array(["c"])], ["prompt", "response", "prompt"]
    )
    pq.write_table(dup, tmp_path / "d.parquet")
    code, err, run = _ingest(tmp_path, tmp_path / "d.parquet")
    assert code == 2 and "more than once" in err
    os.mkfifo(tmp_path / "f.jsonl")  # reading it would block forever
    code, err, run = _ingest(tmp_path, tmp_path / "f.jsonl")
    assert code == 2 and "not a regular file" in err


# ---------------------------------------------------------------------------------------------- verify
def _edit_manifest(run: Path, fn) -> None:
    path = run / "manifest.json"
    man = json.loads(path.read_text())
    fn(man)
    path.write_text(json.dumps(man))


def test_verify_checks_manifest_counts_listed_tables_and_plan(tmp_path):
    run = ingest_demo(tmp_path / "run")
    assert run_cli("select", run, "sql", "--keep", KEEP, "--name", "k")[0] == 0
    assert run_cli("verify", run)[0] == 0
    edits = {
        "rows_in": lambda m: m["steps"]["ingest"]["counts"].update(rows_in=1),
        "samples": lambda m: m["steps"]["ingest"]["counts"].update(samples=7),
        "kept": lambda m: m["steps"]["select:k"]["counts"].update(kept=1),
    }
    for key, fn in edits.items():
        saved = (run / "manifest.json").read_text()
        _edit_manifest(run, fn)
        code, _, err = run_cli("verify", run)
        assert code == 1 and key in err, (key, err)
        (run / "manifest.json").write_text(saved)
    _edit_manifest(run, edits["rows_in"])
    assert run_cli("ingest", "builtin:demo", "--run", run, "--model", "builtin:tiny")[0] == 0  # repairs it
    assert run_cli("verify", run)[0] == 0
    import shutil

    shutil.rmtree(run / "selection" / "k")
    code, _, err = run_cli("verify", run)
    assert code == 1 and "selection/k, which is gone" in err
    assert run_cli("select", run, "sql", "--keep", KEEP, "--name", "k")[0] == 0
    plan = json.loads((run / "plan.json").read_text())
    (run / "plan.json").write_text(json.dumps(plan | {"shards": plan["shards"] + 1}))
    code, _, err = run_cli("verify", run)
    assert code == 1 and "plan.json" in err and "committed" in err
    (run / "plan.json").write_text(json.dumps(plan))
    assert run_cli("verify", run)[0] == 0


# ---------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    "kv",
    [
        "seed=-1",
        "seed=" + "9" * 20,
        "threads=100000",
        "device=meta",
        "lr=1e308",
        "lr=inf",
        "lr=nan",
        "max_grad_norm=nan",
        "weight_decay=inf",
        "eval_fraction=nan",
        "q_tuning.r_sample=inf",
    ],
)
def test_out_of_domain_train_values_exit_2_naming_them(kv, tmp_path):
    code, out, err = run_cli(
        "train",
        "--data",
        tmp_path / "none.parquet",
        "--model",
        "builtin:tiny",
        "--out",
        tmp_path / "o",
        "--set",
        kv,
    )
    key = kv.split("=")[0].rsplit(".", 1)[-1]
    assert code == 2 and key in err and err.count("\n") == 1, (kv, err)
    assert not (tmp_path / "o").exists()


def test_out_of_domain_step_values_exit_2(demo):
    for step, kv in (("score", "threads=100000000000000000000"), ("score", "beta=inf")):
        code, _, err = run_cli(
            step, demo, "--contrast", "--positive", "builtin:tiny", "--negative", "builtin:tiny", "--set", kv
        )
        assert code == 2 and err.count("\n") == 1, (kv, err)
