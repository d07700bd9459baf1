"""Training rows from a run's ``samples/`` joined with ``selection/<name>/``, or from an export.

Each row is ``input_ids`` with a float ``token_weight`` (the selection's, or the ``loss_mask`` as 0/1
without a selection) and its ``loss_mask``. Checks, all :class:`UserError` (exit 2) before anything is
written: the selection exists, is not stale against its inputs, covers every samples shard with the
same ``sample_id``s in the same order, has one weight per token, no negative weight, and keeps at least
one trainable sample.

Held-out split: ``eval_where`` (a DuckDB condition over the samples view, or over the export's columns)
or else ``eval_fraction`` chosen from a hash of ``sample_id`` (the same samples whatever the selection or
the machine). It is taken from *all* samples, kept or not, and excluded from training; ``eval_loss``
weighs every supervised token (``loss_mask``) at 1, so runs on different selections share a yardstick.
Up to ``eval_max_samples`` held-out samples are scored (the first by hash, again selection-independent).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from winnow.pipeline.store import RunDir, UserError, sha256_file, stable_hash
from winnow.trainer.config import TrainParams
from winnow.trainer.packing import Prepared, prepare


@dataclass
class Rows:
    sample_ids: list[str] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)  # training weights
    loss_mask: list[np.ndarray] = field(default_factory=list)
    keep: list[bool] = field(default_factory=list)


@dataclass
class TrainData:
    train: Prepared
    eval: Prepared
    digest: str
    source: dict[str, Any]
    max_token_id: int


def _hash_unit(sample_id: str) -> float:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:12], 16) / float(1 << 48)


def _check_weights(w: np.ndarray, n: int, where: str) -> np.ndarray:
    if len(w) != n:
        raise UserError(
            f"{where}: {len(w)} token weights for {n} tokens (misaligned); rerun `winnow select` on these samples"
        )
    w = np.asarray(w, dtype=np.float64)  # float64 first: a float32 cast would turn 1e39 into inf silently
    # null (NaN) weighs 0; nan_to_num's default also clamped inf to 3.4e38, which trained to NaN (issue 24)
    if np.isinf(w).any() or (np.abs(np.nan_to_num(w)) > np.finfo(np.float32).max).any():
        bad = w[np.isinf(w) | (np.abs(np.nan_to_num(w)) > np.finfo(np.float32).max)][0]
        raise UserError(f"{where}: token weight {bad} is not a finite float32; fix or drop this row")
    w = np.nan_to_num(w, nan=0.0).astype(np.float32)
    if (w < 0).any():
        raise UserError(f"{where}: negative token weights are not supported (min {float(w.min()):.3g})")
    return w


def _selection_parts(run: RunDir, selection: str):
    names = sorted(t.split("/", 1)[1] for t in run.tables() if t.startswith("selection/"))
    if selection not in names:
        raise UserError(
            f"{run.root} has no selection/{selection} (selections: {names or 'none'}); make one with "
            f"`winnow select {run.root} POLICY --name {selection}`"
        )
    stale = run.stale_tables().get(f"selection/{selection}")
    if stale:
        raise UserError(f"selection/{selection} is stale ({stale[0]}): rerun `winnow select` before training")
    return run.table(f"selection/{selection}")


def read_run(run: RunDir, selection: str) -> Rows:
    samples = run.table("samples")
    if not samples.exists():
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    sel = _selection_parts(run, selection) if selection else None
    rows = Rows()
    for rec in samples.records():
        s = samples.read_part(rec.part, columns=["sample_id", "input_ids", "loss_mask"]).to_pydict()
        if sel is not None:
            if sel.record(rec.part) is None:
                raise UserError(
                    f"selection/{selection} lacks samples shard {rec.part}: rerun `winnow select`"
                )
            t = sel.read_part(rec.part, columns=["sample_id", "keep", "token_weight"]).to_pydict()
            if t["sample_id"] != s["sample_id"]:
                raise UserError(
                    f"selection/{selection} shard {rec.part} does not match samples (other sample_ids or "
                    "order): rerun `winnow select`"
                )
        for i, sid in enumerate(s["sample_id"]):
            ids = np.asarray(s["input_ids"][i], dtype=np.int64)
            mask = np.asarray(s["loss_mask"][i], dtype=np.float32)
            where = f"selection/{selection} shard {rec.part} sample {sid}"
            w = (
                mask
                if sel is None
                else _check_weights(t["token_weight"][i] or [0.0] * len(ids), len(ids), where)
            )
            rows.sample_ids.append(sid)
            rows.ids.append(ids)
            rows.loss_mask.append(mask)
            rows.weights.append(w)
            rows.keep.append(True if sel is None else bool(t["keep"][i]))
    return rows


def read_export(path: Path) -> Rows:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"--data {path}: no such file (give the parquet of `winnow export --format parquet`)")
    try:
        t = pq.read_table(path)
    except Exception as e:  # pyarrow raises several classes for a non-parquet file
        raise UserError(f"--data {path}: not a readable parquet file ({e})") from None
    cols = set(t.column_names)
    if "input_ids" not in cols or not ({"token_weight", "labels"} & cols):
        raise UserError(
            f"--data {path}: needs input_ids and token_weight (or labels) columns; has {sorted(cols)}"
        )
    _check_ids_column(t, path)
    d = t.to_pydict()
    rows = Rows()
    for i, ids in enumerate(d["input_ids"]):
        ids = np.asarray(ids, dtype=np.int64)
        where = f"--data {path} row {i}"
        if "token_weight" in cols:
            w = _check_weights(d["token_weight"][i] or [0.0] * len(ids), len(ids), where)
        else:
            w = (np.asarray(d["labels"][i]) != -100).astype(np.float32)
        mask = (
            np.asarray(d["loss_mask"][i], dtype=np.float32)
            if "loss_mask" in cols
            else (w > 0).astype(np.float32)
        )
        rows.sample_ids.append(str(d["sample_id"][i]) if "sample_id" in cols else f"row{i}")
        rows.ids.append(ids)
        rows.weights.append(w)
        rows.loss_mask.append(mask)
        rows.keep.append(True)
    return rows


def _check_ids_column(t, path: Path) -> None:
    """``input_ids`` must be a list of integers in every row: a null or nested row gave a traceback."""
    import pyarrow as pa
    import pyarrow.compute as pc

    typ = t.schema.field("input_ids").type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_integer(typ.value_type):
        raise UserError(f"--data {path}: input_ids is {typ}, not a list of integer token ids")
    col = t["input_ids"]
    if col.null_count or pc.list_flatten(col).null_count:
        rows = [i for i, ids in enumerate(col.to_pylist()) if ids is None or None in ids]
        raise UserError(
            f"--data {path}: input_ids is null (or holds a null) in row {rows[0]}; drop or fix it"
        )


def _eval_ids(p: TrainParams, rows: Rows, run: RunDir | None) -> set[str]:
    if p.eval_where:
        from winnow.pipeline.inspect_run import eval_condition

        query = f"select sample_id from {'samples' if run is not None else 'data'} where {p.eval_where}"
        what = f"eval_where={p.eval_where!r}"
        if run is not None:
            return {str(r[0]) for r in eval_condition(query, what, run_dir=run.root)}
        # --data: the rows already read (no path reaches SQL, so no glob and no quoting), in the same
        # locked-down connection as `inspect`
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(p.data)
        if "sample_id" not in table.column_names:
            table = table.append_column("sample_id", pa.array(rows.sample_ids))
        return {str(r[0]) for r in eval_condition(query, what, tables={"data": table})}
    return {sid for sid in rows.sample_ids if _hash_unit(sid) < p.eval_fraction}


def load(p: TrainParams, run_dir: str | Path | None) -> TrainData:
    run = None
    if p.data:
        rows = read_export(Path(p.data))
        digest = sha256_file(Path(p.data))[:16]
        source: dict[str, Any] = {"data": str(Path(p.data).resolve()), "data_sha256": digest}
    else:
        run = RunDir(run_dir)
        rows = read_run(run, p.selection)
        sel_digest = run.table(f"selection/{p.selection}").digest() if p.selection else "all"
        digest = stable_hash([run.table("samples").digest(), sel_digest])
        source = {
            "run": str(run.root.resolve()),
            "selection": p.selection or "all",
            "selection_digest": sel_digest,
        }
    held = _eval_ids(p, rows, run)
    order = sorted(
        (i for i, s in enumerate(rows.sample_ids) if s in held), key=lambda i: _hash_unit(rows.sample_ids[i])
    )
    ev = order[: p.eval_max_samples]
    tr = [i for i, s in enumerate(rows.sample_ids) if rows.keep[i] and s not in held]
    pick = lambda idx, src: [src[i] for i in idx]  # noqa: E731
    train = prepare(pick(tr, rows.ids), pick(tr, rows.weights), pick(tr, rows.sample_ids), p.max_seq_len)
    evald = prepare(pick(ev, rows.ids), pick(ev, rows.loss_mask), pick(ev, rows.sample_ids), p.max_seq_len)
    if not train.ids:
        what = f"selection/{p.selection}" if p.selection else (p.data or "the samples")
        raise UserError(
            f"{what} leaves nothing to train on: {len(tr)} kept samples outside the held-out split, "
            f"skipped {train.skipped or 'none'} (max_seq_len={p.max_seq_len}); keep more samples or lower "
            "eval_fraction"
        )
    source |= {
        "samples": len(rows.sample_ids),
        "kept": int(sum(rows.keep)),
        "held_out": len(held),
        "eval_samples": len(evald.ids),
        "train_samples": len(train.ids),
        "train_skipped": train.skipped,
        "weighted_tokens": int(sum(int(np.count_nonzero(w)) for w in train.weights)),
        "weight_sum": float(sum(float(w.sum(dtype=np.float64)) for w in train.weights)),
        "eval_split": f"eval_where: {p.eval_where}" if p.eval_where else f"eval_fraction: {p.eval_fraction}",
    }
    max_id = max(int(x.max()) for x in rows.ids if len(x)) if rows.ids else 0
    return TrainData(train, evald, stable_hash([digest, source["eval_split"]]), source, max_id)
