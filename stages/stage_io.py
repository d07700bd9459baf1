"""Parquet adapter helpers shared by the scoring stages (`winnow score DIR STAGE`).

A scoring stage is a plain array function (torch, batch-first with a mask, callable online by the
trainer on one mini-batch) wrapped by a thin adapter. This module is that adapter's toolbox:

* **Reading.** :func:`read_shard` reads one samples shard and the same-numbered shard of every
  ``signals/<alias>`` table it needs, aligns rows by ``sample_id`` (signals are written in samples
  order, but the join does not rely on it), checks that every per-token list has exactly
  ``n_tokens`` entries, and returns padded ``(B, T)`` float64 arrays with NaN where the list holds
  null (or NaN). float64 because a whole-dataset quantile or top-k over millions of float32 values
  should not depend on summation order; the values themselves are float32 in the tables.
* **Writing.** :func:`to_list_array` turns a padded array plus a validity mask back into a per-token
  list column with exactly ``n_tokens`` entries and null where there is no value (never 0: 0 is a
  valid score). :class:`StageOutput` owns ``scores/<stage>`` through the shared shard loop
  (:class:`winnow.core.shards.ShardLoop`): its fingerprint, ``skip_if_fresh``, ``commit`` (the
  shard, its commit record with the shard's counts, then the fault hook) and ``finish`` (the step's
  manifest entry under ``stage:<name>``, in the shape every step shares).
* **Freshness.** The output fingerprint is a hash of the stage name, its parameters and its
  ``CODE_VERSION``. Per-shard stages record per-shard input digests (``signals/current/part-00003``)
  and skip shards whose record matches; stages with global statistics (dataset quantiles, top-k
  across the dataset or across simulated batches that span shards) record whole-table digests and
  recompute every shard when anything changed (:func:`all_fresh`).
* **Simulated batches.** :func:`winnow.stages.topk.minibatches` cuts a seeded permutation of the
  samples into mini-batches (8 by default, the trainer's own batch definition), so an offline stage
  approximates the trainer's per-batch selection. Samples are numbered in (shard, row) order, which
  is input order whatever the shard size.
* **Supervised tokens.** A stage scores position ``i`` when ``loss_mask[i] == 1`` *and* every signal
  it needs is non-null at ``i``; supervised positions without a signal are counted
  (``supervised_without_signal``) so a mismatch between a model pass and the loss mask is visible.
* **Deterministic selection.** Counts and top-k live in :mod:`winnow.stages.topk` (torch/numpy only, so
  the trainer imports them on GPU machines) and are re-exported here for the adapters.
* **Synthetic runs** for tests (a samples or ``signals/<alias>`` shard written by hand) live in
  ``tests/stage_fixtures.py``, outside the package.

Measured on this 2-core CPU while other jobs ran (single runs, noisy): 8,000 synthetic samples, about
1.3M tokens in 4 shards of 2,000: eu_plane 6-12 s over the whole dataset (7.6 s with simulated
batches of 8), excess_loss 2.2 s (2.8 s with batches of 8), sstoken 4.6 s, critical_tokens 2.1 s;
a rerun with nothing changed skips every shard in about 0.1 s. Parquet reads and writes are about a
quarter of it; the rest is float64 ``(B, T)`` array work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.core.dist import Dist
from winnow.core.params import as_dict
from winnow.core.shards import ShardLoop, shards_block, step_entry
from winnow.core.store import RunDir, Table, UserError, part_name, stable_hash
from winnow.stages import topk

if TYPE_CHECKING:
    pass

SAMPLES = "samples"

# Per-token signal columns a model pass can write, and the --signals name that produces each.
SIGNAL_FLAGS = {"logprob": "logprob", "entropy": "entropy", "attn_importance": "attention"}

# Counting and top-k live in the torch/numpy-only topk module (the trainer imports them on GPU machines);
# re-exported here for the adapters.
COUNT_EPS = topk.COUNT_EPS
floor_count, ceil_count, round_count = topk.floor_count, topk.ceil_count, topk.round_count
lowest_k_per_row, highest_k_per_row, top_fraction = (
    topk.lowest_k_per_row,
    topk.highest_k_per_row,
    topk.top_fraction,
)
simulated_batches = topk.minibatches


# ---- inputs --------------------------------------------------------------------------------------
def signals_command(run: RunDir, alias: str, columns: list[str]) -> str:
    flags = ",".join(sorted({SIGNAL_FLAGS.get(c, c) for c in columns}))
    return f"winnow score {run.root} --model PATH --alias {alias} --signals {flags}"


def samples_parts(run: RunDir) -> list[int]:
    parts = [r.part for r in run.table(SAMPLES).records()]
    if not parts:
        raise UserError(
            f"{run.root} has no committed samples: run `winnow ingest INPUT --run {run.root}` first"
        )
    return parts


def require_table(run: RunDir, name: str, parts: list[int], hint: str) -> Table:
    """The table ``name``, checked to have a committed shard for every samples shard."""
    table = run.table(name)
    have = {r.part for r in table.records()}
    if not have:
        raise UserError(f"{run.root} has no {name}/ table; produce it with `{hint}`")
    missing = [p for p in parts if p not in have]
    if missing:
        raise UserError(
            f"{name}/ lacks {len(missing)} of the {len(parts)} samples shards (first: {part_name(missing[0])}); "
            f"rerun `{hint}` to complete it"
        )
    stale = table.stale_reasons()
    if stale:
        raise UserError(f"{name}/ is stale ({stale[0]}); rerun `{hint}` first")
    return table


def require_signals(run: RunDir, alias: str, columns: list[str], parts: list[int]) -> Table:
    """``signals/<alias>``, checked to exist for every shard and to hold ``columns``."""
    hint = signals_command(run, alias, columns)
    table = require_table(run, f"signals/{alias}", parts, hint)
    schema = table.schema()
    absent = [c for c in columns if schema is None or c not in schema.names]
    if absent:
        raise UserError(f"signals/{alias} has no column(s) {absent}; produce them with `{hint}`")
    return table


def model_fingerprints(run: RunDir, alias: str) -> set[str]:
    """The weight fingerprints recorded by the model pass that wrote ``signals/<alias>``."""
    out = set()
    for rec in run.table(f"signals/{alias}").records():
        fp = rec.extra.get("model_fingerprint")
        if fp:
            out.add(str(fp))
    return out


def refuse_same_weights(run: RunDir, alias_a: str, alias_b: str, consequence: str) -> None:
    """:class:`UserError` when ``signals/<alias_a>`` and ``signals/<alias_b>`` were computed with the same
    weights (equal ``model_fingerprint``, a hash of the tensors): a contrast of the two would be 0."""
    same = model_fingerprints(run, alias_a) & model_fingerprints(run, alias_b)
    if same:
        raise UserError(
            f"signals/{alias_a} and signals/{alias_b} were computed with the same weights "
            f"(model fingerprint {sorted(same)[0]}): {consequence}"
        )


def field_anchor(table: Table, column: str) -> str | None:
    """The ``winnow.anchor`` field metadata of a column (e.g. ``query`` for attention rows)."""
    schema = table.schema()
    if schema is None or column not in schema.names:
        return None
    meta = schema.field(column).metadata or {}
    value = meta.get(b"winnow.anchor")
    return value.decode() if value is not None else None


# ---- reading one shard -----------------------------------------------------------------------------
@dataclass
class Shard:
    """One samples shard with the signals a stage asked for, padded to ``(B, T)``.

    ``signals[(alias, column)]`` is float64 with NaN where the list held null; ``loss_mask`` is bool
    and False beyond each row's length; ``samples`` holds the requested samples columns.
    """

    part: int
    sample_id: pa.Array
    n_tokens: np.ndarray  # (B,) int64
    loss_mask: np.ndarray  # (B, T) bool
    signals: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    samples: pa.Table | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_tokens)]).astype(np.int64)

    def valid(self, *keys: tuple[str, str]) -> np.ndarray:
        """Supervised positions where every named signal has a value, (B, T) bool."""
        mask = self.loss_mask.copy()
        for key in keys:
            mask &= ~np.isnan(self.signals[key])
        return mask

    def supervised_without_signal(self, *keys: tuple[str, str]) -> int:
        return int(self.loss_mask.sum() - self.valid(*keys).sum())


def _list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)


def padded(col: pa.ChunkedArray | pa.Array, n_tokens: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """A per-token list column as a ``(B, max n_tokens)`` array; null (or NaN) entries become NaN.

    A null list (signal not computed for that sample) is all NaN.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n_rows = len(arr)
    width = int(n_tokens.max()) if n_rows else 0
    out = np.full((n_rows, width), np.nan, dtype=dtype)
    if n_rows == 0 or width == 0:
        return out
    lengths = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    flat = arr.flatten()  # respects slicing offsets, unlike .values
    values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype)
    if flat.null_count:
        values = np.where(np.asarray(flat.is_valid()), values, np.nan)
    rows = np.repeat(np.arange(n_rows), lengths)
    cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = values
    return out


def _check_lengths(name: str, col: pa.ChunkedArray, n_tokens: np.ndarray, sample_id: pa.Array) -> None:
    arr = col.combine_chunks()
    lengths = _list_lengths(arr)
    present = np.asarray(arr.is_valid())
    bad = np.flatnonzero(present & (lengths != n_tokens))
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"{name}: sample {sample_id[i].as_py()} has {lengths[i]} entries but {n_tokens[i]} tokens "
            f"({len(bad)} such rows); the signals were computed on another tokenization; rerun the model pass"
        )


def read_shard(
    run: RunDir,
    part: int,
    signals: dict[str, list[str]],
    sample_columns: list[str] | None = None,
) -> Shard:
    """Samples shard ``part`` plus ``signals/<alias>`` columns, aligned by ``sample_id``.

    ``signals`` maps an alias to the per-token columns to read from ``signals/<alias>`` (an alias
    may also be a table path such as ``contrast``).
    """
    cols = ["sample_id", "n_tokens", "loss_mask", *(sample_columns or [])]
    samples = run.table(SAMPLES).read_part(part, columns=list(dict.fromkeys(cols)))
    sample_id = samples.column("sample_id").combine_chunks()
    n_tokens = np.asarray(samples.column("n_tokens").to_numpy(), dtype=np.int64)
    _check_lengths("samples.loss_mask", samples.column("loss_mask"), n_tokens, sample_id)
    loss = padded(samples.column("loss_mask"), n_tokens)
    shard = Shard(
        part=part,
        sample_id=sample_id,
        n_tokens=n_tokens,
        loss_mask=np.nan_to_num(loss, nan=0.0) > 0,
        samples=samples,
    )
    ids = sample_id.to_pylist()
    for alias, columns in signals.items():
        name = f"signals/{alias}"
        tbl = run.table(name).read_part(part, columns=["sample_id", *columns])
        sig_ids = tbl.column("sample_id").to_pylist()
        if sig_ids != ids:  # align by sample_id rather than trusting the row order
            where = {sid: i for i, sid in enumerate(sig_ids)}
            missing = [sid for sid in ids if sid not in where]
            if missing:
                raise UserError(
                    f"{name}/{part_name(part)} lacks {len(missing)} samples of samples/{part_name(part)} "
                    f"(first: {missing[0]}); it is stale: rerun `{signals_command(run, alias, columns)}`"
                )
            tbl = tbl.take(pa.array([where[sid] for sid in ids], type=pa.int64()))
        for column in columns:
            _check_lengths(f"{name}.{column}", tbl.column(column), n_tokens, sample_id)
            shard.signals[(alias, column)] = padded(tbl.column(column), n_tokens)
    return shard


# ---- writing --------------------------------------------------------------------------------------
def to_list_array(
    values: np.ndarray, valid: np.ndarray, n_tokens: np.ndarray, value_type: pa.DataType
) -> pa.ListArray:
    """``(B, T)`` values -> a list column with exactly ``n_tokens[b]`` entries, null where not ``valid``."""
    n_rows = len(n_tokens)
    width = values.shape[1] if values.ndim == 2 else 0
    within = np.arange(width)[None, :] < n_tokens[:, None] if n_rows else np.zeros((0, width), bool)
    flat = values[within]
    flat_valid = valid[within]
    if value_type == pa.bool_():
        flat = flat.astype(bool)
    elif pa.types.is_floating(value_type):
        flat = np.where(flat_valid, flat, 0.0)  # nulls are marked by the mask, not by NaN
    items = pa.array(flat, type=value_type, mask=~flat_valid)
    offsets = pa.array(np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, items)


def fingerprint(stage: str, params: Any, code_version: str) -> str:
    return stable_hash({"stage": stage, "params": as_dict(params), "code": code_version})


def part_inputs(run: RunDir, tables: list[str], part: int) -> dict[str, str]:
    """Per-shard input digests: ``{"signals/current/part-00003": sha256, ...}``."""
    out = {}
    for name in tables:
        digest = run.table(name).part_digest(part)
        assert digest is not None, f"{name}/{part_name(part)} vanished after it was checked"
        out[f"{name}/{part_name(part)}"] = digest
    return out


def table_inputs(run: RunDir, tables: list[str]) -> dict[str, str]:
    """Whole-table input digests, for stages with global statistics."""
    return {name: run.table(name).digest() for name in tables}


def is_fresh(out: Table, part: int, fp: str, inputs: dict[str, str]) -> bool:
    return ShardLoop([out], fp, 0).fresh(part, inputs)


def all_fresh(out: Table, parts: list[int], fp: str, inputs: dict[str, str]) -> bool:
    return all(is_fresh(out, p, fp, inputs) for p in parts)


def drop_orphans(out: Table, parts: list[int]) -> None:
    """Remove output shards whose samples shard no longer exists (the input was re-planned)."""
    keep = set(parts)
    for rec in out.records():
        if rec.part not in keep:
            out.uncommit(rec.part)
            out.part_path(rec.part).unlink(missing_ok=True)


def reason_counts(out: Table, column: str = "reason") -> dict[str, int]:
    """Rows per value of ``column`` over the committed output (for the manifest)."""
    schema = out.schema()
    if schema is None or column not in schema.names:
        return {}
    col = out.read(columns=[column]).column(column)
    counts = pc.value_counts(col.combine_chunks())
    return {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


class StageOutput:
    """A stage's output table (``scores/<stage>`` unless named) in a run, on the shared
    :class:`~winnow.core.shards.ShardLoop`: its fingerprint, the shards it skips as fresh or
    commits this time (with their counts), and the manifest entry it records at the end."""

    def __init__(
        self,
        run: RunDir,
        stage: str,
        params: Any,
        code_version: str,
        started: float,
        table: str | None = None,
        key: str | None = None,
    ):
        self.run, self.stage, self.params = run, stage, params
        self.code_version, self.started = code_version, started
        self.key = key or f"stage:{stage}"  # the step's key in the manifest
        self.out = run.table(table or f"scores/{stage}")
        self.fp = fingerprint(stage, params, code_version)
        self.loop = ShardLoop([self.out], self.fp, 0, extra={"params": as_dict(params)})

    @property
    def written(self) -> int:
        return len(self.loop.computed)

    def skip_if_fresh(self, part: int, inputs: dict[str, str]) -> bool:
        """True (and counted as skipped, its counts read back) when ``part`` is fresh."""
        return self.loop.skip_if_fresh(part, inputs)

    def commit(
        self, part: int, table: pa.Table, inputs: dict[str, str], counts: dict[str, int] | None = None
    ) -> None:
        self.loop.commit(part, table, inputs=inputs, counts=counts)

    def finish(
        self, parts: int, counts: dict[str, Any] | None = None, d: Dist | None = None
    ) -> dict[str, Any]:
        """Record the step in the run manifest (shards not written this time were fresh). ``counts``
        are the step's global counts (rank 0's under torchrun: every rank that has them has the same);
        per-shard counts are summed over every shard of every rank, fresh ones from their commit
        records. When nothing was written and the stage keeps only global counts, the output is the one
        the last run described, so its counts carry over. Under torchrun every rank calls this after its
        last commit; rank 0 writes the manifest (``shards.by_rank``: shards each rank computed)."""
        d = d or Dist()
        gathered = d.gather((len(self.loop.computed), dict(self.loop.counts), counts))
        by_rank = [g[0] for g in gathered]
        summed: Counter = Counter()
        for g in gathered:
            summed.update(g[1])
        counts = {**summed, **(gathered[0][2] or {})}
        if not sum(by_rank) and not counts:
            last = self.run.manifest().get("steps", {}).get(self.key, {})
            counts = last.get("counts") if last.get("fingerprint") == self.fp else None
        entry = step_entry(
            self.stage,
            config=as_dict(self.params),
            fingerprint=self.fp,
            outputs=[self.out.name],
            shards=shards_block(parts, sum(by_rank), parts - sum(by_rank), by_rank),
            counts=counts or {},
            started=self.started,
            code_version=self.code_version,
            rows=sum(r.rows for r in self.out.records()),
            reasons=reason_counts(self.out),
            world_size=d.world,
        )
        if d.main:
            self.run.update_manifest(self.key, entry)
        d.barrier()  # the next step reads the manifest
        return entry
