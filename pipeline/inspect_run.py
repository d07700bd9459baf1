"""`winnow inspect`: a query over a run's views (:mod:`winnow.core.views`), its output formats, the REPL.

The views themselves (names, the per-token view, the read-only guards) live on the ground floor, where
the stages that take a user's SQL condition (dv4llm ``targets``) and the roof's train step open them too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa

from winnow.core.errors import UserError
from winnow.core.views import (  # noqa: F401  (re-exported for the CLI and the card)
    Views,
    check_read_only,
    eval_condition,
    open_views,
    run_sql,
    view_name,
)


def check_out_path(run_dir: str, out: str | None) -> None:
    if out is None:
        return
    from winnow.core.write_guard import refuse_run_overlap

    refuse_run_overlap(run_dir, out, "--out")  # the inspector writes nothing into (or over) a run
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder: give a file name for the result")


def query(run_dir: str, sql: str) -> tuple[pa.Table, list[str]]:
    v = open_views(run_dir)
    try:
        return run_sql(v, sql), v.warnings
    finally:
        v.close()


def format_result(table: pa.Table, fmt: str, out_path: str | None = None) -> None:
    """Write a query result to stdout (or ``out_path``) as table, csv, json or parquet."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if out_path is None:
            pq.write_table(table, sys.stdout.buffer)
        else:
            pq.write_table(table, out_path)
        return
    if fmt == "csv":
        import pyarrow.csv as pcsv

        table = _flat_for_csv(table)
        if out_path:
            pcsv.write_csv(table, out_path)
        else:
            buf = pa.BufferOutputStream()
            pcsv.write_csv(table, buf)
            sys.stdout.write(buf.getvalue().to_pybytes().decode())
        return
    if fmt == "json":
        import json

        text = json.dumps(_pylist(table), ensure_ascii=False, default=_json_value, indent=None)
        if out_path:
            with open(out_path, "w") as f:
                f.write(text + "\n")
        else:
            sys.stdout.write(text + "\n")
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    rt = RichTable(show_lines=False)
    for name in table.column_names:
        rt.add_column(name, overflow="fold")
    for row in _pylist(table.slice(0, 200)):
        rt.add_row(*[_cell(v) for v in row.values()])
    console = Console(file=open(out_path, "w") if out_path else sys.stdout, width=200)  # noqa: SIM115
    console.print(rt)
    if table.num_rows > 200:
        console.print(f"({table.num_rows} rows, first 200 shown)")


def _flat_for_csv(table: pa.Table) -> pa.Table:
    """CSV has no nested values: list/struct/map columns become JSON text."""
    import json

    for i, f in enumerate(table.schema):
        if pa.types.is_nested(f.type):
            text = [
                None if v is None else json.dumps(v, default=_json_value)
                for v in (r[f.name] for r in _pylist(table.select([i])))
            ]
            table = table.set_column(i, f.name, pa.array(text, pa.string()))
    return table


def _pylist(table: pa.Table) -> list[dict]:
    """Rows as Python values; one Python cannot hold (DuckDB's 'infinity'::timestamp, a date beyond
    year 9999) becomes text "<type>:<stored integer>" instead of a traceback (issue 24)."""
    from winnow.core.readers import batch_records

    return [r for b in table.to_batches() for r in batch_records(b)]


def _json_value(v):
    """JSON for what `json` cannot encode: DuckDB's sum()/count_if() are HUGEINT, which arrive as
    Decimal; whole ones become ints (a count must read back as a number), others floats."""
    from decimal import Decimal

    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return str(v)


def _cell(v) -> str:
    s = "NULL" if v is None else str(v)
    return s if len(s) <= 120 else s[:117] + "..."


_KEYWORDS = (
    "select", "from", "where", "group by", "order by", "limit", "having", "with", "join", "using", "on",
    "count", "sum", "avg", "min", "max", "median", "quantile_cont", "list_sum", "unnest", "distinct", "as",
    "and", "or", "not", "describe", "summarize", "show", "explain", ".tables", ".quit",
)  # fmt: skip
HISTORY_ENV = (
    "WINNOW_SQL_HISTORY"  # a file for the prompt's history across sessions (unset: this session only)
)


def line_reader(words: list[str], **session_kw):
    """The prompt's ``read(prompt) -> line``: prompt_toolkit's (history with up/down and Ctrl-R, Tab
    completion of the run's views, columns and SQL keywords) when it is installed (the optional ``sql``
    extra) and stdin is a terminal or ``session_kw`` gives an input; else ``input()``. The history stays in
    memory unless ``$WINNOW_SQL_HISTORY`` names a file: the inspector writes nothing it was not asked to."""
    import os

    if not session_kw and not sys.stdin.isatty():
        return input
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory
    except ImportError:
        return input
    path = os.environ.get(HISTORY_ENV)
    history = FileHistory(path) if path else InMemoryHistory()
    completer = WordCompleter(sorted(set(words) | set(_KEYWORDS)), ignore_case=True, WORD=True)
    return PromptSession(history=history, completer=completer, **session_kw).prompt


def _words(v: Views) -> list[str]:
    """Completion words: the views and their columns (the catalog, read by a SELECT)."""
    cols = v.con.sql("select distinct column_name from duckdb_columns() where not internal").fetchall()
    return [*v.views, *(str(c[0]) for c in cols)]


def repl(run_dir: str, verify: bool = True, session_kw: dict | None = None) -> None:
    """A minimal interactive SQL prompt; `.tables` lists views, `.quit` leaves (:func:`line_reader`)."""
    v = open_views(run_dir, verify=verify)
    for w in v.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"winnow inspect {run_dir}: views {', '.join(sorted(v.views))}. End statements with ';'. .quit to leave."
    )
    read = line_reader(_words(v), **(session_kw or {}))
    buf = ""
    while True:
        try:
            line = read("winnow> " if not buf else "   ...> ")
        except EOFError:
            print()
            return
        if not buf and line.strip() in (".quit", ".exit", "\\q"):
            return
        if not buf and line.strip() == ".tables":
            for name, table in sorted(v.views.items()):
                print(f"{name:30s} {table}")
            continue
        buf += line + "\n"
        if not buf.strip().endswith(";"):
            continue
        try:
            result = run_sql(v, buf)
            if result is not None:
                format_result(result, "table")
        except UserError as e:  # a refused statement or bad SQL: say why and keep the prompt alive
            print(f"error: {e}", file=sys.stderr)
        buf = ""
