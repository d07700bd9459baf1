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
  (:class:`winnow.pipeline.shards.ShardLoop`): its fingerprint, ``skip_if_fresh``, ``commit`` (the
  shard, its commit record with the shard's counts, then the fault hook) and ``finish`` (the step's
  manifest entry under ``stage:<name>``, in the shape every step shares).
* **Freshness.** The output fingerprint is a hash of the stage name, its parameters and its
  ``CODE_VERSION``. Per-shard stages record per-shard input digests (``signals/current/part-00003``)
  and skip shards whose record matches; stages with global statistics (dataset quantiles, top-k
  across the dataset or across simulated batches that span shards) record whole-table digests and
  recompute every shard when anything changed (:func:`all_fresh`).
* **Simulated batches.** :func:`simulated_batches` cuts a seeded permutation of the samples into
  mini-batches, so an offline stage can approximate what the trainer's per-batch selection would do.
  Samples are numbered in (shard, row) order, which is input order whatever the shard size.
* **Supervised tokens.** A stage scores position ``i`` when ``loss_mask[i] == 1`` *and* every signal
  it needs is non-null at ``i``; supervised positions without a signal are counted
  (``supervised_without_signal``) so a mismatch between a model pass and the loss mask is visible.
* **Deterministic selection.** :func:`lowest_k_per_row`, :func:`highest_k_per_row` and
  :func:`top_fraction` (torch) break ties by position (stable sorts), and counts such as
  ``⌊r·n⌋`` go through :func:`floor_count` & co., which absorb float round-off (0.29·100 is
  28.999999999999996 in float64). Same inputs, same selection, on any machine.
* **Signals from elsewhere.** :func:`write_signals` commits a ``signals/<alias>`` shard computed
  outside winnow (or by hand in tests); :func:`write_synthetic_samples` commits a minimal samples
  shard, so a stage can be tried without a tokenizer or a model.

Measured on this 2-core CPU while other jobs ran (single runs, noisy): 8,000 synthetic samples, about
1.3M tokens in 4 shards of 2,000: eu_plane 6-12 s over the whole dataset (7.6 s with simulated
batches of 8), excess_loss 2.2 s (2.8 s with batches of 8), sstoken 4.6 s, critical_tokens 2.1 s;
a rerun with nothing changed skips every shard in about 0.1 s. Parquet reads and writes are about a
quarter of it; the rest is float64 ``(B, T)`` array work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipeline.params import as_dict
from winnow.pipeline.shards import ShardLoop, step_entry
from winnow.pipeline.store import RunDir, Table, UserError, part_name, stable_hash

if TYPE_CHECKING:
    import torch

SAMPLES = "samples"

# Per-token signal columns a model pass can write, and the --signals name that produces each.
SIGNAL_FLAGS = {"logprob": "logprob", "entropy": "entropy", "attn_importance": "attention"}

# Tolerance for ratio * count before floor/ceil: 0.29 * 100 is 28.999999999999996 in float64.
COUNT_EPS = 1e-9


def floor_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)``, robust to float round-off (0.29 * 100 -> 29, not 28)."""
    return int(math.floor(ratio * n + COUNT_EPS))


def ceil_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)``, robust to float round-off (0.6 * 5 -> 3 even if the product is 3.0000000000000004)."""
    return int(math.ceil(ratio * n - COUNT_EPS))


def round_count(ratio: float, n: int) -> int:
    """``ratio * n`` rounded half up (2.5 -> 3), not Python's half-to-even."""
    return int(math.floor(ratio * n + 0.5 + COUNT_EPS))


# ---- selection helpers shared by the array functions (torch, imported lazily) ---------------------
def lowest_k_per_row(score: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the ``k[b]`` masked positions of row b with the lowest score.

    Ties go to the earlier position (stable sort), so results are deterministic.
    """
    import torch

    key = torch.where(mask, score, float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return mask & (rank < k[:, None])


def highest_k_per_row(score: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the ``k[b]`` masked positions of row b with the highest score, ties to the earlier."""
    return lowest_k_per_row(-score, mask, k)


def top_fraction(score: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, T) bool: the ``⌊ratio·N⌋`` highest-scoring masked positions across the whole tensor.

    N = number of masked positions; ties go to the earlier position in row-major order.
    """
    import torch

    k = floor_count(ratio, int(mask.sum()))
    key = torch.where(mask, score, float("-inf")).flatten()
    order = torch.sort(key, descending=True, stable=True).indices
    keep = torch.zeros_like(key, dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(mask.shape) & mask


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
    :class:`~winnow.pipeline.shards.ShardLoop`: its fingerprint, the shards it skips as fresh or
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

    def finish(self, parts: int, counts: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the step in the run manifest (shards not written this time were fresh). ``counts``
        are the step's global counts; per-shard counts are summed over every shard, fresh ones from
        their commit records. When nothing was written and the stage keeps only global counts, the
        output is the one the last run described, so its counts carry over."""
        self.loop.total = parts
        counts = {**self.loop.counts, **(counts or {})}
        if not self.written and not counts:
            last = self.run.manifest().get("steps", {}).get(self.key, {})
            counts = last.get("counts") if last.get("fingerprint") == self.fp else None
        entry = step_entry(
            self.stage,
            config=as_dict(self.params),
            fingerprint=self.fp,
            outputs=[self.out.name],
            shards=self.loop.summary(),
            counts=counts or {},
            started=self.started,
            code_version=self.code_version,
            rows=sum(r.rows for r in self.out.records()),
            reasons=reason_counts(self.out),
        )
        self.run.update_manifest(self.key, entry)
        return entry


# ---- simulated mini-batches -----------------------------------------------------------------------
def simulated_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Indices of ``n`` samples cut into mini-batches of ``batch_size`` after a seeded shuffle.

    ``batch_size <= 0`` means one batch holding every sample in order (the whole dataset). The last
    batch may be smaller, as with a data loader that keeps its last partial batch.
    """
    if batch_size <= 0 or batch_size >= n:
        return [np.arange(n)]
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


# ---- externally computed signals and synthetic runs ------------------------------------------------
def write_signals(
    run: RunDir,
    alias: str,
    part: int,
    sample_ids: list[str],
    columns: dict[str, list[list[float | None] | None]],
    *,
    model_fingerprint: str | None = None,
    model: str | None = None,
    attn_anchor: str = "query",
) -> None:
    """Commit one ``signals/<alias>`` shard computed outside winnow (or by hand, in tests).

    Lists must be aligned with the samples' ``input_ids`` (index i = token i as a target), with
    None where there is no value.
    """
    fields = [pa.field("sample_id", pa.string())]
    arrays: list[pa.Array] = [pa.array(sample_ids, type=pa.string())]
    for name, lists in columns.items():
        meta = {b"winnow.anchor": attn_anchor.encode()} if name == "attn_importance" else None
        fields.append(pa.field(name, pa.list_(pa.float32()), metadata=meta))
        arrays.append(pa.array(lists, type=pa.list_(pa.float32())))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    extra = {"model_fingerprint": model_fingerprint, "model": model}
    digest = run.table(SAMPLES).part_digest(part)
    if digest is None:
        raise UserError(
            f"samples/{part_name(part)} is not committed in {run.root}; signals follow samples shards"
        )
    run.table(f"signals/{alias}").write(
        part,
        table,
        fingerprint=stable_hash({"external": alias, "model": model_fingerprint}),
        inputs={f"{SAMPLES}/{part_name(part)}": digest},
        extra={k: v for k, v in extra.items() if v is not None},
    )


def write_synthetic_samples(
    run: RunDir,
    part: int,
    rows: list[dict[str, Any]],
) -> list[str]:
    """Commit a minimal samples shard from ``{"input_ids": [...], "loss_mask": [...], "meta_x": ...}`` rows.

    For tests and experiments that exercise a stage without ingesting text: the text columns are
    placeholders, ``sample_id`` is taken from the row or made from ``part`` and the row number.
    Returns the sample ids.
    """
    ids = [str(r.get("sample_id") or f"s{part:03d}-{i:04d}") for i, r in enumerate(rows)]
    n_tokens = [len(r["input_ids"]) for r in rows]
    for r, n in zip(rows, n_tokens, strict=True):
        if len(r["loss_mask"]) != n:
            raise ValueError(f"loss_mask has {len(r['loss_mask'])} entries for {n} input_ids")
    data: dict[str, pa.Array] = {
        "sample_id": pa.array(ids, type=pa.string()),
        "source": pa.array(["synthetic"] * len(rows), type=pa.string()),
        "row": pa.array(range(len(rows)), type=pa.int64()),
        "messages": pa.array(["[]"] * len(rows), type=pa.string()),
        "text": pa.array([""] * len(rows), type=pa.string()),
        "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
        "offsets": pa.array([[0] * n for n in n_tokens], type=pa.list_(pa.int32())),
        "loss_mask": pa.array([r["loss_mask"] for r in rows], type=pa.list_(pa.uint8())),
        "n_tokens": pa.array(n_tokens, type=pa.int32()),
        "n_loss_tokens": pa.array([int(sum(r["loss_mask"])) for r in rows], type=pa.int32()),
    }
    meta_keys = sorted({k for r in rows for k in r if k.startswith("meta_")})
    for key in meta_keys:
        data[key] = pa.array([r.get(key) for r in rows])
    run.table(SAMPLES).write(part, pa.table(data), fingerprint="synthetic", inputs={})
    return ids
