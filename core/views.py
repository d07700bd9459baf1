"""`winnow inspect`: every table of a run as a DuckDB view, plus a long per-token view.

Views are built from the commit records (``Table.paths()``), never from a glob, so a shard being
written (hidden temporary name) or one whose commit record is missing is invisible. Stale tables
(computed from inputs that have changed since) are hidden, with a warning naming the reason.

Names (ARCHITECTURE.md "Naming in DuckDB"): ``samples``, ``rejects``, ``targets``, ``vocab``,
``signals_<alias>``, ``scores_<stage>``, ``selection_<name>``, and ``tokens`` with one row per
(sample_id, pos): ``token_id``, ``token`` (text from the vocabulary table, not decoded per row),
``offset``, ``loss_mask``, and every per-token list column of every other table as
``<name>__<column>`` (``current__logprob``, ``eu_plane__token_score``, ``quickstart__token_weight``;
:func:`token_column_names` has the one rule, :func:`view_name` the views').

Read-only (the inspector writes nothing into the run and reads nothing outside it): every shard is
verified against its commit record's sha256 before the views open (cached; ``--no-verify`` skips it
with a warning); views read symlinks to the verified shards in a private temporary folder, so a run
path with glob characters (``g[1]``, ``g*``) is read as the path it is; DuckDB runs with external
access limited to those symlinks (``allowed_paths``), extension install/autoload off and its
configuration locked; and each statement's type is checked before anything runs: only SELECT-like
statements (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, which DuckDB parses as SELECT) and EXPLAIN pass.
COPY, ATTACH, EXPORT, INSTALL/LOAD, SET, PRAGMA, CALL, CREATE ... are refused with exit 2.

The per-token view uses positional subscripts (``col[pos + 1]``) over ``range(n_tokens)`` rather
than side-by-side ``unnest``, which silently pads shorter lists with NULL; list lengths are checked
against ``n_tokens`` when the views are built and a mismatch is reported. Tables whose shards, row counts
and sample_id order equal the samples' join it by ``POSITIONAL JOIN`` (streams: flat memory as runs
grow); others by sample_id (see :func:`_tokens_view`).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from winnow.core.store import VERIFY, RunDir, UserError

_PREFIXES = {"signals": "signals", "scores": "scores", "selection": "selection"}
_SAMPLE_LISTS = {"input_ids", "offsets", "loss_mask"}


def view_name(table: str) -> str:
    """The table's view: its folder path with ``/`` as ``_`` and every character other than letters,
    digits and ``_`` as ``_`` (``selection/online-rho-epoch1`` -> ``selection_online_rho_epoch1``)."""
    parts = table.split("/")
    if len(parts) == 2 and parts[0] in _PREFIXES:
        return f"{parts[0]}_{_ident(parts[1])}"
    return _ident(table.replace("/", "_"))


def token_column_names(per_token: dict[str, list[str]]) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The ``tokens`` view's name of each (table, list column): ``<name>__<column>``, where ``<name>`` is
    the table's view name without its kind (``signals_``, ``scores_``, ``selection_``): ``current__logprob``,
    ``eu_plane__token_score``, ``quickstart__token_weight``, ``online_rho_epoch1__token_weight``. The
    kinds' columns differ (a selection's ``token_weight``, a stage's ``token_*``, a pass's ``logprob``),
    so ``selection/eu_plane`` beside ``scores/eu_plane`` is ``eu_plane__token_weight`` beside
    ``eu_plane__token_score``, whatever else the run holds (before issue 28 it became
    ``selection_eu_plane__token_weight`` only when a stage shared its name). Only when two tables would
    give one name (a plugin stage writing ``token_weight`` under a selection's name) both take their full
    view name (``scores_x__token_weight``, ``selection_x__token_weight``); the warnings say so."""
    short = {t: _ident(t.split("/", 1)[1]) for t in per_token}
    users: dict[str, list[str]] = {}
    for t, cols in per_token.items():
        for c in cols:
            users.setdefault(f"{short[t]}__{c}", []).append(t)
    names, warnings = {}, []
    for name, tables in sorted(users.items()):
        if len(tables) > 1:
            warnings.append(
                f"tokens: {' and '.join(sorted(tables))} both give {name}: named "
                + ", ".join(f"{view_name(t)}__{name.split('__', 1)[1]}" for t in sorted(tables))
            )
        for t in tables:
            c = name.split("__", 1)[1]
            names[(t, c)] = name if len(tables) == 1 else f"{view_name(t)}__{c}"
    return names, warnings


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
    farm: Path | None = None  # temporary folder of symlinks to the verified shards

    def close(self) -> None:
        self.con.close()
        if self.farm is not None:
            shutil.rmtree(self.farm, ignore_errors=True)
            self.farm = None


def check_read_only(sql: str) -> None:
    """Refuse (UserError) unless ``sql`` is one statement that only reads, as DuckDB's own parser sees it:
    a SELECT (WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE parse as one), or EXPLAIN [ANALYZE] of one.
    EXPLAIN ANALYZE runs what it wraps, so `EXPLAIN ANALYZE COPY ... TO` overwrote a shard while the
    check accepted any EXPLAIN (issue 24): what EXPLAIN wraps is parsed and checked the same way."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {e}") from None
    if len(statements) != 1:
        raise UserError(
            f"refused: {len(statements) or 'no'} statements given - winnow runs exactly one read-only statement"
        )
    st = statements[0]
    kind = str(st.type).rsplit(".", 1)[-1]
    inner = _explained(st.query) if kind == "EXPLAIN" else None
    if inner is not None:
        check_read_only(inner)
        return
    if kind != "SELECT":
        raise UserError(
            f"refused: {kind} statement `{st.query.strip()[:80]}` - winnow only reads "
            "(SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of those); use --out FILE to save a result"
        )


def _explained(query: str) -> str | None:
    """The statement an EXPLAIN wraps (after ANALYZE and an options list), by DuckDB's tokenizer."""
    import duckdb

    toks = [(pos, kind) for pos, kind in duckdb.tokenize(query) if kind != duckdb.token_type.comment]
    ends = [pos for pos, _ in toks[1:]] + [len(query)]
    # a parenthesis inside a string constant is text, not nesting: only operator tokens count
    words = [
        query[pos:end].strip() if kind != duckdb.token_type.string_const else "'"
        for (pos, kind), end in zip(toks, ends, strict=True)
    ]
    i = 1 if words and words[0].upper() == "EXPLAIN" else None
    if i is None:
        return None
    if i < len(words) and words[i].upper() == "ANALYZE":
        i += 1
    if i < len(words) and words[i] == "(":  # EXPLAIN (FORMAT json) ...: skip to the matching ")"
        depth = 0
        while i < len(words):
            depth += words[i].count("(") - words[i].count(")")
            i += 1
            if depth <= 0:
                break
    return query[toks[i][0] :] if i < len(toks) else ""


def run_sql(views: Views, sql: str) -> pa.Table | None:
    """Run read-only SQL over the views; UserError for a refused statement or bad SQL."""
    check_read_only(sql)
    try:
        rel = views.con.sql(sql)
        return rel.to_arrow_table() if rel is not None else None
    except Exception as e:  # duckdb raises many error classes; all mean the SQL is wrong
        raise UserError(f"SQL error: {e}") from None


def _connect(paths: list[Path], settings: dict | None = None):
    import duckdb

    # DuckDB estimates ~0 rows for a POSITIONAL JOIN, so its build_side_probe_side optimizer would build the
    # vocab join's hash table on the per-token side: 14.8 GB and an OOM kill at 100k samples (issue 16)
    config = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "disabled_optimizers": "build_side_probe_side",
        **(settings or {}),
    }
    con = duckdb.connect(":memory:", config=config)
    con.execute("SET allowed_paths = " + _sql_list(paths))
    con.execute("SET enable_external_access = false")
    return con


def _link_farm(run: RunDir, tables: list[str]) -> tuple[Path, dict[str, list[Path]]]:
    farm = Path(tempfile.mkdtemp(prefix="winnow-inspect-"))
    atexit.register(shutil.rmtree, farm, True)
    links: dict[str, list[Path]] = {}
    for i, table in enumerate(tables):
        links[table] = []
        for j, path in enumerate(run.table(table).paths()):
            link = farm / f"t{i}_p{j}.parquet"
            os.symlink(os.path.realpath(path), link)
            links[table].append(link)
    return farm, links


def per_token_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]


def open_views(
    run_dir: str, check_lengths: bool = True, verify: bool = True, settings: dict | None = None
) -> Views:
    """A DuckDB connection (in-memory, reading only the run's verified shards) with every view defined.

    ``settings`` (e.g. ``{"memory_limit": "256MB", "temp_directory": ...}``) configure the connection when
    it is made: external access is off and the configuration locked afterwards."""
    saved, VERIFY.enabled = VERIFY.enabled, verify and VERIFY.enabled
    try:
        return _open_views(RunDir(run_dir), check_lengths, verify, settings)
    finally:
        VERIFY.enabled = saved


def _open_views(run: RunDir, check_lengths: bool, verify: bool, settings: dict | None = None) -> Views:
    stale = run.stale_tables()
    plan = run.read_json("plan.json")  # unreadable: reported by read_json, no shard count to compare
    plan_shards = plan.get("shards") if isinstance(plan, dict) else None
    warnings = [f"hiding stale table {t}: {stale[t][0]} (rerun its step)" for t in run.tables() if t in stale]
    tables = [t for t in run.tables() if t not in stale]
    damage = [m for t in run.tables() for m in run.table(t).problems() if "ignored" not in m]
    if damage:
        raise UserError("the run failed verification:\n  " + "\n  ".join(damage))
    farm, links = _link_farm(run, tables)
    out = Views(_connect([p for ps in links.values() for p in ps], settings), warnings=warnings, farm=farm)
    if not verify:
        out.warnings.append("--no-verify: shards were not checked against their commit records' sha256")
    per_token: dict[str, list[str]] = {}
    for table in tables:
        paths = links[table]
        if not paths:
            continue
        name = view_name(table)
        out.con.execute(
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
            cols = per_token_columns(run.table(table).schema())
            if cols:
                per_token[table] = cols
    if "samples" in out.views:
        shards = [(r.part, r.rows) for r in run.table("samples").records()]
        aligned = [t for t in per_token if [(r.part, r.rows) for r in run.table(t).records()] == shards]
        # the scans themselves, not the views: a view adds a projection, and DuckDB merges POSITIONAL JOINs
        # into one streaming Positional Scan only when every side is a bare table scan
        src = {t: f"read_parquet({_sql_list(links[t])}, union_by_name=true)" for t in ["samples", *aligned]}
        _tokens_view(out, per_token, check_lengths, src)
    out.con.execute("SET lock_configuration = true")
    return out


def _positional_ok(out: Views, table: str, cols: list[str], check_lengths: bool) -> bool:
    """Whether ``table``'s rows are the samples' rows in the same order (then it joins by position), with
    list lengths checked against ``n_tokens`` in the same streaming pass."""
    lens = [f"count(*) FILTER (WHERE len(x.{_q(c)}) <> s.n_tokens)" for c in cols] if check_lengths else []
    row = out.con.execute(
        "SELECT "
        + ", ".join(["count(*) FILTER (WHERE s.sample_id IS DISTINCT FROM x.sample_id)", *lens])
        + f" FROM samples s POSITIONAL JOIN (SELECT * FROM {_q(view_name(table))}) x"
    ).fetchone()
    if row[0]:
        return False
    for c, bad in zip(cols if check_lengths else [], row[1:], strict=True):
        if bad:
            out.warnings.append(f"{table}.{c}: {bad} rows whose list length differs from n_tokens")
    return True


def _tokens_view(
    out: Views, per_token: dict[str, list[str]], check_lengths: bool, src: dict[str, str]
) -> None:
    """The per-token view. Tables with the samples' shards, row counts and sample_id order (every table a
    stage writes) are POSITIONAL JOINed to samples as bare Parquet scans, which DuckDB runs as one streaming
    Positional Scan; any other table joins by sample_id (LEFT JOIN: a hash table of its lists). Issue 16:
    with hash joins for all, `inspect` grew from 286 to 801 MB between 20k and 300k samples and under a
    DuckDB memory_limit failed or spilled 6x slower. Measured at 100k samples (2-core VM, an aggregate over
    current__logprob, views over the first 10 vs all 51 shards): hash joins 226 -> 342 MB and 42 s;
    positional joins over the views (a projection on each side, so each join materialised its side)
    185 -> 281 MB and 7 s; one Positional Scan 177 -> 186 MB and 5 s."""
    con = out.con
    selects = [
        "s.sample_id",
        "g.pos",
        "s.input_ids[g.pos + 1] AS token_id",
        "v.token AS token" if "vocab" in out.views else "NULL AS token",
        's.offsets[g.pos + 1] AS "offset"',
        "s.loss_mask[g.pos + 1] AS loss_mask",
    ]
    positional, joins = [], []
    names, clashes = token_column_names(per_token)
    out.warnings += clashes
    for i, (table, cols) in enumerate(sorted(per_token.items())):
        alias = f"t{i}"
        if table in src and _positional_ok(out, table, cols, check_lengths):
            positional.append(f"POSITIONAL JOIN {src[table]} {alias}")
        else:
            joins.append(f"LEFT JOIN {_q(view_name(table))} {alias} ON {alias}.sample_id = s.sample_id")
            if check_lengths:
                _check_lengths_by_key(out, table, cols)
        for c in cols:
            col = names[(table, c)]
            selects.append(f"{alias}.{_q(c)}[g.pos + 1] AS {_q(col)}")
            out.token_columns.append(col)
    vocab_join = "LEFT JOIN vocab v ON v.token_id = s.input_ids[g.pos + 1]" if "vocab" in out.views else ""
    sql = (
        "CREATE VIEW tokens AS SELECT "
        + ", ".join(selects)
        + f" FROM {src['samples']} s "
        + " ".join(positional)
        + " CROSS JOIN LATERAL (SELECT unnest(range(s.n_tokens)) AS pos) g "
        + vocab_join
        + " "
        + " ".join(joins)
    )
    con.execute(sql)
    out.views["tokens"] = "samples"


def _check_lengths_by_key(out: Views, table: str, cols: list[str]) -> None:
    for c in cols:
        bad = out.con.execute(
            f"SELECT count(*) FROM {_q(view_name(table))} x JOIN samples s USING (sample_id) "
            f"WHERE len(x.{_q(c)}) <> s.n_tokens"
        ).fetchone()[0]
        if bad:
            out.warnings.append(f"{table}.{c}: {bad} rows whose list length differs from n_tokens")


def condition_rows(run: RunDir, query: str, what: str) -> list[tuple]:
    """Rows of ``query`` over the run's views, where ``query`` embeds a user's SQL condition ``what``.

    Only DuckDB parser and binder errors mean the condition is wrong; a table the views hide as stale
    (catalog error) is reported as such, and IO errors (a corrupt Parquet shard) propagate unchanged.
    """
    import duckdb

    try:  # the condition is pasted into ``query``: `1=1; COPY ... TO` must not run
        check_read_only(query)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    views = open_views(str(run.root), check_lengths=False)
    try:
        return views.con.sql(query).fetchall()
    except (duckdb.ParserException, duckdb.BinderException) as e:
        raise UserError(f"{what}: bad SQL condition ({e})") from None
    except duckdb.CatalogException as e:
        hidden = "; ".join(views.warnings) or "no table was hidden"
        raise UserError(f"{what}: {e} ({hidden})") from None


def eval_condition(query: str, what: str, run_dir=None, tables: dict | None = None) -> list[tuple]:
    """Rows of ``query`` (a SELECT embedding a user's condition ``what``), checked read-only and run in
    the locked-down connection: the run's views (``run_dir``) or in-memory Arrow ``tables`` with no file
    access at all. Bad SQL or a refused statement is a UserError naming ``what``."""
    import duckdb

    try:
        check_read_only(query)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    if run_dir is not None:
        views = open_views(str(run_dir), check_lengths=False)
    else:
        views = Views(_connect([]))
        for name, t in (tables or {}).items():
            views.con.register(name, t)
        views.con.execute("SET lock_configuration = true")
    try:
        return views.con.sql(query).fetchall()
    except duckdb.Error as e:
        raise UserError(f"{what}: bad SQL condition ({e})") from None
    finally:
        views.close()
