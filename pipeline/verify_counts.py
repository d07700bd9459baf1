"""What `winnow verify` checks beyond the shards (issue 24): the manifest's numbers against the commit
records they were summed from, tables the manifest lists that are gone, and plan.json against the shards.

An edited ``rows_in``, ``samples`` or ``eval_loss`` in manifest.json passed `verify` and the card
published it; ``rm -r selection/X`` passed too. Each problem names the file, the value on each side and
the step whose rerun rewrites it (a rerun recomputes the entry from the records, so it repairs them).

* per-shard counts (ingest, model passes, stages): every key the step's commit records carry, summed,
  equals the manifest's (``rejects_by_reason`` against the records' ``rejected_<reason>``);
* selections: ``samples``, ``kept``, ``dropped`` and ``weighted_tokens`` against the table itself;
* trainings: ``steps``, ``eval_loss`` and ``eval_loss_before`` against ``OUT/train_result.json``;
* the plan: its shard count against the committed samples shards once ingest is recorded, and its
  digest against the one the samples records were computed from.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from winnow.core.store import MANIFEST, RunDir, plan_digest


def _table_of(key: str, entry: dict[str, Any], tables: set[str]) -> str | None:
    kind, _, inst = key.partition(":")
    if kind == "model_pass":
        return f"signals/{inst}"
    outs = [o for o in entry.get("outputs") or [] if o in tables]
    return outs[0] if outs else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
        )
    return a == b


def _record_counts(run: RunDir, table: str) -> Counter:
    c: Counter = Counter()
    for r in run.table(table).records():
        c.update(r.extra.get("counts", {}))
    return c


def _selection_counts(run: RunDir, table: str) -> dict[str, Any]:
    import pyarrow.compute as pc

    t = run.table(table).read(columns=["keep", "n_weighted"])
    kept = int(pc.sum(pc.fill_null(t["keep"], False).cast("int64")).as_py() or 0)
    return {
        "samples": t.num_rows,
        "kept": kept,
        "dropped": t.num_rows - kept,
        "weighted_tokens": int(pc.sum(t["n_weighted"]).as_py() or 0),
    }


def _expected(run: RunDir, key: str, entry: dict[str, Any], table: str) -> dict[str, Any]:
    if key.startswith("select:"):
        return _selection_counts(run, table)
    rec = _record_counts(run, table)
    want = dict(rec)
    by_reason = entry.get("counts", {}).get("rejects_by_reason")
    if isinstance(by_reason, dict):
        want["rejects_by_reason"] = {
            k.removeprefix("rejected_"): v for k, v in rec.items() if k.startswith("rejected_")
        }
    return want


def _train_problems(man_path: Path, key: str, entry: dict[str, Any]) -> list[str]:
    out = man_path.parent / str(entry.get("out") or "")  # relative to the run since issue 28, else absolute
    result = out / "train_result.json"
    try:
        have = json.loads(result.read_text())
    except (OSError, ValueError):
        return [f"{man_path}: {key} names {result}, which is missing or unreadable; rerun `winnow train`"]
    return [
        f"{man_path}: {key} says {k}={entry.get(k)!r}, {result} {have.get(k)!r}; rerun `winnow train` to "
        "rewrite the manifest entry"
        for k in ("steps", "eval_loss", "eval_loss_before")
        if not _same(entry.get(k), have.get(k))
    ]


def manifest_problems(run: RunDir) -> list[str]:
    """Every disagreement between manifest.json, plan.json and the committed records (module docstring)."""
    man_path = run.root / MANIFEST
    man = run.read_json(MANIFEST) if man_path.exists() else None
    if not isinstance(man, dict):
        return []
    tables = set(run.tables())
    problems = [
        f"{man_path}: lists table {name}, which is gone (no committed shard); rerun the step that writes it"
        for name in sorted((man.get("tables") or {}).keys() - tables)
    ]
    for key, entry in sorted((man.get("steps") or {}).items()):
        if not isinstance(entry, dict):
            continue
        if key.startswith("train:"):
            problems += _train_problems(man_path, key, entry)
            continue
        table = _table_of(key, entry, tables)
        if table is None or table not in tables or not isinstance(entry.get("counts"), dict):
            continue
        want = _expected(run, key, entry, table)
        for k, v in sorted(entry["counts"].items()):
            if k in want and not _same(v, want[k]):
                problems.append(
                    f"{man_path}: {key} says {k}={v!r}, the commit records of {table} {want[k]!r}; rerun "
                    "that step to rewrite the manifest entry"
                )
    return problems + _plan_problems(run, man, tables)


def _plan_problems(run: RunDir, man: dict[str, Any], tables: set[str]) -> list[str]:
    plan = run.read_json("plan.json") if (run.root / "plan.json").exists() else None
    if not isinstance(plan, dict) or "samples" not in tables:
        return []
    recs = run.table("samples").records()
    path, problems = run.root / "plan.json", []
    if "ingest" in (man.get("steps") or {}) and plan.get("shards") != len(recs):
        problems.append(
            f"{path}: plans {plan.get('shards')} samples shards, {len(recs)} are committed; rerun `winnow ingest`"
        )
    digest = plan_digest(plan)
    used = {r.inputs.get("plan:plan.json") for r in recs} - {None}
    if digest is not None and used and used != {digest}:
        problems.append(
            f"{path}: differs from the plan the samples were ingested with; rerun `winnow ingest`"
        )
    return problems
