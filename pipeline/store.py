"""The run store: one directory per run, tables made of self-committing Parquet shards.

Layout of a run directory::

    manifest.json            summary of every step (config, fingerprints, counts, wall time, staleness)
    plan.json                the shard plan of the ingested input (rows per shard, source ranges)
    samples/part-00000.parquet          a shard of a table ...
    samples/_commits/part-00000.json    ... and its commit record, written last
    rejects/ vocab/ signals/<alias>/ scores/<stage>/ selection/<name>/ targets/

Commit protocol (the lesson of datatrove/Dolma completion markers plus tmp+rename, which none of the
big curation tools does for data files): a shard is written to a hidden temporary name in the table
folder, fsynced, renamed onto ``part-NNNNN.parquet``, and only then is its commit record written
(itself via tmp+rename). The record holds the row count, the file's sha256 and size, the Arrow
schema, the step's fingerprint (config + code version) and the digests of the inputs the shard was
computed from. Readers enumerate records, never a glob, so a half-written file is invisible.

Staleness is derived from the records themselves: a shard whose recorded input digests differ from
the current digests of those inputs is stale, and so is every table computed from a stale one. No
step has to remember to invalidate its dependants.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipeline.errors import UserError  # noqa: F401  (re-exported: store.UserError)

MANIFEST = "manifest.json"
COMMITS = "_commits"
FAULT_ENV = "WINNOW_FAULT_KILL_AFTER_SHARDS"


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort where directories cannot sync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file below a folder and the folder itself (before renaming it into place)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        fsync_dir(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


@dataclass
class CommitRecord:
    table: str
    part: int
    rows: int
    sha256: str
    bytes: int
    schema: str
    fingerprint: str
    inputs: dict[str, str] = field(default_factory=dict)
    committed_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _fault_hook() -> None:
    """SIGKILL this process after the k-th shard commit when WINNOW_FAULT_KILL_AFTER_SHARDS=k."""
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    _fault_hook.count = getattr(_fault_hook, "count", 0) + 1  # type: ignore[attr-defined]
    if _fault_hook.count >= int(limit):  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)


def shard_done() -> None:
    """Call once a step has committed every table of one shard (the fault hook counts these)."""
    _fault_hook()


class Table:
    """One table of a run: a folder of committed Parquet shards."""

    def __init__(self, run: RunDir, name: str):
        self.run = run
        self.name = name
        self.dir = run.root / name

    # ---- writing -------------------------------------------------------------------------
    def record_path(self, part: int) -> Path:
        return self.dir / COMMITS / f"{part_name(part)}.json"

    def part_path(self, part: int) -> Path:
        return self.dir / f"{part_name(part)}.parquet"

    def uncommit(self, part: int) -> None:
        """Withdraw a shard's commit record before rewriting it, so a crash mid-rewrite leaves no
        record that points at a file with other contents."""
        self.record_path(part).unlink(missing_ok=True)

    def write(
        self,
        part: int,
        table: pa.Table,
        *,
        fingerprint: str,
        inputs: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> CommitRecord:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.uncommit(part)
        final = self.part_path(part)
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.dir)
        record = CommitRecord(
            table=self.name,
            part=part,
            rows=table.num_rows,
            sha256=sha256_file(final),
            bytes=final.stat().st_size,
            schema=table.schema.to_string(show_field_metadata=False, show_schema_metadata=False),
            fingerprint=fingerprint,
            inputs=dict(inputs or {}),
            committed_at=time.time(),
            extra=dict(extra or {}),
        )
        atomic_write_json(self.record_path(part), record.to_json())
        return record

    def drop_parts_from(self, first: int) -> None:
        """Remove shards numbered >= first (a re-plan produced fewer shards)."""
        for rec in self.records():
            if rec.part >= first:
                self.uncommit(rec.part)
                self.part_path(rec.part).unlink(missing_ok=True)

    def clear(self) -> None:
        self.drop_parts_from(0)

    # ---- reading -------------------------------------------------------------------------
    def record(self, part: int) -> CommitRecord | None:
        """The commit record of a shard, or None if the shard is not committed (or its file was
        replaced or lost after the record was written)."""
        path = self.record_path(part)
        if not path.exists():
            return None
        try:
            rec = CommitRecord(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None
        data = self.part_path(part)
        if not data.exists() or data.stat().st_size != rec.bytes:
            return None
        return rec

    def records(self) -> list[CommitRecord]:
        folder = self.dir / COMMITS
        if not folder.is_dir():
            return []
        out = []
        for p in sorted(folder.glob("part-*.json")):
            rec = self.record(int(p.stem.split("-")[1]))
            if rec is not None:
                out.append(rec)
        return out

    def exists(self) -> bool:
        return bool(self.records())

    def paths(self) -> list[Path]:
        return [self.part_path(r.part) for r in self.records()]

    def digest(self) -> str:
        """Fingerprint of the table's committed contents (order-independent over shards)."""
        return stable_hash([(r.part, r.sha256) for r in self.records()])

    def part_digest(self, part: int) -> str | None:
        rec = self.record(part)
        return rec.sha256 if rec else None

    def read(self, columns: list[str] | None = None, parts: list[int] | None = None) -> pa.Table:
        recs = self.records()
        if parts is not None:
            wanted = set(parts)
            recs = [r for r in recs if r.part in wanted]
        if not recs:
            raise UserError(f"table {self.name!r} has no committed shards in {self.run.root}")
        tables = [pq.read_table(self.part_path(r.part), columns=columns) for r in recs]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def read_part(self, part: int, columns: list[str] | None = None) -> pa.Table:
        if self.record(part) is None:
            raise UserError(f"shard {part_name(part)} of table {self.name!r} is not committed")
        return pq.read_table(self.part_path(part), columns=columns)

    def schema(self) -> pa.Schema | None:
        recs = self.records()
        return pq.read_schema(self.part_path(recs[0].part)) if recs else None

    # ---- freshness -----------------------------------------------------------------------
    def stale_reasons(self) -> list[str]:
        """Why this table no longer matches its inputs (empty when it is fresh)."""
        reasons = []
        for rec in self.records():
            for key, digest in rec.inputs.items():
                current = self.run.input_digest(key)
                if current != digest:
                    reasons.append(f"{part_name(rec.part)} was computed from an older {key}")
                    break
        return reasons


class RunDir:
    """A run directory and its manifest."""

    def __init__(self, root: str | os.PathLike[str], create: bool = False):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise UserError(f"run directory {self.root} does not exist (create it with `winnow ingest`)")

    def table(self, name: str) -> Table:
        return Table(self, name)

    def input_digest(self, key: str) -> str | None:
        """Current digest of an input named in a commit record: ``table`` or ``table/part-NNNNN``."""
        if "/part-" in key:
            table, part = key.rsplit("/part-", 1)
            return self.table(table).part_digest(int(part))
        return self.table(key).digest()

    def tables(self) -> list[str]:
        """Every table with at least one commit record, as a path relative to the run root."""
        names = []
        for commits in sorted(self.root.rglob(COMMITS)):
            if commits.is_dir() and any(commits.glob("part-*.json")):
                names.append(commits.parent.relative_to(self.root).as_posix())
        return names

    def stale_tables(self) -> dict[str, list[str]]:
        """Tables computed from inputs that have changed since, transitively."""
        stale: dict[str, list[str]] = {}
        names = self.tables()
        for name in names:
            reasons = self.table(name).stale_reasons()
            if reasons:
                stale[name] = reasons
        changed = True
        while changed:  # a table built from a stale table is stale too
            changed = False
            for name in names:
                if name in stale:
                    continue
                for rec in self.table(name).records():
                    ups = {k.split("/part-")[0] for k in rec.inputs}
                    bad = ups & stale.keys()
                    if bad:
                        stale[name] = [f"computed from stale table {sorted(bad)[0]}"]
                        changed = True
                        break
        return stale

    # ---- manifest ------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return {"steps": {}}
        return json.loads(path.read_text())

    def update_manifest(self, step: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Record one step's summary; also refreshes the staleness of every table.

        Only one process may call this (rank 0 under torchrun).
        """
        man = self.manifest()
        man.setdefault("steps", {})[step] = entry
        stale = self.stale_tables()
        man["tables"] = {
            name: {
                "shards": len(self.table(name).records()),
                "rows": sum(r.rows for r in self.table(name).records()),
                "stale": name in stale,
                **({"stale_reason": stale[name][0]} if name in stale else {}),
            }
            for name in self.tables()
        }
        man["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.root / MANIFEST, man)
        return man

    def plan(self) -> dict[str, Any]:
        path = self.root / "plan.json"
        if not path.exists():
            raise UserError(f"{self.root} has no plan.json: run `winnow ingest` first")
        return json.loads(path.read_text())


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the outputs (for the manifest)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("winnow", "torch", "transformers", "tokenizers", "pyarrow", "polars", "duckdb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
