"""`winnow ingest`: local files -> `samples/` + `rejects/` (+ `vocab/`), sharded and resumable.

Two passes over the input. The first parses every row once to fix what must be known before the
first shard is written: each file's record format, one Arrow type per ``meta_*`` column (a scan of
the whole input, so a column never changes type between shards), and the shard plan (a fixed
number of input rows per shard, numbered across files in argument order, saved as ``plan.json``).
The second pass streams the rows again shard by shard; a shard whose commit records match the
current fingerprint is skipped without tokenizing, so an interrupted ingest resumes where it died and
produces the same tables as an uninterrupted one.

**Under torchrun** (issue 29) the plan's shards are cut into contiguous blocks, one per rank
(``split_even``), and each rank reads only its block's rows (by file and row range: JSONL and Parquet
skip the rows before it unparsed). Counting rows and finding each source's format (the first row whose
format is detected) are split by file; the scan's partials (row counts, meta kinds) are gathered and
merged in rank order, so the plan, the fingerprint and every table are the same bytes as one process's
(``tests/pipeline/test_torchrun_identity.py``). Rank 0 writes the plan, the vocab and the manifest,
whose ``shards.by_rank`` lists what each rank built. Deduplication has no global dict: the scan spills
each row's sample id to hash-range partitions on the run's storage and each rank resolves its
partitions (:mod:`winnow.core.dedup`); memory per rank is bounded whatever the pool size. Measured at
100k GSM8K rows on this shared 2-core VM: 235 s on one rank, 133 s on two (1.77x), peak RSS 618 and
630 MB per rank (benchmarks/RESULTS.md, "Scaling out").

Nothing is lost: every input row becomes a sample or a reject with a reason code, and the manifest
checks ``rows_in == samples + rejects``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from winnow.core import builtins, dedup
from winnow.core.dist import Dist, distributed, split_even
from winnow.core.errors import RejectError
from winnow.core.formats import (
    FORMATS,
    canonical_messages,
    coerce_meta,
    detect_format,
    merge_kinds,
    safe_json,
    sample_id,
    to_messages,
    unique_meta_names,
    value_kind,
)
from winnow.core.readers import Row, count_rows, detect_kind, file_fingerprint, iter_rows
from winnow.core.shards import Computed, ShardLoop, shards_block, step_entry
from winnow.core.steps import Step
from winnow.core.store import RunDir, UserError, atomic_write_json, plan_digest, stable_hash

CODE_VERSION = "ingest/2"  # with render.RENDER_VERSION in the fingerprint
LOSS_ON = ("all_turns", "last_turn")
_ARROW_META = {
    "bool": pa.bool_(),
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "json": pa.string(),
}


@dataclass
class IngestParams:
    """Parameters of `winnow ingest` (also a recipe's ``step = "ingest"`` table)."""

    inputs: list[str] = field(default_factory=list)  # files, save_to_disk folders or builtin:demo
    model: str = "builtin:tiny"  # whose tokenizer and chat template render the samples
    format: str = "auto"  # auto or one of formats.FORMATS, for every input
    loss_on: str = "all_turns"  # all_turns | last_turn
    max_tokens: int = 0  # 0: the model's limit (tokenizer.model_max_length or max_position_embeddings)
    truncate: bool = (
        False  # over-long samples: False rejects them (too_long), True keeps the first max_tokens
    )
    shard_rows: int = 2000  # samples per shard of the tables (the unit of resume)
    table: str = "samples"  # "targets" ingests a DV4LLM target set beside the samples
    trust_remote_code: bool = False  # run the model repo's own Python code (only if you trust it)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one input file (or builtin:demo)")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: use auto or one of {list(FORMATS)}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r}: use one of {list(LOSS_ON)}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows={self.shard_rows}: must be at least 1")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 0 (0 = the model's limit)")
        if self.table not in ("samples", "targets"):
            raise ValueError(f"table={self.table!r}: use samples or targets")


def rejects_table(table: str) -> str:
    return "rejects" if table == "samples" else f"{table}_rejects"


def resolve_input(spec: str) -> Path:
    if spec.startswith(builtins.PREFIX):  # builtin:demo (its provider: winnow.pipeline.builtin.demo_data)
        return builtins.resolve("input", spec)
    from winnow.core.write_guard import refuse_special_file

    refuse_special_file(Path(spec))  # a FIFO or device would block the scan forever
    return Path(spec)


def model_max_tokens(tokenizer, model_dir: Path) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    import json

    cfg = model_dir / "config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text()).get("max_position_embeddings")
        if value:
            return int(value)
    return 4096


# ---- pass 1: scan ------------------------------------------------------------------------------


@dataclass
class Scan:
    rows: int = 0
    formats: dict[str, str] = field(default_factory=dict)  # source -> format
    meta_kinds: dict[str, set[str]] = field(default_factory=dict)
    per_source_rows: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Scan) -> None:
        """Add a later row range's scan (ranks merge in rank order, so sources keep their input order)."""
        self.rows += other.rows
        for src, n in other.per_source_rows.items():
            self.per_source_rows[src] = self.per_source_rows.get(src, 0) + n
        for k, kinds in other.meta_kinds.items():
            self.meta_kinds.setdefault(k, set()).update(kinds)


def _iter_all(paths: list[Path], specs: list[str]) -> Iterator[Row]:
    for path, spec in zip(paths, specs, strict=True):
        yield from iter_rows(path, source=spec)


def first_formats(path: Path, spec: str, forced: str) -> dict[str, tuple[str, int]]:
    """Each source's record format and the row it was found on: the first row with a record whose format
    is detected (or, with a forced format, the first row with a record). A file is one source except a
    save_to_disk folder (one per split), which is read to its end."""
    found: dict[str, tuple[str, int]] = {}
    one_source = detect_kind(path) != "hf_disk"
    for row in iter_rows(path, source=spec):
        if row.record is None or row.source in found:
            continue
        fmt = forced if forced != "auto" else detect_format(row.record)
        if fmt is not None:
            found[row.source] = (fmt, row.row)
            if one_source:
                break
    return found


def scan_rows(rows: Iterator[tuple[int, Row]], found: dict[str, tuple[str, int]], spill=None) -> Scan:
    """Row counts and meta kinds of ``(position, row)``s; every convertible row's sample id to ``spill``.

    The meta kinds are those the one-pass scan saw: from the row its source's format was found on
    onwards (a row before it had no format yet); the sample ids are those ingest will check for
    duplicates: every row that converts with its source's format."""
    scan = Scan(formats={src: fmt for src, (fmt, _) in found.items()})
    for pos, row in rows:
        scan.rows += 1
        scan.per_source_rows[row.source] = scan.per_source_rows.get(row.source, 0) + 1
        if row.record is None or row.source not in found:
            continue
        fmt, first = found[row.source]
        try:
            msgs, meta = to_messages(row.record, fmt)
        except RejectError:
            continue
        if spill is not None:
            spill.add(sample_id(msgs), pos)
        if row.row < first:
            continue
        for k, v in meta.items():
            kinds = scan.meta_kinds.setdefault(k, set())
            kind = value_kind(v)
            if kind:
                kinds.add(kind)
    return scan


def scan_inputs(paths: list[Path], specs: list[str], forced: str) -> Scan:
    """The whole input's scan in this process (no deduplication spill)."""
    found: dict[str, tuple[str, int]] = {}
    for path, spec in zip(paths, specs, strict=True):
        found.update(first_formats(path, spec, forced))
    return scan_rows(enumerate(_iter_all(paths, specs)), found)


def iter_range(
    paths: list[Path], specs: list[str], rows: list[int], lo: int, hi: int
) -> Iterator[tuple[int, Row]]:
    """``(position, row)`` for the rows at positions ``[lo, hi)`` over all inputs in argument order."""
    pos0 = 0
    for path, spec, n in zip(paths, specs, rows, strict=True):
        if pos0 < hi and pos0 + n > lo:
            pos = max(lo, pos0)
            for row in iter_rows(path, source=spec, start=pos - pos0):
                if pos >= hi:
                    break
                yield pos, row
                pos += 1
        pos0 += n


# ---- pass 2: shards ----------------------------------------------------------------------------


def _reject(
    row: Row, reason: str, detail: str, raw: str | None = None, dup: str | None = None, sid: str | None = None
) -> dict[str, Any]:
    if raw is None:
        raw = safe_json(row.record, 2000) if row.record is not None else row.raw
    return {
        "source": _utf8(row.source),
        "row": row.row,
        "reason": reason,
        "detail": _utf8(detail),
        "duplicate_of": dup,
        "sample_id": sid,
        "raw": _utf8(raw),
    }


def _utf8(text: str | None) -> str | None:
    """Text Arrow can store: lone surrogates become backslash escapes (a reject never fails to write)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("duplicate_of", pa.string()),
        ("sample_id", pa.string()),
        ("raw", pa.string()),
    ]
)


def samples_schema(
    meta_types: dict[str, str], tok_fp: str, model: str, names: dict[str, str] | None = None
) -> pa.Schema:
    fields = [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("messages", pa.string()),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("offsets", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.uint8())),
        ("n_tokens", pa.int32()),
        ("n_loss_tokens", pa.int32()),
    ]
    names = names or unique_meta_names(list(meta_types))
    fields += [(f"meta_{names[k]}", _ARROW_META[t]) for k, t in sorted(meta_types.items())]
    return pa.schema(fields, metadata={"winnow.tokenizer_fingerprint": tok_fp, "winnow.model": model})


@dataclass
class _Ctx:
    params: IngestParams
    tokenizer: Any
    formats: dict[str, str]
    meta_types: dict[str, str]
    max_tokens: int
    schema: pa.Schema
    meta_names: dict[str, str] = field(default_factory=dict)
    locate: Callable[[int], str] = str  # a row position -> "SOURCE:ROW" (a duplicate's detail)


# a row with its messages and meta_ fields, or the error that rejects it (record None: unreadable)
_Converted = tuple[Row, list[dict] | None, dict | None, RejectError | None]


def _convert(ctx: _Ctx, rows: list[Row]) -> list[_Converted]:
    out: list[_Converted] = []
    for row in rows:
        if row.record is None:
            out.append((row, None, None, None))
            continue
        fmt = ctx.formats.get(row.source)
        if fmt is None:
            err = RejectError("unknown_format", f"no known record format in fields {sorted(row.record)[:8]}")
            out.append((row, None, None, err))
            continue
        try:
            msgs, meta = to_messages(row.record, fmt)
            out.append((row, msgs, meta, None))
        except RejectError as e:
            out.append((row, None, None, e))
    return out


def _render_unique(ctx: _Ctx, converted: list[_Converted]) -> dict[str, Any]:
    """Render each distinct conversation once (duplicates reuse it): sample_id -> Rendered or error."""
    from winnow.core.render import render_batch

    unique: dict[str, list[dict]] = {}
    for _, msgs, _, err in converted:
        if msgs is not None and err is None:
            unique.setdefault(sample_id(msgs), msgs)
    ids = list(unique)
    rendered = render_batch(ctx.tokenizer, [unique[i] for i in ids], loss_on=ctx.params.loss_on)
    return dict(zip(ids, rendered, strict=True))


def _fit(ctx: _Ctx, r: Any) -> tuple[list[int], list[int], list[int]] | str:
    """The rendered sample within ``max_tokens`` (cut when ``truncate``), or why it is too long."""
    ids, offs, mask = r.input_ids, r.offsets, r.loss_mask
    if len(ids) <= ctx.max_tokens:
        return ids, offs, mask
    if not ctx.params.truncate:
        return f"{len(ids)} tokens > max_tokens={ctx.max_tokens} (raise max_tokens or set truncate=true)"
    n = ctx.max_tokens
    if not any(mask[:n]):
        return f"no supervised token within the first {n} tokens after truncation"
    return ids[:n], offs[:n], mask[:n]


def _sample_row(ctx: _Ctx, row: Row, sid: str, msgs: list[dict], meta: dict, r: Any, fit: tuple) -> dict:
    ids, offs, mask = fit
    rec = {
        "sample_id": sid,
        "source": row.source,
        "row": row.row,
        "messages": canonical_messages(msgs),
        "text": r.text,
        "input_ids": ids,
        "offsets": offs,
        "loss_mask": mask,
        "n_tokens": len(ids),
        "n_loss_tokens": int(sum(mask)),
    }
    for k, kind in ctx.meta_types.items():
        rec[f"meta_{ctx.meta_names[k]}"] = coerce_meta(meta.get(k), kind)
    return rec


def _build_shard(
    ctx: _Ctx, rows: list[Row], dups: dict[int, int], pos0: int = 0
) -> tuple[pa.Table, pa.Table, Counter]:
    """One shard of input rows (at positions ``pos0``, ``pos0 + 1``, ...) -> (samples, rejects, counts).

    ``dups``: position -> the position of the first row with the same sample id, for the rows that
    have one (:mod:`winnow.core.dedup`). Such a row is a ``duplicate`` when it would be kept, i.e. when
    the first was kept; otherwise it is rejected for the first one's reason."""
    converted = _convert(ctx, rows)
    rendered = _render_unique(ctx, converted)
    samples: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    counts: Counter = Counter()
    for pos, (row, msgs, meta, err) in enumerate(converted, start=pos0):
        if row.record is None:
            rejects.append(_reject(row, row.reason or "unreadable", row.detail, raw=row.raw))
            continue
        if err is not None:
            rejects.append(_reject(row, err.reason, err.detail))
            continue
        sid = sample_id(msgs)
        r = rendered[sid]
        fit = r if isinstance(r, RejectError) else _fit(ctx, r)
        if pos in dups and not isinstance(fit, (RejectError, str)):
            detail = f"same messages as {ctx.locate(dups[pos])}"
            rejects.append(_reject(row, "duplicate", detail, dup=sid, sid=sid))
            continue
        if isinstance(r, RejectError):
            rejects.append(_reject(row, r.reason, str(r), sid=sid))
            continue
        if isinstance(fit, str):
            rejects.append(_reject(row, "too_long", fit, sid=sid))
            continue
        if len(fit[0]) < len(r.input_ids):
            counts["truncated"] += 1
        samples.append(_sample_row(ctx, row, sid, msgs, meta, r, fit))
    for rj in rejects:
        counts[f"rejected_{rj['reason']}"] += 1
    counts.update(samples=len(samples), rejects=len(rejects), rows_in=len(rows))
    return (
        pa.Table.from_pylist(samples, schema=ctx.schema),
        pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA),
        counts,
    )


def _write_vocab(run: RunDir, tokenizer, tok_fp: str) -> None:
    table = run.table("vocab")
    rec = table.record(0)
    if rec is not None and rec.fingerprint == tok_fp:
        return
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    # decoded text per id, so `tokens.token` is readable (e.g. " the" rather than "Ġthe")
    texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else None for p in pieces]
    tbl = pa.table(
        {
            "token_id": pa.array(range(n), pa.int32()),
            "token": pa.array(texts, pa.string()),
            "piece": pa.array(pieces, pa.string()),
        }
    )
    table.clear()
    table.write(0, tbl, fingerprint=tok_fp)


@dataclass
class _Prepared:
    """What ingest fixes before the first shard: tokenizer, inputs, scan, limits, fingerprint, and this
    rank's shards (``parts``) with the deduplication files they look up."""

    model_dir: Path
    tokenizer: Any
    tok_fp: str
    paths: list[Path]
    specs: list[str]
    rows: list[int]  # rows per input
    scan: Scan
    meta_types: dict[str, str]
    max_tokens: int
    plan: dict[str, Any]
    fingerprint: str
    parts: range
    dedup_dir: Path
    dedup_parts: int


def _gathered(d: Dist, mine: dict) -> dict:
    out: dict = {}
    for got in d.gather(mine):
        out.update(got)
    return out


def _scan_split(run: RunDir, p: IngestParams, paths: list[Path], specs: list[str], d: Dist) -> tuple:
    """Pass 1 over this rank's rows (its shards' range), merged across ranks; the dedup files resolved.

    Counting rows (to cut ranges) and finding each source's format are split by file across ranks."""
    mine = range(d.rank, len(paths), d.world)
    counts = _gathered(d, {i: count_rows(paths[i]) for i in mine})
    rows = [counts[i] for i in range(len(paths))]
    found = _gathered(d, {k: v for i in mine for k, v in first_formats(paths[i], specs[i], p.format).items()})
    n_shards = max(1, math.ceil(sum(rows) / p.shard_rows))
    parts = split_even(n_shards, d.world, d.rank)
    folder = run.root / f".ingest-dedup-{p.table}"
    n_parts = dedup.n_partitions(sum(rows), d.world)
    if d.main:
        dedup.clear(folder)  # a killed ingest's files
    d.barrier()
    spill = dedup.Spill(folder, d.rank, n_parts)
    lo, hi = parts.start * p.shard_rows, min(parts.stop * p.shard_rows, sum(rows))
    local = scan_rows(iter_range(paths, specs, rows, lo, hi), found, spill)
    spill.flush()
    scan = Scan(formats=local.formats)
    for got in d.gather(local):  # also the barrier after every rank's spill
        scan.merge(got)
    if scan.rows != sum(rows):
        raise UserError(
            f"{', '.join(specs)}: {scan.rows} rows read but {sum(rows)} counted; did an input change?"
        )
    dedup.resolve(folder, d.world, d.rank, n_parts)
    d.barrier()
    return rows, scan, parts, folder, n_parts


def _prepare(run: RunDir, p: IngestParams, d: Dist) -> _Prepared:
    from winnow.core.models import load_tokenizer, resolve_model, tokenizer_fingerprint
    from winnow.core.render import RENDER_VERSION

    model_dir = resolve_model(p.model)
    tokenizer = load_tokenizer(model_dir, p.trust_remote_code)
    tok_fp = tokenizer_fingerprint(tokenizer)
    paths = [resolve_input(s) for s in p.inputs]
    specs = [str(x) if s.startswith("builtin:") else s for s, x in zip(p.inputs, paths, strict=True)]
    _check_distinct(paths)
    rows, scan, parts, folder, n_parts = _scan_split(run, p, paths, specs, d)
    meta_types = {k: merge_kinds(v) for k, v in scan.meta_kinds.items()}
    max_tokens = p.max_tokens or model_max_tokens(tokenizer, model_dir)
    inputs_fp = {spec: file_fingerprint(path) for spec, path in zip(specs, paths, strict=True)}
    fingerprint = stable_hash(
        {
            "code": CODE_VERSION,
            "render": RENDER_VERSION,
            "params": asdict(p) | {"inputs": specs},
            "tokenizer": tok_fp,
            "inputs": inputs_fp,
            "meta": meta_types,
            "max_tokens": max_tokens,
        }
    )
    plan = {
        "table": p.table,
        "shard_rows": p.shard_rows,
        "shards": max(1, math.ceil(scan.rows / p.shard_rows)),
        "rows": scan.rows,
        "sources": [
            {
                "source": s,
                "rows": scan.per_source_rows.get(s, 0),
                "fingerprint": inputs_fp[s],
                "format": scan.formats.get(s),
            }
            for s in specs
        ],
    }
    return _Prepared(
        model_dir,
        tokenizer,
        tok_fp,
        paths,
        specs,
        rows,
        scan,
        meta_types,
        max_tokens,
        plan,
        fingerprint,
        parts,
        folder,
        n_parts,
    )


def _row_accounting(totals: Counter, rows_scanned: int) -> dict[str, Any]:
    by_reason = {
        k.removeprefix("rejected_"): v for k, v in sorted(totals.items()) if k.startswith("rejected_")
    }
    counts = {
        "rows_in": totals["rows_in"],
        "samples": totals["samples"],
        "rejects": totals["rejects"],
        "truncated": totals["truncated"],
        "rejects_by_reason": by_reason,
    }
    if counts["rows_in"] != rows_scanned or counts["samples"] + counts["rejects"] != counts["rows_in"]:
        raise RuntimeError(f"row accounting failed: {counts} vs {rows_scanned} rows scanned")
    return counts


def _locator(scan: Scan) -> Callable[[int], str]:
    """A row position over all inputs -> ``SOURCE:ROW`` (sources are contiguous, in input order)."""
    starts, names, pos = [], [], 0
    for src, n in scan.per_source_rows.items():
        starts.append(pos)
        names.append(src)
        pos += n

    def locate(at: int) -> str:
        i = bisect.bisect_right(starts, at) - 1
        return f"{names[i]}:{at - starts[i]}"

    return locate


def _ingest_shards(run: RunDir, p: IngestParams, prep: _Prepared, d: Dist) -> ShardLoop:
    """Pass 2 over this rank's shards: fresh ones are skipped, the rest built and committed."""
    from rich.progress import Progress

    n_shards = prep.plan["shards"]
    names = unique_meta_names(list(prep.meta_types))
    schema = samples_schema(prep.meta_types, prep.tok_fp, str(prep.model_dir), names)
    ctx = _Ctx(
        p,
        prep.tokenizer,
        prep.scan.formats,
        prep.meta_types,
        prep.max_tokens,
        schema,
        names,
        _locator(prep.scan),
    )
    samples_t, rejects_t = run.table(p.table), run.table(rejects_table(p.table))
    loop = ShardLoop([samples_t, rejects_t], prep.fingerprint, n_shards)
    lookup = dedup.Lookup(prep.dedup_dir, prep.dedup_parts)
    lo, hi = prep.parts.start * p.shard_rows, min(prep.parts.stop * p.shard_rows, prep.scan.rows)
    rows = iter_range(prep.paths, prep.specs, prep.rows, lo, hi)
    work = ((part, [r for _, r in itertools.islice(rows, p.shard_rows)]) for part in prep.parts)

    def compute(part: int, shard: list[Row]) -> Computed:
        pos0 = part * p.shard_rows
        s_tbl, r_tbl, counts = _build_shard(ctx, shard, lookup.range(pos0, pos0 + len(shard)), pos0)
        return Computed((s_tbl, r_tbl), counts=counts)

    with Progress(transient=True, disable=not d.main) as bar:
        task = bar.add_task(f"ingest -> {p.table}", total=len(prep.parts))
        planned = {f"plan:{plan_file(p)}": plan_digest(prep.plan)}  # a re-ingest of other inputs: stale
        loop.run(work, compute, inputs=lambda _: planned, on_done=lambda _: bar.advance(task))
    return loop


def run_ingest(run: RunDir, p: IngestParams) -> dict[str, Any]:
    """Ingest under any world size: each rank scans and builds the shards of its row range (contiguous
    blocks of the plan), rank 0 writes the plan, vocab and manifest; the tables are the same bytes."""
    with distributed("cpu") as d:
        return _run_ingest(run, p, d)


def _run_ingest(run: RunDir, p: IngestParams, d: Dist) -> dict[str, Any]:
    t0 = time.time()
    run.root.mkdir(parents=True, exist_ok=True)
    prep = _prepare(run, p, d)
    n_shards = prep.plan["shards"]
    if d.main:
        atomic_write_json(run.root / plan_file(p), prep.plan)
        if p.table == "samples":
            _write_vocab(run, prep.tokenizer, prep.tok_fp)
        run.table(p.table).drop_parts_from(n_shards)
        run.table(rejects_table(p.table)).drop_parts_from(n_shards)
    d.barrier()
    loop = _ingest_shards(run, p, prep, d)
    totals: Counter = Counter()
    by_rank = []
    for computed, counts in d.gather((len(loop.computed), dict(loop.counts))):
        by_rank.append(computed)
        totals.update(counts)
    entry = step_entry(
        "ingest",
        config=asdict(p),
        fingerprint=prep.fingerprint,
        outputs=[t.name for t in loop.outputs],
        shards=shards_block(n_shards, sum(by_rank), n_shards - sum(by_rank), by_rank),
        counts=_row_accounting(totals, prep.scan.rows),
        started=t0,
        model=str(prep.model_dir),
        tokenizer_fingerprint=prep.tok_fp,
        max_tokens=prep.max_tokens,
        meta_columns=prep.meta_types,
        meta_column_names={k: f"meta_{v}" for k, v in unique_meta_names(list(prep.meta_types)).items()},
        inputs=prep.plan["sources"],
        world_size=d.world,
    )
    if d.main:
        run.update_manifest(manifest_key(p), entry)
        dedup.clear(prep.dedup_dir)
    d.barrier()  # the next step (a recipe's) reads the manifest
    return entry


def plan_file(p: IngestParams) -> str:
    return "plan.json" if p.table == "samples" else f"plan_{p.table}.json"


def _check_distinct(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        real = str(path.resolve())
        if real in seen:
            raise UserError(f"{path}: given twice (also as {seen[real]}); (source, row) would be ambiguous")
        seen[real] = path


def manifest_key(p: IngestParams) -> str:
    return "ingest" if p.table == "samples" else f"ingest:{p.table}"


STEP = Step(
    name="ingest",
    params=IngestParams,
    run=run_ingest,
)
