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

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.core.store import UserError

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


def iter_rows(path: Path, source: str | None = None) -> Iterator[Row]:
    source = source or str(path)
    if not path.exists():
        raise UserError(f"{path}: input does not exist")
    kind = detect_kind(path)
    try:
        yield from _READERS[kind](path, source)
    except UserError:
        raise
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
        return Row(source, i, reason="too_deep", detail="JSON nested too deeply to parse", raw=_raw_text(text))
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


def _read_jsonl(path: Path, source: str) -> Iterator[Row]:
    for i, line in enumerate(_lines(path)):
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


def _read_parquet(path: Path, source: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield Row(source, i, record=rec)
            i += 1


def _read_csv(path: Path, source: str) -> Iterator[Row]:
    # surrogateescape keeps undecodable bytes visible so that one bad row is rejected, not the file
    csv.field_size_limit(sys.maxsize)  # the 131,072-character default would fail the whole file
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise UserError(f"{path}: the CSV header names column(s) {dup} more than once; rename them")
        for i, values in enumerate(reader):
            line = ",".join(values)
            if any("\udc80" <= ch <= "\udcff" for ch in line):
                yield Row(
                    source,
                    i,
                    reason="not_utf8",
                    detail="invalid UTF-8 in row",
                    raw=line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:RAW_LIMIT],
                )
                continue
            if len(values) != len(header):
                buf = io.StringIO()
                csv.writer(buf).writerow(values)
                yield Row(
                    source,
                    i,
                    reason="malformed_csv",
                    detail=f"{len(values)} fields, header has {len(header)}",
                    raw=buf.getvalue()[:RAW_LIMIT],
                )
                continue
            yield Row(source, i, record=dict(zip(header, values, strict=True)))


def _read_hf_disk(path: Path, source: str) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, d in splits:
        src = f"{source}#{split}" if split else source
        for i, rec in enumerate(d):
            yield Row(src, i, record=dict(rec))


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "csv": _read_csv,
    "hf_disk": _read_hf_disk,
}


def file_fingerprint(path: Path) -> str:
    """Content hash of an input (a folder hashes its files in name order)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
