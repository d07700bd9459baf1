"""The trainer's dataset: rows of ``input_ids`` with float token weights, and the held-out split.

A :class:`Dataset` is what the trainer is given (by the roof's `train` step, :mod:`winnow.pipeline.train`,
from a run's ``samples/`` joined with ``selection/<name>/`` or from an export; by the tiny-model builder
from its own draw): each row is ``input_ids`` with a float ``token_weight`` (the selection's, or the
``loss_mask`` as 0/1 without a selection) and its ``loss_mask``. The trainer checks one weight per token
and no negative weight (:func:`check_weights`, the readers call it) and at least one trainable sample.

Held-out split: ``eval_where`` (a DuckDB condition over the samples view, or over the export's columns,
evaluated by the roof into :attr:`Dataset.held_out`) or else ``eval_fraction`` chosen from a hash of ``sample_id`` (the same samples whatever the selection or
the machine). It is taken from *all* samples, kept or not, and excluded from training; ``eval_loss``
weighs every supervised token (``loss_mask``) at 1, so runs on different selections share a yardstick.
Up to ``eval_max_samples`` held-out samples are scored (the first by hash, again selection-independent).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from winnow.core.store import UserError, stable_hash
from winnow.core.weights import check_weights  # noqa: F401  (re-exported: the readers call it here)
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
    sink: Callable[[str, str, int, Callable[[dict[str, list]], Any]], None] | None = None  # Dataset.sink


def _hash_unit(sample_id: str) -> float:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:12], 16) / float(1 << 48)


@dataclass
class Dataset:
    """What the trainer trains on: the rows, a digest identifying them (a rerun on other data is refused),
    where they came from (recorded in the result) and the held-out ``sample_id``s (``None``: the
    ``eval_fraction`` chosen from a hash of ``sample_id``)."""

    rows: Rows
    digest: str
    source: dict[str, Any]
    held_out: set[str] | None = None
    label: str = "the samples"  # names the data in a message ("selection/default", an export path)
    # record_weights=true: sink(table, fingerprint, epoch, rows_of_shard) stores an epoch's online weights
    # (the roof writes them into the run: winnow.pipeline.train.online_sink)
    sink: Callable[[str, str, int, Callable[[dict[str, list]], Any]], None] | None = None


def prepare_data(p: TrainParams, ds: Dataset) -> TrainData:
    """The held-out split and the prepared (trimmed, ordered) train and eval rows of ``ds``."""
    rows, source = ds.rows, dict(ds.source)
    held = ds.held_out
    if held is None:
        held = {sid for sid in rows.sample_ids if _hash_unit(sid) < p.eval_fraction}
    order = sorted(
        (i for i, s in enumerate(rows.sample_ids) if s in held), key=lambda i: _hash_unit(rows.sample_ids[i])
    )
    ev = order[: p.eval_max_samples]
    tr = [i for i, s in enumerate(rows.sample_ids) if rows.keep[i] and s not in held]
    pick = lambda idx, src: [src[i] for i in idx]  # noqa: E731
    train = prepare(pick(tr, rows.ids), pick(tr, rows.weights), pick(tr, rows.sample_ids), p.max_seq_len)
    evald = prepare(pick(ev, rows.ids), pick(ev, rows.loss_mask), pick(ev, rows.sample_ids), p.max_seq_len)
    if not train.ids:
        raise UserError(
            f"{ds.label} leaves nothing to train on: {len(tr)} kept samples outside the held-out split, "
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
    return TrainData(train, evald, stable_hash([ds.digest, source["eval_split"]]), source, max_id, ds.sink)
