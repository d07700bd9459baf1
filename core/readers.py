"""Read local input files row by row without ever failing a whole file on one bad row.

Every physical row of every input yields exactly one :class:`Row`: either a parsed record (a dict)
or a row-level error with a reason code, which ingest turns into a `rejects` row. Only an input
that cannot be read at all (missing, unreadable, unknown type, a JSON document that does not parse)
raises :class:`UserError`, which exits 2 naming the file.

Supported inputs: JSONL (read as bytes line by line, so a stray non-UTF-8 byte or a truncated line
rejects that line only), JSON (an array of objects, or an object holding one such array), Parquet,
CSV, and `datasets` directories written by `save_to_disk` (a Dataset or a DatasetDict, every split).
Row numbers are 0-based within their file (JSONL: the line index; CSV: the data row after the
header).

Text quirks handled rather than rejected: a UTF-8 byte-order mark is stripped (JSONL, JSON, CSV);
a file whose only line ends are CR is read line by line like any other; CSV fields of any size are
read (the csv module's 131,072-character default limit is lifted); JSON nested deeper than the
parser's recursion limit becomes a ``too_deep`` reject. A CSV header naming one column twice is a
user error (a value would be silently dropped otherwise).
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.core.store import UserError
from winnow.core.write_guard import refuse_special_file

RAW_LIMIT = 2000  # characters of a bad row kept in rejects.raw
BOM = b"\xef\xbb\xbf"


@dataclass
class Row:
    source: str
    row: int
    record: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""
    raw: str = ""


def _raw_text(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    return data[:RAW_LIMIT]


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if (
            (path / "dataset_dict.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_info.json").exists()
        ):
            return "hf_disk"
        raise UserError(
            f"{path}: a directory that is not a `datasets` save_to_disk folder "
            "(no state.json / dataset_dict.json); pass the data files instead"
        )
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    kinds = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if suffix not in kinds:
        raise UserError(
            f"{path}: unknown input type {suffix!r}; supported: {sorted(kinds)} or a save_to_disk folder"
        )
    return kinds[suffix]


def iter_rows(path: Path, source: str | None = None, start: int = 0) -> Iterator[Row]:
    """Every row of ``path`` from its ``start``-th on (0-based over the whole file, every split of a
    save_to_disk folder in turn). JSONL and Parquet skip the rows before ``start`` without parsing them
    (how an ingest rank reaches its row range, core/ingest.py); the other kinds parse and drop them."""
    source = source or str(path)
    if not path.exists():
        raise UserError(f"{path}: input does not exist")
    refuse_special_file(path)
    kind = detect_kind(path)
    try:
        if start and kind in _SKIPPERS:
            yield from _SKIPPERS[kind](path, source, start)
        else:
            yield from itertools.islice(_READERS[kind](path, source), start, None)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as {kind}: {e}") from None


def count_rows(path: Path) -> int:
    """How many rows :func:`iter_rows` yields for ``path``: JSONL counts lines and Parquet reads its
    footer (neither parses a record); the other kinds are read through."""
    kind = detect_kind(path)
    try:
        if kind == "jsonl":
            return sum(1 for _ in _lines(path))
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        return sum(1 for _ in iter_rows(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as {kind}: {e}") from None


def _parse_json_bytes(line: bytes, source: str, i: int) -> Row:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Row(
            source, i, reason="not_utf8", detail=f"invalid UTF-8 at byte {e.start}", raw=_raw_text(line)
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(
            source, i, reason="malformed_json", detail=f"{e.msg} at column {e.colno}", raw=_raw_text(text)
        )
    except RecursionError:
        return Row(
            source, i, reason="too_deep", detail="JSON nested too deeply to parse", raw=_raw_text(text)
        )
    if not isinstance(obj, dict):
        return Row(
            source,
            i,
            reason="not_an_object",
            detail=f"a JSON {type(obj).__name__}, not an object",
            raw=_raw_text(text),
        )
    return Row(source, i, record=obj)


def _lines(path: Path) -> Iterator[bytes]:
    """Lines of a file split on LF, or on CR when CR is its only line end (old Mac files)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(0)
        if b"\r" in head and b"\n" not in head and b"\n" not in f.read():
            f.seek(0)
            lines = f.read().split(b"\r")
            yield from lines[:-1] if lines and not lines[-1] else lines
            return
        f.seek(0)
        yield from f


def _read_jsonl(path: Path, source: str, start: int = 0) -> Iterator[Row]:
    for i, line in enumerate(_lines(path)):
        if i < start:
            continue  # a later rank's range: skipped unparsed
        stripped = (line.removeprefix(BOM) if i == 0 else line).strip()
        if not stripped:
            yield Row(source, i, reason="blank_line", detail="empty line", raw="")
            continue
        yield _parse_json_bytes(stripped, source, i)


def _read_json(path: Path, source: str) -> Iterator[Row]:
    data = path.read_bytes().removeprefix(BOM)
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}); a JSON document must be valid UTF-8") from None
    except json.JSONDecodeError as e:
        # Many ".json" files are really JSON Lines: fall back to line-by-line reading.
        if data.lstrip()[:1] == b"{" and b"\n" in data.strip():
            yield from _read_jsonl(path, source)
            return
        raise UserError(
            f"{path}: malformed JSON document ({e.msg}, line {e.lineno}); fix it or use JSONL"
        ) from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to parse; use JSONL (one record per line)") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{path}: expected a JSON array of records, or an object holding exactly one array"
            )
        obj = lists[0]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of records, found a {type(obj).__name__}")
    for i, rec in enumerate(obj):
        if isinstance(rec, dict):
            yield Row(source, i, record=rec)
        else:
            yield Row(
                source,
                i,
                reason="not_an_object",
                detail=f"a JSON {type(rec).__name__}, not an object",
                raw=_raw_text(json.dumps(rec, ensure_ascii=False)),
            )


def _read_parquet(path: Path, source: str, start: int = 0) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # to_pylist keeps one of them silently
        raise UserError(f"{path}: the Parquet file names column(s) {dup} more than once; rename them")
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        if i + batch.num_rows <= start:  # wholly before this rank's range: never turned into records
            i += batch.num_rows
            continue
        skip = max(0, start - i)
        for j, rec in enumerate(batch_records(batch.slice(skip))):
            yield Row(source, i + skip + j, record=rec)
        i += batch.num_rows


def batch_records(batch) -> list[dict[str, Any]]:
    """``batch.to_pylist()``, except that a column with a value Python cannot hold (``timestamp[s]``
    10^13, ``date32`` 2^31-1, ``duration`` 2^62: an OverflowError/ValueError that failed the whole file)
    gives those values as text, ``"<type>:<stored integer>"``."""
    cols = {}
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        try:
            cols[name] = col.to_pylist()
        except (OverflowError, ValueError, OSError):
            cols[name] = [_safe_value(col[j]) for j in range(len(col))]
    return [{k: v[j] for k, v in cols.items()} for j in range(batch.num_rows)]


def _safe_value(scalar) -> Any:
    """``scalar.as_py()``, with values out of Python's range as text (lists and structs element-wise)."""
    import pyarrow as pa

    try:
        return scalar.as_py()
    except (OverflowError, ValueError, OSError):
        pass
    if isinstance(scalar, pa.StructScalar):
        return {k: _safe_value(v) for k, v in scalar.items()}
    values = getattr(scalar, "values", None)  # list-like scalars
    if isinstance(values, pa.Array):
        return [_safe_value(v) for v in values]
    try:
        width = pa.int32() if scalar.type.bit_width == 32 else pa.int64()
        return f"{scalar.type}:{scalar.cast(width).as_py()}"
    except (pa.ArrowException, ValueError):
        return f"{scalar.type}:unrepresentable"


class _PushbackLines:
    """Lines for ``csv.reader`` that remember what the current record consumed and take lines back."""

    def __init__(self, f):
        self.f, self.pending, self.taken = f, collections.deque(), []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.pending.popleft() if self.pending else next(self.f)
        self.taken.append(line)
        return line


def _strict_ok(text: str) -> bool:
    try:
        list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error:
        return False
    return True


def _csv_records(f) -> Iterator[tuple[list[str] | None, str]]:
    """(fields, raw text) per record; (None, first line) for a line whose quote never closes properly.

    An unbalanced quote made the lenient reader swallow every following line into one field (100 rows
    became one response, 0 rejects: issue 24). A record spanning several lines is re-read strictly; when
    that fails (the quote reaches the end of the file, or closes mid-field), only its first line is
    rejected and the lines after it are read again as records of their own, so every line is counted."""
    lines = _PushbackLines(f)
    reader = csv.reader(lines)
    while True:
        lines.taken = []
        try:
            values = next(reader)
        except StopIteration:
            return
        if len(lines.taken) > 1 and not _strict_ok("".join(lines.taken)):
            lines.pending.extendleft(reversed(lines.taken[1:]))
            yield None, lines.taken[0]
            continue
        yield values, "".join(lines.taken)


def _read_csv(path: Path, source: str) -> Iterator[Row]:
    # surrogateescape keeps undecodable bytes visible so that one bad row is rejected, not the file
    csv.field_size_limit(sys.maxsize)  # the 131,072-character default would fail the whole file
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        records = _csv_records(f)
        first = next(records, None)
        if first is None:
            return
        header = first[0]
        if header is None:
            raise UserError(f"{path}: the CSV header has an unbalanced quote; fix its first line")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise UserError(f"{path}: the CSV header names column(s) {dup} more than once; rename them")
        for i, (values, raw) in enumerate(records):
            yield _csv_row(source, i, header, values, raw)


def _csv_row(source: str, i: int, header: list[str], values: list[str] | None, raw: str) -> Row:
    if values is None:
        text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:RAW_LIMIT]
        return Row(
            source, i, reason="malformed_csv", detail="unbalanced quote: the field never closes", raw=text
        )
    line = ",".join(values)
    if any("\udc80" <= ch <= "\udcff" for ch in line):
        return Row(
            source,
            i,
            reason="not_utf8",
            detail="invalid UTF-8 in row",
            raw=line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:RAW_LIMIT],
        )
    if len(values) != len(header):
        buf = io.StringIO()
        csv.writer(buf).writerow(values)
        return Row(
            source,
            i,
            reason="malformed_csv",
            detail=f"{len(values)} fields, header has {len(header)}",
            raw=buf.getvalue()[:RAW_LIMIT],
        )
    return Row(source, i, record=dict(zip(header, values, strict=True)))


def _read_hf_disk(path: Path, source: str) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, d in splits:
        src = f"{source}#{split}" if split else source
        for i, rec in enumerate(d):
            yield Row(src, i, record=dict(rec))


_SKIPPERS = {"jsonl": _read_jsonl, "parquet": _read_parquet}  # readers that skip to a row unparsed
_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "csv": _read_csv,
    "hf_disk": _read_hf_disk,
}


def file_fingerprint(path: Path) -> str:
    """Content hash of an input (a folder hashes its files in name order, except its top-level README.md:
    the dataset card of a `winnow export --format hf` folder describes the data and is not part of it)."""
    import hashlib

    h = hashlib.sha256()
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p != path / "README.md")
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
