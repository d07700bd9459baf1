"""`winnow train` on the roof: from a run (or an export) and a model spec to the trainer, and back to the run.

The trainer (:mod:`winnow.trainer.step`) is a leaf that takes a model directory and a
:class:`~winnow.trainer.data.Dataset`. This step does everything that knows about runs: it resolves
``--model`` (``builtin:<name>`` or a directory) and online Rho-1's reference (``rho1.reference``, else the
model of the run's `reference` signals), reads ``samples/`` joined with ``selection/<name>/`` (or the
export of ``--data``) and evaluates ``eval_where``, checks the model's tokenizer against the samples', and
records the result as ``train:<name>`` in the manifest. The CLI and recipes run it as every other step
(the run lock is theirs: :func:`winnow.pipeline.cli._run_step`, :func:`winnow.pipeline.recipe.run_loaded`).

Reader checks, all :class:`UserError` (exit 2) before anything is written: the selection exists, is not
stale against its inputs, covers every samples shard with the same ``sample_id``s in the same order, has
one weight per token and no negative weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from winnow.core.models import check_tokenizer, resolve_model
from winnow.core.readers import file_fingerprint
from winnow.core.steps import Step
from winnow.core.store import RunDir, UserError, sha256_file, stable_hash
from winnow.core.views import eval_condition
from winnow.core.write_guard import check_name, check_train_out
from winnow.trainer.config import TrainParams
from winnow.trainer.data import Dataset, Rows, TrainData, check_weights, prepare_data


def _out_dir(p: TrainParams, run_dir: str | Path | None) -> tuple[Path, str]:
    if p.name:
        try:
            check_name(p.name, "--name")
        except ValueError as e:
            raise UserError(str(e)) from None
    name = p.name or p.selection or Path(p.data).stem
    if p.out:
        return Path(p.out).expanduser(), name
    if run_dir is None:
        raise UserError("winnow train --data needs --out DIR (the directory the trained model is saved to)")
    return Path(run_dir) / "train" / name, name


ALL = (
    "all"  # --selection all: every sample of samples/ (ingest's rejects are never in it), weight = loss_mask
)
NEEDS_SELECTION = (
    "winnow train RUN needs --selection NAME (a selection/ of the run) or --selection all (every "
    "non-rejected sample, every supervised token at weight 1)"
)


def run_selection(p: TrainParams, run: RunDir | None = None) -> str | None:
    """The run's selection table to read, ``None`` for every sample at ``loss_mask`` weights. A run
    without ``--selection`` is refused (issue 28: `train` trained on every sample, corrupted ones included,
    while `export` asked for a selection); ``--data`` takes none. ``--selection all`` reads
    ``selection/all`` when the run holds one (only policy ``all``, which keeps every sample, may write it:
    :class:`winnow.stages.select_policy.SelectParams`), else weighs by ``loss_mask``."""
    if p.data:
        return None
    if not p.selection:
        raise UserError(NEEDS_SELECTION)
    if p.selection == ALL:
        return ALL if run is not None and run.table(f"selection/{ALL}").exists() else None
    return p.selection


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


def read_run(run: RunDir, selection: str | None) -> Rows:
    """The rows of ``samples/`` weighted by ``selection/<selection>/`` (``None``: by ``loss_mask``)."""
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
                else check_weights(t["token_weight"][i] or [0.0] * len(ids), len(ids), where)
            )
            rows.sample_ids.append(sid)
            rows.ids.append(ids)
            rows.loss_mask.append(mask)
            rows.weights.append(w)
            rows.keep.append(True if sel is None else bool(t["keep"][i]))
    return rows


def export_table(path: Path):
    """The rows of ``--data``: the parquet of `winnow export --format parquet`, or the ``save_to_disk``
    folder of ``--format hf`` (its ``state.json`` names the Arrow stream files, read with pyarrow alone:
    ``datasets`` stays off the trainer's path)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        try:
            files = [
                path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]
            ]
            parts = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
            return pa.concat_tables(parts)
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
            raise UserError(
                f"--data {path}: not a `winnow export --format hf` folder (state.json and its data files: {e})"
            ) from None
    if not path.is_file():
        raise UserError(f"--data {path}: no such file (give the parquet or hf folder of `winnow export`)")
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several classes for a non-parquet file
        raise UserError(f"--data {path}: not a readable parquet file ({e})") from None


def read_export(path: Path) -> Rows:
    t = export_table(path)
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
            w = check_weights(d["token_weight"][i] or [0.0] * len(ids), len(ids), where)
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


def _held_out(p: TrainParams, rows: Rows, run: RunDir | None) -> set[str] | None:
    """``eval_where``'s samples (a DuckDB condition over the run's samples view or the export's columns,
    checked read-only and run in the locked-down connection of `inspect`); ``None`` without it: the
    trainer takes ``eval_fraction`` by a hash of ``sample_id``."""
    if not p.eval_where:
        return None
    query = f"select sample_id from {'samples' if run is not None else 'data'} where {p.eval_where}"
    what = f"eval_where={p.eval_where!r}"
    if run is not None:
        return {str(r[0]) for r in eval_condition(query, what, run_dir=run.root)}
    # --data: the rows already read (no path reaches SQL, so no glob and no quoting)
    import pyarrow as pa

    table = export_table(Path(p.data))
    if "sample_id" not in table.column_names:
        table = table.append_column("sample_id", pa.array(rows.sample_ids))
    return {str(r[0]) for r in eval_condition(query, what, tables={"data": table})}


def dataset(p: TrainParams, run_dir: str | Path | None) -> Dataset:
    """The trainer's dataset of ``p.data`` (an export parquet) or of the run's ``p.selection``."""
    if p.data:
        rows = read_export(Path(p.data))
        data = Path(p.data)
        digest = sha256_file(data)[:16] if data.is_file() else file_fingerprint(data)
        source: dict[str, Any] = {"data": str(Path(p.data).resolve()), "data_sha256": digest}
        return Dataset(rows, digest, source, _held_out(p, rows, None), p.data)
    run = RunDir(run_dir)
    selection = run_selection(p, run)
    rows = read_run(run, selection)
    sel_digest = run.table(f"selection/{selection}").digest() if selection else ALL
    digest = stable_hash([run.table("samples").digest(), sel_digest])
    source = {
        "run": str(run.root.resolve()),
        "selection": selection or ALL,
        "selection_digest": sel_digest,
    }
    label = f"selection/{selection}" if selection else "the samples"
    return Dataset(rows, digest, source, _held_out(p, rows, run), label, online_sink(run_dir, selection))


def online_sink(run_dir: str | Path, selection: str | None):
    """``record_weights=true``: write an epoch's online weights as a selection of the run, one shard per
    samples shard (the rows come from the trainer's recorder, ``rows_of(columns of the samples shard)``)."""

    def write(name: str, fingerprint: str, epoch: int, rows_of) -> None:
        run = RunDir(run_dir)
        samples = run.table("samples")
        inputs = {"samples": samples.digest()}
        if selection:
            inputs[f"selection/{selection}"] = run.table(f"selection/{selection}").digest()
        out = run.table(name)
        for rec in samples.records():
            cols = samples.read_part(rec.part, columns=["sample_id", "n_tokens", "loss_mask"]).to_pydict()
            out.write(rec.part, rows_of(cols), fingerprint=fingerprint, inputs=inputs, extra={"epoch": epoch})

    return write


def load_data(p: TrainParams, run_dir: str | Path | None) -> TrainData:
    """The prepared train and eval rows, as the trainer makes them (tests and benchmarks)."""
    return prepare_data(p, dataset(p, run_dir))


def _reference(p: TrainParams, run_dir: str | Path | None) -> Path | str | None:
    """Online Rho-1's reference: ``"base"``, ``rho1.reference`` resolved, else the run's `reference` model."""
    if p.online.policy != "rho1":
        return None
    if p.online.rho1.reference == "base":
        return "base"
    spec = p.online.rho1.reference
    if not spec:
        records = RunDir(run_dir).table("signals/reference").records() if run_dir is not None else []
        spec = next((r.extra.get("model") for r in records if r.extra.get("model")), "")
        if not spec:
            raise UserError(
                "online=rho1 needs a reference model: --set rho1.reference=MODEL_DIR (or builtin:NAME), or "
                "score the run with `winnow score RUN --model REF --alias reference` first"
            )
    return resolve_model(spec)


def train(p: TrainParams, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``p.model`` on a run's selection (or an export) into ``--out``; resume or skip as needed."""
    from winnow.trainer.step import IDENTITY_FILE, recorded_out
    from winnow.trainer.step import train as fit

    if not p.data and run_dir is None:
        raise UserError(
            "winnow train needs a RUN directory with --selection, or --data EXPORT (parquet or hf folder)"
        )
    run_selection(p)  # before anything is resolved or written
    if not p.model:
        raise UserError("winnow train needs --model (builtin:<name> or a local model directory)")
    out, name = _out_dir(p, run_dir)
    model_dir = resolve_model(p.model)
    check_train_out(out, run_dir, model_dir, IDENTITY_FILE)
    ds = dataset(p, run_dir)
    on_done = None
    if not p.data:
        check_tokenizer(RunDir(run_dir), model_dir, what="model")
        where = recorded_out(out, ds.source)  # train/NAME: a copied or moved run's card still finds it

        def on_done(result: dict[str, Any]) -> None:
            # also with the finished result of a done run: a rerun repairs an edited eval_loss `verify` reported
            RunDir(run_dir).update_manifest(f"train:{name}", result | {"out": where, "outputs": [where]})

    return fit(p, model_dir, ds, out, name, reference=_reference(p, run_dir), on_done=on_done)


def _run_step(run: RunDir, p: TrainParams) -> dict[str, Any]:
    res = train(p, run.root)
    before, after = res.get("eval_loss_before"), res.get("eval_loss")
    if before is not None and after is not None:
        print(
            f"[winnow] train: eval_loss {before:.4f} -> {after:.4f} after {res['steps']} steps ({res['out']})"
        )
    return res


STEP = Step(
    name="train",
    params=TrainParams,
    run=_run_step,
    help="train a model on a selection (token-weighted, trimmed, packed; resumable; torchrun)",
)
