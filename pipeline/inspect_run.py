"""`winnow inspect`: every table of a run as a DuckDB view, plus a long per-token view.

Views are built from the commit records (``Table.paths()``), never from a glob, so a shard being
written (hidden temporary name) or one whose commit record is missing is invisible. Stale tables
(computed from inputs that have changed since) are hidden, with a warning naming the reason.

Names (ARCHITECTURE.md "Naming in DuckDB"): ``samples``, ``rejects``, ``targets``, ``vocab``,
``signals_<alias>``, ``scores_<stage>``, ``selection_<name>``, and ``tokens`` with one row per
(sample_id, pos): ``token_id``, ``token`` (text from the vocabulary table, not decoded per row),
``offset``, ``loss_mask``, and every per-token list column of every other table as
``<table>__<column>`` (``current__logprob``, ``eu_plane__token_score``, ``default__token_weight``).

The per-token view uses positional subscripts (``col[pos + 1]``) over ``range(n_tokens)`` rather
than side-by-side ``unnest``, which silently pads shorter lists with NULL; list lengths are checked
against ``n_tokens`` when the views are built and a mismatch is reported.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import pyarrow as pa

from winnow.pipeline.store import RunDir

_PREFIXES = {"signals": "signals", "scores": "scores", "selection": "selection"}
_SAMPLE_LISTS = {"input_ids", "offsets", "loss_mask"}


def view_name(table: str) -> str:
    parts = table.split("/")
    if len(parts) == 2 and parts[0] in _PREFIXES:
        return f"{parts[0]}_{_ident(parts[1])}"
    return _ident(table.replace("/", "_"))


def _ident(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_list(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


@dataclass
class Views:
    con: object
    views: dict[str, str] = field(default_factory=dict)  # view -> table
    warnings: list[str] = field(default_factory=list)
    token_columns: list[str] = field(default_factory=list)


def per_token_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]


def open_views(run_dir: str, check_lengths: bool = True):
    """A DuckDB connection (in-memory, reading the run's files) with every view defined."""
    import duckdb

    run = RunDir(run_dir)
    con = duckdb.connect(":memory:")
    out = Views(con)
    stale = run.stale_tables()
    plan_shards = None
    try:
        plan_shards = run.plan().get("shards")
    except Exception:  # noqa: BLE001 - a run without a plan simply has no shard count to compare
        pass
    per_token: dict[str, list[str]] = {}
    for table in run.tables():
        if table in stale:
            out.warnings.append(f"hiding stale table {table}: {stale[table][0]} (rerun its step)")
            continue
        t = run.table(table)
        paths = t.paths()
        name = view_name(table)
        con.execute(
            f"CREATE VIEW {_q(name)} AS SELECT * FROM read_parquet({_sql_list(paths)}, union_by_name=true)"
        )
        out.views[name] = table
        if (
            plan_shards
            and table.split("/")[0] in ("samples", "rejects", "signals", "scores", "selection")
            and len(paths) < plan_shards
        ):
            out.warnings.append(
                f"{table}: {len(paths)} of {plan_shards} shards committed (partial; rerun its step)"
            )
        if table.split("/")[0] in _PREFIXES:
            cols = per_token_columns(t.schema())
            if cols:
                per_token[table] = cols
    if "samples" in out.views:
        _tokens_view(out, per_token, check_lengths)
    return out


def _tokens_view(out: Views, per_token: dict[str, list[str]], check_lengths: bool) -> None:
    con = out.con
    selects = [
        "s.sample_id",
        "g.pos",
        "s.input_ids[g.pos + 1] AS token_id",
        "v.token AS token" if "vocab" in out.views else "NULL AS token",
        's.offsets[g.pos + 1] AS "offset"',
        "s.loss_mask[g.pos + 1] AS loss_mask",
    ]
    joins = []
    used: set[str] = set()
    for i, (table, cols) in enumerate(sorted(per_token.items())):
        short = table.split("/", 1)[1]
        prefix = _ident(short) if short not in used else view_name(table)
        used.add(short)
        alias = f"t{i}"
        joins.append(f"LEFT JOIN {_q(view_name(table))} {alias} ON {alias}.sample_id = s.sample_id")
        for c in cols:
            col = f"{prefix}__{c}"
            selects.append(f"{alias}.{_q(c)}[g.pos + 1] AS {_q(col)}")
            out.token_columns.append(col)
            if check_lengths:
                bad = con.execute(
                    f"SELECT count(*) FROM {_q(view_name(table))} x JOIN samples s USING (sample_id) "
                    f"WHERE len(x.{_q(c)}) <> s.n_tokens"
                ).fetchone()[0]
                if bad:
                    out.warnings.append(f"{table}.{c}: {bad} rows whose list length differs from n_tokens")
    vocab_join = "LEFT JOIN vocab v ON v.token_id = s.input_ids[g.pos + 1]" if "vocab" in out.views else ""
    sql = (
        "CREATE VIEW tokens AS SELECT "
        + ", ".join(selects)
        + " FROM samples s CROSS JOIN LATERAL (SELECT unnest(range(s.n_tokens)) AS pos) g "
        + vocab_join
        + " "
        + " ".join(joins)
    )
    con.execute(sql)
    out.views["tokens"] = "samples"


def query(run_dir: str, sql: str) -> tuple[pa.Table, list[str]]:
    v = open_views(run_dir)
    return v.con.sql(sql).to_arrow_table(), v.warnings


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

        if out_path:
            pcsv.write_csv(table, out_path)
        else:
            buf = pa.BufferOutputStream()
            pcsv.write_csv(table, buf)
            sys.stdout.write(buf.getvalue().to_pybytes().decode())
        return
    if fmt == "json":
        import json

        text = json.dumps(table.to_pylist(), ensure_ascii=False, default=_json_value, indent=None)
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
    for row in table.slice(0, 200).to_pylist():
        rt.add_row(*[_cell(v) for v in row.values()])
    console = Console(file=open(out_path, "w") if out_path else sys.stdout, width=200)  # noqa: SIM115
    console.print(rt)
    if table.num_rows > 200:
        console.print(f"({table.num_rows} rows, first 200 shown)")


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


def repl(run_dir: str) -> None:
    """A minimal interactive SQL prompt; `.tables` lists views, `.quit` leaves."""
    v = open_views(run_dir)
    for w in v.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"winnow inspect {run_dir}: views {', '.join(sorted(v.views))}. End statements with ';'. .quit to leave."
    )
    buf = ""
    while True:
        try:
            line = input("winnow> " if not buf else "   ...> ")
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
            rel = v.con.sql(buf)
            if rel is not None:
                format_result(rel.to_arrow_table(), "table")
        except Exception as e:  # noqa: BLE001 - show the SQL error and keep the prompt alive
            print(f"error: {e}", file=sys.stderr)
        buf = ""
