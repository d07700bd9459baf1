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

Verified reads: a record is trusted only while its file still has the recorded sha256 and row count.
Hashing is streamed and remembered in a cache *outside* the run (``$WINNOW_CACHE/verify``, keyed by the
file's real path, size and mtime_ns), so an unchanged shard is hashed once per machine; a check after
that is a stat plus a small JSON read. A shard that fails is reported once (the word "checksum", the
file, the command that rebuilds it) and treated as not committed, so the owning step recomputes it on
its next run, while a read of the table refuses with that message instead of answering from a subset.
Measured at 100k samples / 25M tokens (101 files, 103 MB; benchmarks/bench_verify.py, loaded 2-core
VM): first verification 2.2 s against a 324 s ingest (0.7%), cached 0.11 s (0.04%); a query over
``samples`` took 0.30 s verified from the cache and 0.32 s with ``--no-verify`` (within noise).

Damaged metadata is never a traceback: an unreadable commit record, plan or manifest is reported
naming the file and treated as missing, so a rerun rewrites it. Shards beyond the plan's shard count
are ignored with a warning. Temporary files (``.NAME.tmp-PID``) of dead writers are removed when a
writer takes the run's lock (core/lock.py).

Staleness is derived from the records themselves: a shard whose recorded input digests differ from
the current digests of those inputs is stale, and so is every table computed from a stale one. No
step has to remember to invalidate its dependants.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.core.errors import UserError  # noqa: F401  (re-exported: store.UserError)

MANIFEST = "manifest.json"
COMMITS = "_commits"
FAULT_ENV = "WINNOW_FAULT_KILL_AFTER_SHARDS"
FAULT_RANK_ENV = "WINNOW_FAULT_RANK"
VERIFY_ENV = "WINNOW_VERIFY"  # "0": trust commit records without hashing (inspect --no-verify)
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")
# tables whose shards follow a plan file (one shard per planned part)
_PLANNED = {
    "samples": "plan.json",
    "rejects": "plan.json",
    "signals": "plan.json",
    "scores": "plan.json",
    "selection": "plan.json",
    "targets": "plan_targets.json",
    "targets_rejects": "plan_targets.json",
}


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cache_root() -> Path:
    """$WINNOW_CACHE, else ~/.cache/winnow (the same rule as builtin.demo_data.cache_dir)."""
    env = os.environ.get("WINNOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "winnow"


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VerifyCache:
    """sha256 and row count of files already hashed, keyed by (real path, size, mtime_ns).

    In memory for the process, and on disk under ``$WINNOW_CACHE/verify`` (one small JSON file per
    table folder, so a cached check of a table costs one read, not one per shard) so the next command
    does not hash again. A file rewritten in place gets a new mtime_ns (or size) and is hashed again;
    the cache never lives in the run, so a run copied elsewhere is re-verified.
    Racy entries are not trusted (git's "racy index" rule): file systems stamp mtimes from a coarse
    clock (ticks of a few ms; whole seconds on some), so an edit right after the hash may keep size
    and mtime_ns; an entry whose file mtime is within ``RACY_S`` of the moment it was hashed is
    re-hashed on its next use (in practice: only shards written in the last second).
    """

    RACY_S = 1.0

    def __init__(self) -> None:
        self.mem: dict[tuple[str, int, int], tuple[str, int, float]] = {}
        self.dirs: dict[str, dict[str, Any]] = {}  # real folder -> its on-disk entries, read once
        self.enabled = True  # False: trust records without hashing (inspect --no-verify)
        self.use_disk = True  # False: ignore the on-disk cache (`winnow verify --full`)
        self.hashed = 0  # files hashed by this process (benchmarks and tests count them)

    def clear(self) -> None:
        """Forget what this process knows (the on-disk cache stays): as if a new process started."""
        self.mem.clear()
        self.dirs.clear()

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns)

    @staticmethod
    def _file(real_dir: str) -> Path:
        h = hashlib.sha256(real_dir.encode("utf-8", "surrogateescape")).hexdigest()
        return cache_root() / "verify" / h[:2] / f"{h}.json"

    def _load_dir(self, real_dir: str) -> dict[str, Any]:
        try:
            d = json.loads(self._file(real_dir).read_text())
            entries = d["files"] if d.get("dir") == real_dir and isinstance(d.get("files"), dict) else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            entries = {}
        return entries

    def lookup(self, key: tuple[str, int, int]) -> tuple[str, int] | None:
        hit = self.mem.get(key)
        if hit is None and self.use_disk:
            folder, name = os.path.split(key[0])
            if folder not in self.dirs:
                self.dirs[folder] = self._load_dir(folder)
            e = self.dirs[folder].get(name)
            try:
                if e is not None and [e["size"], e["mtime_ns"]] == [key[1], key[2]]:
                    hit = self.mem[key] = (e["sha256"], e["rows"], float(e["hashed_at"]))
            except (KeyError, TypeError, ValueError):
                pass
        if hit is None or key[2] / 1e9 >= hit[2] - self.RACY_S:
            return None
        return hit[0], hit[1]

    def store(self, key: tuple[str, int, int], sha: str, rows: int, hashed_at: float) -> None:
        self.mem[key] = (sha, rows, hashed_at)
        folder, name = os.path.split(key[0])
        entries = self._load_dir(folder)  # re-read: another process may have added entries
        entries[name] = {
            "size": key[1],
            "mtime_ns": key[2],
            "sha256": sha,
            "rows": rows,
            "hashed_at": hashed_at,
        }
        self.dirs[folder] = entries
        try:
            atomic_write_json(self._file(folder), {"dir": folder, "files": entries})
        except OSError:  # a read-only cache only costs a re-hash next time
            pass

    def digest(self, path: Path) -> tuple[str, int]:
        """(sha256, Parquet row count or -1 when the footer is unreadable) of ``path``."""
        key = self._key(path)
        hit = self.lookup(key)
        if hit is not None:
            return hit
        hashed_at = time.time()
        sha = sha256_file(path)
        self.hashed += 1
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, ValueError, pa.ArrowException):
            rows = -1
        if self._key(path) == key:  # not rewritten while we hashed it
            self.store(key, sha, rows, hashed_at)
        return sha, rows


VERIFY = VerifyCache()


def verifying() -> bool:
    return VERIFY.enabled and os.environ.get(VERIFY_ENV, "1") != "0"


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
    """SIGKILL this process after the k-th shard commit when WINNOW_FAULT_KILL_AFTER_SHARDS=k (under
    torchrun, with WINNOW_FAULT_RANK=r, only rank r)."""
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    rank = os.environ.get(FAULT_RANK_ENV)  # torchrun: kill this one rank only (the others are torn down)
    if rank is not None and rank != os.environ.get("RANK", "0"):
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
        key, hashed_at = VERIFY._key(final), time.time()
        sha = sha256_file(final)
        VERIFY.store(key, sha, table.num_rows, hashed_at)
        self.run.problems.pop(str(final), None)
        record = CommitRecord(
            table=self.name,
            part=part,
            rows=table.num_rows,
            sha256=sha,
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
        """Remove shards numbered >= first (a re-plan produced fewer shards), committed or not."""
        for part in self.record_parts():
            if part >= first:
                self.uncommit(part)
                self.part_path(part).unlink(missing_ok=True)

    def clear(self) -> None:
        self.drop_parts_from(0)

    # ---- reading -------------------------------------------------------------------------
    def rebuild_hint(self) -> str:
        """The command whose rerun recomputes this table's shards."""
        run, top = self.run.root, self.name.split("/")
        if top[0] in ("samples", "rejects", "vocab"):
            return f"rerun the `winnow ingest ... --run {run}` that built it"
        if top[0] in ("targets", "targets_rejects"):
            return f"rerun the targets ingest (`winnow ingest ... --run {run} --set table=targets`)"
        if top[0] == "signals" and len(top) > 1:
            return f"rerun `winnow score {run} --model ... --alias {top[1]}` (or the recipe)"
        if top[0] == "scores" and len(top) > 1:
            return f"rerun `winnow score {run} {top[1]}` (or the recipe)"
        if top[0] == "selection" and len(top) > 1:
            return f"rerun `winnow select {run} ... --name {top[1]}` (or the recipe)"
        return f"rerun the step that wrote {self.name} (or the recipe)"

    def _problem(self, path: Path, what: str) -> None:
        msg = f"{path}: {what}; {self.rebuild_hint()}"
        if self.run.problems.get(str(path)) != msg:
            self.run.problems[str(path)] = msg
            warn(msg)

    def _load_record(self, part: int) -> CommitRecord | None:
        path = self.record_path(part)
        if not path.exists():
            return None
        try:
            rec = CommitRecord(**json.loads(path.read_bytes().decode("utf-8")))
            if not (isinstance(rec.sha256, str) and isinstance(rec.rows, int) and isinstance(rec.bytes, int)):
                raise TypeError("fields of the wrong type")
        except (ValueError, TypeError, OSError) as e:
            self._problem(path, f"unreadable commit record ({type(e).__name__}), treated as not committed")
            return None
        return rec

    def record(self, part: int) -> CommitRecord | None:
        """The commit record of a shard, or None if the shard is not committed, or its file was
        replaced, lost or altered after the record was written (checked against the recorded sha256
        and row count; mismatches are reported)."""
        rec = self._load_record(part)
        if rec is None:
            return None
        data = self.part_path(part)
        if not data.exists():
            self._problem(data, "committed shard is missing")
            return None
        size = data.stat().st_size
        if size != rec.bytes:
            self._problem(data, f"checksum mismatch: {size} bytes, commit record says {rec.bytes}")
            return None
        if verifying():
            sha, rows = VERIFY.digest(data)
            if sha != rec.sha256:
                self._problem(data, "checksum mismatch: sha256 differs from its commit record")
                return None
            if rows != rec.rows:
                self._problem(
                    self.record_path(part), f"commit record says {rec.rows} rows, {data.name} has {rows}"
                )
                return None
        return rec

    def planned_shards(self) -> int | None:
        """Shard count of the plan this table follows, or None (unplanned table or no plan)."""
        plan_file = _PLANNED.get(self.name.split("/")[0])
        if plan_file is None:
            return None
        plan = self.run.read_json(plan_file)
        shards = plan.get("shards") if isinstance(plan, dict) else None
        return shards if isinstance(shards, int) else None

    def record_parts(self) -> list[int]:
        """Part numbers that have a commit record file (committed or not)."""
        folder = self.dir / COMMITS
        if not folder.is_dir():
            return []
        parts = []
        for p in sorted(folder.iterdir()):
            m = re.fullmatch(r"part-(\d{5,})\.json", p.name)
            if m:
                parts.append(int(m.group(1)))
        return parts

    def records(self) -> list[CommitRecord]:
        planned = self.planned_shards()
        out = []
        for part in self.record_parts():
            if planned is not None and part >= planned:
                self._problem(self.part_path(part), f"shard beyond the plan's {planned} shards, ignored")
                continue
            rec = self.record(part)
            if rec is not None:
                out.append(rec)
        return out

    def remove_strays(self) -> list[Path]:
        """Delete shards beyond the plan and data files that have no commit record."""
        planned, removed = self.planned_shards(), []
        recorded = set(self.record_parts())
        for part in recorded:
            if planned is not None and part >= planned:
                removed += [p for p in (self.record_path(part), self.part_path(part)) if p.exists()]
                self.uncommit(part)
                self.part_path(part).unlink(missing_ok=True)
        for path in self.dir.glob("part-*.parquet"):
            m = re.fullmatch(r"part-(\d{5,})\.parquet", path.name)
            if m and int(m.group(1)) not in recorded:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def problems(self) -> list[str]:
        """Problems found so far with this table's files (bad checksums, unreadable records)."""
        prefix = str(self.dir) + os.sep
        return [m for p, m in self.run.problems.items() if p.startswith(prefix)]

    def _refuse_if_damaged(self, parts: list[int] | None = None) -> None:
        probs = self.problems()
        if parts is not None:
            names = {part_name(q) for q in parts}
            probs = [m for m in probs if Path(m.split(": ", 1)[0]).stem in names]
        bad = [m for m in probs if "ignored" not in m]
        if bad:
            raise UserError(f"table {self.name!r} is damaged: " + " | ".join(bad))

    def exists(self) -> bool:
        return bool(self.records())

    def paths(self) -> list[Path]:
        """Files of the committed shards; refuses (UserError) when a shard failed verification."""
        recs = self.records()
        self._refuse_if_damaged()
        return [self.part_path(r.part) for r in recs]

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
        self._refuse_if_damaged(parts)
        if not recs:
            raise UserError(f"table {self.name!r} has no committed shards in {self.run.root}")
        tables = [pq.read_table(self.part_path(r.part), columns=columns) for r in recs]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def read_part(self, part: int, columns: list[str] | None = None) -> pa.Table:
        if self.record(part) is None:
            self._refuse_if_damaged([part])
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
        if not str(root).strip():
            raise UserError("the run directory is empty: give --run a folder name, e.g. --run runs/mine")
        self.root = Path(root)
        self.problems: dict[str, str] = {}  # file -> message, reported once each
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"run directory {self.root} is a file, not a folder: choose another --run")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise UserError(f"run directory {self.root} does not exist (create it with `winnow ingest`)")

    def read_json(self, name: str) -> Any:
        """A JSON file of the run, or None when it is missing or unreadable (reported, naming it)."""
        path = self.root / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, OSError) as e:
            if str(path) not in self.problems:
                self.problems[str(path)] = f"{path}: unreadable ({type(e).__name__}), treated as missing"
                warn(self.problems[str(path)] + "; the next run of its step rewrites it")
            return None

    def tidy(self) -> list[Path]:
        """What a writer removes when it takes the run (core/lock.py): ``.NAME.tmp-PID`` files of
        writers that died (pid gone on this host), shard files without a commit record, and shards
        numbered beyond their plan. Readers never see any of these; removing them makes a tampered or
        crashed run whole again."""
        removed = []
        for path in self.root.rglob(".*.tmp-*"):
            m = _TMP_RE.match(path.name)
            if m and path.is_file() and not pid_alive(int(m.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
        for name in self.tables():
            removed += self.table(name).remove_strays()
        return removed

    def table(self, name: str) -> Table:
        return Table(self, name)

    def input_digest(self, key: str) -> str | None:
        """Current digest of an input named in a commit record: ``table``, ``table/part-NNNNN``, or
        ``plan:FILE`` (the input files an ingest planned, so a re-ingest of other inputs marks every
        shard of the old ingest and everything computed from it stale)."""
        if key.startswith("plan:"):
            return plan_digest(self.read_json(key[5:]))
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
        man = self.read_json(MANIFEST)
        if not isinstance(man, dict) or not isinstance(man.get("steps", {}), dict):
            return {"steps": {}}
        return man

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
        plan = self.read_json("plan.json")
        if not isinstance(plan, dict):
            what = "no" if not (self.root / "plan.json").exists() else "an unreadable"
            raise UserError(f"{self.root} has {what} plan.json: run `winnow ingest` (again) to write it")
        return plan


def plan_digest(plan: Any) -> str | None:
    """Digest of the input files a plan names (None for a missing or unreadable plan)."""
    if not isinstance(plan, dict) or not isinstance(plan.get("sources"), list):
        return None
    return stable_hash(
        [(s.get("source"), s.get("fingerprint")) for s in plan["sources"] if isinstance(s, dict)]
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
