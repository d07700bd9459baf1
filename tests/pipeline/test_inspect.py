"""DuckDB views: committed shards only, tokens view by position, length checks, output formats."""

import json

import pyarrow as pa
import pytest

from winnow.core.store import RunDir
from winnow.core.views import view_name

from cli_runner import run_cli, sql_json


def _run(tmp_path):
    rd = RunDir(tmp_path / "run", create=True)
    samples = pa.table(
        {
            "sample_id": ["a", "b"],
            "input_ids": pa.array([[5, 6, 7], [8, 9]], pa.list_(pa.int32())),
            "offsets": pa.array([[0, 1, 2], [0, 1]], pa.list_(pa.int32())),
            "loss_mask": pa.array([[0, 1, 1], [0, 1]], pa.list_(pa.uint8())),
            "n_tokens": pa.array([3, 2], pa.int32()),
        }
    )
    rd.table("samples").write(0, samples, fingerprint="s")
    vocab = pa.table({"token_id": pa.array(range(10), pa.int32()), "token": [f"t{i}" for i in range(10)]})
    rd.table("vocab").write(0, vocab, fingerprint="v")
    sig = pa.table(
        {
            "sample_id": ["a", "b"],
            "logprob": pa.array([[None, -1.5, -0.25], [None, -2.0]], pa.list_(pa.float32())),
        }
    )
    rd.table("signals/current").write(
        0, sig, fingerprint="m", inputs={"samples/part-00000": rd.table("samples").part_digest(0)}
    )
    return rd


def test_view_names():
    assert view_name("signals/current") == "signals_current"
    assert view_name("scores/eu_plane") == "scores_eu_plane"
    assert view_name("selection/my-pick") == "selection_my_pick"
    assert view_name("samples") == "samples"


def test_tokens_view_aligns_by_position(tmp_path):
    rd = _run(tmp_path)
    rows = sql_json(
        rd.root,
        "select sample_id, pos, token_id, token, loss_mask, current__logprob from tokens "
        "order by sample_id, pos",
    )
    assert [(r["sample_id"], r["pos"], r["token"], r["current__logprob"]) for r in rows] == [
        ("a", 0, "t5", None),
        ("a", 1, "t6", -1.5),
        ("a", 2, "t7", -0.25),
        ("b", 0, "t8", None),
        ("b", 1, "t9", -2.0),
    ]


def test_length_mismatch_is_reported_not_padded(tmp_path):
    rd = _run(tmp_path)
    bad = pa.table(
        {"sample_id": ["a", "b"], "token_score": pa.array([[1.0, 2.0], [1.0, 2.0]], pa.list_(pa.float32()))}
    )
    rd.table("scores/x").write(0, bad, fingerprint="x")
    code, _, err = run_cli("inspect", rd.root, "--sql", "select count(*) from tokens", "--format", "csv")
    assert code == 0 and "scores/x.token_score: 1 rows whose list length differs" in err


def test_uncommitted_files_are_invisible(tmp_path):
    rd = _run(tmp_path)
    t = rd.table("samples")
    extra = pa.table(
        {
            "sample_id": ["z"],
            "input_ids": pa.array([[1]], pa.list_(pa.int32())),
            "offsets": pa.array([[0]], pa.list_(pa.int32())),
            "loss_mask": pa.array([[0]], pa.list_(pa.uint8())),
            "n_tokens": pa.array([1], pa.int32()),
        }
    )
    import pyarrow.parquet as pq

    pq.write_table(extra, t.part_path(1))  # data without a commit record
    pq.write_table(extra, t.dir / ".part-00002.parquet.tmp-99")
    assert sql_json(rd.root, "select count(*) n from samples") == [{"n": 2}]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "table"])
def test_output_formats(tmp_path, fmt):
    rd = _run(tmp_path)
    out = tmp_path / f"out.{fmt}"
    code, _, err = run_cli(
        "inspect",
        rd.root,
        "--sql",
        "select sample_id, n_tokens from samples order by 1",
        "--format",
        fmt,
        "--out",
        out,
    )
    assert code == 0, err
    if fmt == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).column("n_tokens").to_pylist() == [3, 2]
    elif fmt == "json":
        assert json.loads(out.read_text()) == [
            {"sample_id": "a", "n_tokens": 3},
            {"sample_id": "b", "n_tokens": 2},
        ]
    elif fmt == "csv":
        assert out.read_text().splitlines()[1:] == ['"a",3', '"b",2']
    else:
        assert "n_tokens" in out.read_text()


def test_bad_sql_and_missing_run_exit_2(tmp_path):
    rd = _run(tmp_path)
    code, _, err = run_cli("inspect", rd.root, "--sql", "select * from nowhere")
    assert code == 2 and "SQL error" in err
    code, _, err = run_cli("inspect", tmp_path / "absent", "--sql", "select 1")
    assert code == 2 and "does not exist" in err


def test_interactive_prompt(tmp_path, monkeypatch, capsys):
    from winnow.pipeline.inspect_run import repl

    rd = _run(tmp_path)
    # 3 + 2 tokens, counted by hand; the arithmetic makes a number no other output contains
    lines = iter([".tables", "select count(*) * 1000 + 7 as n", "from tokens;", ".quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    repl(str(rd.root))
    out = capsys.readouterr().out
    assert "signals_current" in out and "tokens" in out and "5007" in out


def test_cli_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, winnow.pipeline.cli, winnow.pipeline.inspect_run; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_json_numbers_stay_numbers(tmp_path):
    """DuckDB's sum()/count_if() return HUGEINT (a Decimal in Python): JSON must carry numbers, not strings."""
    import synthetic_runs.critical_tokens as test_critical_tokens

    run = test_critical_tokens.make_run(tmp_path / "run")
    rows = sql_json(
        run.root,
        "select sum(n_tokens) s, count_if(n_tokens > 2) c, 1.25::decimal(4, 2) d, 'x' t from samples",
    )
    assert rows == [{"s": 6 + 3 + 2 + 2, "c": 2, "d": 1.25, "t": "x"}]


def test_tokens_view_by_position_or_by_key_gives_each_samples_values(tmp_path):
    """Tables aligned with samples (same shards, rows, order) join by POSITIONAL JOIN, which streams (issue
    16); a table in another row order or missing a shard joins by sample_id. Every value must land on its
    own (sample_id, pos) either way: checked against dicts built from what was written."""
    import numpy as np

    from winnow.pipeline.inspect_run import open_views, run_sql

    rng = np.random.default_rng(0)
    rd = RunDir(tmp_path / "run", create=True)
    want = {}  # (table, sample_id) -> list of values
    for part in range(3):
        n = [int(x) for x in rng.integers(1, 9, size=int(rng.integers(2, 6)))]
        ids = [f"p{part}s{i}" for i in range(len(n))]
        rd.table("samples").write(
            part,
            pa.table(
                {
                    "sample_id": ids,
                    "input_ids": pa.array([list(range(k)) for k in n], pa.list_(pa.int32())),
                    "offsets": pa.array([list(range(k)) for k in n], pa.list_(pa.int32())),
                    "loss_mask": pa.array([[1] * k for k in n], pa.list_(pa.uint8())),
                    "n_tokens": pa.array(n, pa.int32()),
                }
            ),
            fingerprint="s",
        )
        for table, order, skip in (
            ("signals/current", 1, None),
            ("signals/shuffled", -1, None),
            ("scores/y", 1, 2),
        ):
            if part == skip:
                continue
            vals = [[float(v) for v in rng.normal(size=k)] for k in n]
            want.update({(table, i): v for i, v in zip(ids, vals, strict=True)})
            t = pa.table({"sample_id": ids[::order], "v": pa.array(vals[::order], pa.list_(pa.float64()))})
            rd.table(table).write(part, t, fingerprint=table)
    v = open_views(str(rd.root))
    try:
        plan = str(run_sql(v, "explain select * from tokens").to_pylist())
        rows = run_sql(v, "select sample_id, pos, current__v, shuffled__v, y__v from tokens").to_pylist()
    finally:
        v.close()
    names = plan.upper().replace(" ", "_")  # DuckDB 2 writes "Positional Scan", 1.x "POSITIONAL_SCAN"
    assert "POSITIONAL" in names and "HASH_JOIN" in names
    got = {(r["sample_id"], r["pos"]): (r["current__v"], r["shuffled__v"], r["y__v"]) for r in rows}
    expect = {
        (sid, pos): tuple(
            want[(t, sid)][pos] if (t, sid) in want else None
            for t in ("signals/current", "signals/shuffled", "scores/y")
        )
        for (t0, sid), vals in want.items()
        if t0 == "signals/current"
        for pos in range(len(vals))
    }
    assert len(rows) == len(expect) and got == expect


def test_token_column_names_qualify_both_sides_of_a_clash_only():
    from winnow.core.views import token_column_names

    names, warnings = token_column_names(
        {
            "scores/x": ["token_weight", "token_score"],
            "selection/x": ["token_weight"],
            "signals/a-b": ["logprob"],
        }
    )
    assert names == {
        ("scores/x", "token_weight"): "scores_x__token_weight",
        ("selection/x", "token_weight"): "selection_x__token_weight",
        ("scores/x", "token_score"): "x__token_score",
        ("signals/a-b", "logprob"): "a_b__logprob",
    }
    assert len(warnings) == 1 and "scores/x and selection/x" in warnings[0]


def test_interactive_prompt_through_the_console_script_reads_piped_statements(tmp_path, monkeypatch):
    """`winnow inspect RUN` with stdin not a terminal reads lines with input() (prompt_toolkit or not)."""
    import io

    rd = _run(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("select count(*) * 1000 + 7 as n\nfrom tokens;\n.quit\n"))
    code, out, err = run_cli("inspect", rd.root)
    assert code == 0 and "5007" in out, err


def test_prompt_toolkit_gives_history_and_completion(tmp_path):
    """With prompt_toolkit (the optional `sql` extra), driven through its pipe input: a statement runs, the
    up arrow recalls the previous line, and Tab completion offers the run's views and columns."""
    import prompt_toolkit as pt  # in the dev extra: CI installs it, so no skip hides a break
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from winnow.pipeline.inspect_run import line_reader

    assert pt.__version__ >= "3"
    with create_pipe_input() as inp:
        read = line_reader(["signals_current", "logprob"], input=inp, output=DummyOutput())
        inp.send_text("select 1;\r")
        assert read("winnow> ") == "select 1;"
        inp.send_text("\x1b[A\r")  # up arrow, enter: the line before again
        assert read("winnow> ") == "select 1;"
        session = read.__self__
        assert list(session.history.get_strings()) == ["select 1;"]  # a repeated line is kept once
        got = {
            c.text for c in session.completer.get_completions(Document("select * from sig"), CompleteEvent())
        }
        assert got == {"signals_current"}


def test_repl_runs_sql_through_prompt_toolkit_and_falls_back_without_it(tmp_path, monkeypatch, capsys):
    import sys

    from winnow.pipeline.inspect_run import repl

    rd = _run(tmp_path)
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as inp:
        inp.send_text("select count(*) * 1000 + 7 as n\rfrom tokens;\r.quit\r")
        repl(str(rd.root), session_kw={"input": inp, "output": DummyOutput()})
    assert "5007" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "prompt_toolkit", None)  # not installed: input() reads the lines
    lines = iter(["select count(*) * 1000 + 8 as n from tokens;", ".quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    repl(str(rd.root), session_kw={"input": object()})
    assert "5008" in capsys.readouterr().out
