"""`winnow export DIR --format jsonl|parquet|hf --out PATH`: the kept samples of a selection, in a form
other tools train on.

* ``jsonl``: one chat per line, ``{"messages": [...], <every meta field under its original name>,
  "winnow_sample_id": ...}`` — sample-level curation only (token weights do not survive a re-render),
  and exactly what `winnow ingest` reads back: re-ingesting gives the same ``sample_id``s.
* ``parquet`` / ``hf`` (a ``datasets`` ``save_to_disk`` folder): the tokenized rows, ready for a
  Hugging Face causal-LM trainer: ``input_ids``, ``attention_mask``, ``labels`` (``input_ids[i]``
  where ``token_weight[i] > 0``, else -100 — the Transformers convention, so token pruning needs no
  custom loss) and ``token_weight`` (for fractional weights such as cDPO's p_CE, which -100 cannot
  express), ``loss_mask`` (every supervised token, whatever the selection's weights: the held-out
  yardstick of `winnow train --data`), ``completion_mask`` (1 where ``labels`` is not -100: the column
  TRL's SFTTrainer reads), plus ``sample_id``, ``messages`` (a list of ``{role, content}`` structs, so
  `winnow ingest` reads either export back to the same ``sample_id``s) and the ``meta_*`` columns.
  Position ``i`` is ``input_ids[i]`` as a target in both winnow and Transformers, so no shift is involved.
  Both carry a dataset card (run fingerprint = the samples digest, ingest fingerprint, selection digest,
  policy and its configuration, rows and weighted tokens): the ``winnow`` key of the Parquet schema
  metadata (JSON), and ``README.md`` in the hf folder (`winnow ingest` and ``load_from_disk`` ignore it).
  `winnow train --data` reads the parquet file or the hf folder.

The selection must be fresh (not stale against the scores it came from). Output is written to a
temporary name and renamed into place; an existing ``--out`` is replaced only with ``--force``. The
export is recorded in the run manifest (``export:<selection>``: path, format, rows, weighted tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.core.store import RunDir, UserError, fsync_dir, fsync_tree
from winnow.core.write_guard import refuse_run_overlap

FORMATS = ("jsonl", "parquet", "hf")


def _selection_name(run: RunDir, name: str | None) -> str:
    names = sorted(t.split("/", 1)[1] for t in run.tables() if t.startswith("selection/"))
    if name:
        if name not in names:
            raise UserError(
                f"{run.root} has no selection/{name} (selections: {names or 'none'}); "
                f"make one with `winnow select {run.root} POLICY --name {name}`"
            )
        return name
    if len(names) != 1:
        raise UserError(
            f"{run.root} has {len(names)} selections ({names or 'none'}): name one with --selection"
            + ("" if names else f"; make one with `winnow select {run.root} POLICY`")
        )
    return names[0]


def _kept_parts(run: RunDir, name: str):
    """(samples rows, their token_weight) of the kept samples, shard by shard."""
    samples, sel = run.table("samples"), run.table(f"selection/{name}")
    for rec in samples.records():
        s = samples.read_part(rec.part)
        if sel.record(rec.part) is None:
            raise UserError(f"selection/{name} lacks shard {rec.part}: rerun `winnow select`")
        t = sel.read_part(rec.part, columns=["sample_id", "keep", "token_weight"])
        if not t["sample_id"].equals(s["sample_id"]):
            raise UserError(
                f"selection/{name} shard {rec.part} does not match samples: rerun `winnow select`"
            )
        keep = pc.fill_null(t["keep"], False)
        yield s.filter(keep), t["token_weight"].filter(keep)


def _labels(input_ids: pa.ChunkedArray, weight: pa.ChunkedArray) -> pa.Array:
    ids = input_ids.combine_chunks()
    w = weight.combine_chunks()
    flat_ids = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_w = pc.fill_null(pc.list_flatten(w), 0.0).to_numpy(zero_copy_only=False)
    assert len(flat_ids) == len(flat_w), "token_weight does not align with input_ids"
    labels = np.where(flat_w > 0, flat_ids, -100)
    return pa.ListArray.from_arrays(ids.offsets, pa.array(labels, pa.int64()))


# the chat as a list of structs, as chat datasets on the Hub hold it: a JSON string column made
# `winnow ingest` of the hf export reject every row (issue 28)
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _train_table(s: pa.Table, weight: pa.ChunkedArray, card_meta: dict[bytes, bytes]) -> pa.Table:
    messages = pa.array([json.loads(m) for m in s["messages"].to_pylist()], MESSAGES_TYPE)
    cols: dict[str, Any] = {"sample_id": s["sample_id"], "messages": messages}
    ids = s["input_ids"].combine_chunks()
    cols["input_ids"] = ids
    ones = pa.array(np.ones(len(pc.list_flatten(ids)), np.int8))
    cols["attention_mask"] = pa.ListArray.from_arrays(ids.offsets, ones)
    labels = _labels(s["input_ids"], weight)
    cols["labels"] = labels
    # what TRL's SFTTrainer reads (1 on the tokens trained on): labels != -100
    trained = pc.not_equal(pc.list_flatten(labels), -100).cast(pa.int8())
    cols["completion_mask"] = pa.ListArray.from_arrays(labels.offsets, trained)
    cols["token_weight"] = weight.combine_chunks()
    cols["loss_mask"] = s["loss_mask"]  # every supervised token: `winnow train --data` scores eval_loss on it
    for c in s.column_names:
        if c.startswith("meta_"):
            cols[c] = s[c]
    return pa.table(cols).replace_schema_metadata(card_meta)


def _jsonl_lines(s: pa.Table, meta_kinds: dict[str, str]) -> list[str]:
    lines = []
    for row in s.to_pylist():
        rec: dict[str, Any] = {"messages": json.loads(row["messages"])}
        for k, kind in meta_kinds.items():
            v = row.get(f"meta_{k}")
            rec[k] = json.loads(v) if kind == "json" and v is not None else v
        rec["winnow_sample_id"] = row["sample_id"]
        lines.append(json.dumps(rec, ensure_ascii=False))
    return lines


def _n_weighted(weight: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(pc.greater(pc.list_flatten(weight), 0)).as_py() or 0)


def _write(
    run: RunDir, name: str, fmt: str, tmp: Path, meta_kinds: dict[str, str], card: dict[str, Any]
) -> tuple[int, int]:
    """Write the kept samples to ``tmp`` (a file, or a folder for hf); returns (rows, weighted tokens)."""
    rows = weighted = 0
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for s, w in _kept_parts(run, name):
                f.writelines(line + "\n" for line in _jsonl_lines(s, meta_kinds))
                rows, weighted = rows + s.num_rows, weighted + _n_weighted(w)
        return rows, weighted
    card_meta = {CARD_KEY: json.dumps(card, sort_keys=True).encode()}
    tables = (_train_table(s, w, card_meta) for s, w in _kept_parts(run, name))
    if fmt == "hf":
        counts = _write_hf(tables, tmp)
        (tmp / "README.md").write_text(card_markdown(card), encoding="utf-8")
        return counts
    writer = None
    try:
        for t in tables:
            writer = writer or pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
            rows, weighted = rows + t.num_rows, weighted + _n_weighted(t["token_weight"])
    finally:
        if writer is not None:
            writer.close()
    assert writer is not None, "export_selection checked that some sample is kept"
    return rows, weighted


CARD_KEY = b"winnow"  # the Parquet/Arrow schema metadata key of the dataset card


def _card(run: RunDir, name: str) -> dict[str, Any]:
    """The export's provenance: the run's samples digest and ingest fingerprint, the selection's digest,
    policy and configuration, and the counts (rows and weighted tokens, counted from the selection
    before anything is written, so the Parquet schema metadata can carry them)."""
    steps = run.manifest().get("steps", {})
    select = steps.get(f"select:{name}", {})
    sel = run.table(f"selection/{name}")
    rows = weighted = 0
    for rec in sel.records():
        t = sel.read_part(rec.part, columns=["keep", "token_weight"])
        t = t.filter(pc.fill_null(t["keep"], False))
        rows, weighted = rows + t.num_rows, weighted + _n_weighted(t["token_weight"])
    return {
        "run_fingerprint": run.table("samples").digest(),
        "ingest_fingerprint": steps.get("ingest", {}).get("fingerprint"),
        "selection": name,
        "selection_digest": sel.digest(),
        "selection_fingerprint": select.get("fingerprint"),
        "policy": select.get("config", {}).get("policy"),
        "policy_config": select.get("config", {}),
        "counts": {
            "rows": rows,
            "weighted_tokens": weighted,
            "run_samples": run.manifest().get("tables", {}).get("samples", {}).get("rows"),
        },
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The hf export's README.md: a dataset card whose YAML front matter and table carry ``card``."""
    lines = ["---", "tags:", "- winnow", "winnow:"]
    lines += [f"  {k}: {json.dumps(v, sort_keys=True)}" for k, v in card.items()]
    lines += ["---", "", f"# winnow export of selection `{card['selection']}`", "", "| field | value |"]
    lines += ["|---|---|"] + [f"| {k} | `{json.dumps(v, sort_keys=True)}` |" for k, v in card.items()]
    lines += [
        "",
        "Rows: `input_ids`, `attention_mask`, `labels` (-100 where the selection gives no weight), "
        "`completion_mask` (1 on the tokens trained on, as TRL's SFTTrainer reads it), `token_weight`, "
        "`loss_mask`, `sample_id`, `messages` and the `meta_*` columns. Load with "
        "`datasets.load_from_disk`; `winnow train --data` and `winnow ingest` read this folder too.",
    ]
    return "\n".join(lines) + "\n"


# datasets' own default ``max_shard_size`` for save_to_disk (an uncompressed Arrow size)
HF_SHARD_BYTES = 500 * 2**20


def _write_hf(tables: Iterator[pa.Table], folder: Path) -> tuple[int, int]:
    """The ``save_to_disk`` layout (``data-XXXXX-of-NNNNN.arrow``, ``state.json``, ``dataset_info.json``)
    written shard by shard with ``datasets``' own ``ArrowWriter``, so memory does not grow with the export.

    Going through ``Dataset.from_parquet(...).save_to_disk`` grew from 255 to 590 MB peak RSS between
    20k and 300k samples (the Arrow cache and the saved files are memory-mapped while they are read):
    issue 16. ``load_from_disk`` reads the result back; a test checks it equals the ``datasets`` route.
    """
    from dataclasses import asdict

    from datasets import DatasetInfo, Features
    from datasets.arrow_writer import ArrowWriter

    folder.mkdir()
    files: list[Path] = []
    writer, features, size, rows, weighted = None, None, 0, 0, 0
    try:
        # rolling over between pieces of a shard keeps each data file near HF_SHARD_BYTES
        for t in (piece for table in tables for piece in table.to_batches(max_chunksize=256)):
            if writer is None or size >= HF_SHARD_BYTES:
                if writer is not None:
                    writer.finalize()
                    writer.close()
                features = features or Features.from_arrow_schema(t.schema)
                files.append(folder / f".part-{len(files)}.arrow")
                writer, size = ArrowWriter(features=features, path=str(files[-1])), 0
            writer.write_table(pa.Table.from_batches([t]))
            size, rows, weighted = (
                size + t.nbytes,
                rows + t.num_rows,
                weighted + _n_weighted(t["token_weight"]),
            )
    finally:
        if writer is not None:
            writer.finalize()
            writer.close()
    assert features is not None, "export_selection checked that some sample is kept"
    names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    for f, n in zip(files, names, strict=True):
        os.rename(f, folder / n)
    digest = hashlib.sha256(f"{features}|{rows}|{weighted}".encode()).hexdigest()[:16]
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": digest,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(DatasetInfo(features=features))
    (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
    return rows, weighted


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Readers see the old output or the new one: a file replaces a file in one rename; otherwise the
    old output is renamed aside first and removed only after the new one is in place."""
    old = None
    if out.is_dir() or (out.exists() and tmp.is_dir()):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        _remove(old)


def export_selection(
    run_dir: str | Path, fmt: str, out: str | Path, selection: str | None = None, force: bool = False
) -> dict[str, Any]:
    t0 = time.time()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    run = RunDir(run_dir)
    if not run.table("samples").exists():
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    name = _selection_name(run, selection)
    stale = run.stale_tables().get(f"selection/{name}")
    if stale:
        raise UserError(f"selection/{name} is stale ({stale[0]}): rerun `winnow select` before exporting")
    kept = run.table(f"selection/{name}").read(columns=["keep"])["keep"]
    if not pc.sum(pc.fill_null(kept, False).cast(pa.int64())).as_py():
        raise UserError(f"selection/{name} keeps no samples: nothing to export")
    out = Path(out)
    refuse_run_overlap(run.root, out, "--out")
    if out.exists() and not force:
        raise UserError(f"{out} exists: pass --force to replace it, or choose another --out")
    meta_kinds = run.manifest().get("steps", {}).get("ingest", {}).get("meta_columns", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        rows, weighted = _write(run, name, fmt, tmp, meta_kinds, _card(run, name))
        fsync_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    entry = {
        "step": "export",
        "selection": name,
        "format": fmt,
        "out": str(out.resolve()),
        "rows": rows,
        "weighted_tokens": weighted,
        "wall_s": round(time.time() - t0, 3),
    }
    run.update_manifest(f"export:{name}", entry)
    return entry
