"""`winnow verify RUN`: check every table, the plan and the manifest; exit 1 on any problem.

Each committed shard is checked against its commit record (size, sha256, row count in the Parquet
footer); hashes come from the verification cache unless ``full`` (then every file is hashed again,
which also catches an edit that kept the size and mtime). Also reported: unreadable commit records,
plan or manifest; shards beyond the plan; data files without a commit record; manifest row counts
that differ from the committed records. Stale tables are listed but are not damage.
"""

from __future__ import annotations

import re

from winnow.core.store import MANIFEST, VERIFY, RunDir
from winnow.pipeline.verify_counts import manifest_problems


def verify_run(run_dir: str, full: bool = False) -> tuple[list[str], str]:
    """(problems, one-line summary) for a run directory."""
    run = RunDir(run_dir)
    if full:
        VERIFY.clear()
        VERIFY.use_disk = False
    try:
        return _verify(run)
    finally:
        VERIFY.use_disk = True


def _verify(run: RunDir) -> tuple[list[str], str]:
    problems: list[str] = []
    if (run.root / "samples").is_dir() and not isinstance(run.read_json("plan.json"), dict):
        problems.append(f"{run.root / 'plan.json'}: missing or unreadable; rerun `winnow ingest`")
    man = run.read_json(MANIFEST) if (run.root / MANIFEST).exists() else {}
    shards = rows = 0
    for name in run.tables():
        table = run.table(name)
        recs = table.records()
        shards, rows = shards + len(recs), rows + sum(r.rows for r in recs)
        recorded = set(table.record_parts())
        for path in sorted(table.dir.glob("part-*.parquet")):
            m = re.fullmatch(r"part-(\d{5,})\.parquet", path.name)
            if m and int(m.group(1)) not in recorded:
                problems.append(f"{path}: data file without a commit record (a writer removes it)")
        listed = (man or {}).get("tables", {}).get(name) if isinstance(man, dict) else None
        if isinstance(listed, dict) and listed.get("rows") != sum(r.rows for r in recs):
            problems.append(
                f"{run.root / MANIFEST}: says {name} has {listed.get('rows')} rows, its commit records "
                f"{sum(r.rows for r in recs)}; rerun any step to rewrite the manifest"
            )
    problems += manifest_problems(run)  # the manifest's numbers, listed tables and the plan (issue 24)
    problems = list(run.problems.values()) + problems
    stale = run.stale_tables()
    summary = (
        f"{run.root}: {len(run.tables())} tables, {shards} shards, {rows} rows verified; "
        f"{len(problems)} problem(s)" + (f"; stale: {', '.join(sorted(stale))}" if stale else "")
    )
    return problems, summary
