"""Where the loop's micro-batches come from: a :class:`BatchSource`, which never holds the loop.

* :class:`PlannedBatches`: the plan (:mod:`winnow.trainer.packing`) is global; in epoch ``e`` its
  micro-batches run in the order ``epoch_order(seed, e)``, and step ``s`` of the epoch gives rank ``r``
  positions ``s·world·g + r·g + m`` (m < g). So ``g`` on 2 ranks and ``2g`` in one process see the same
  micro-batches per step, and a rank without one at the end of an epoch runs an empty micro-batch
  (weight 0) so the all-reduce still happens.
* :class:`winnow.trainer.online_batches.OnlineBatches`: per-step mini-batches scored by the current model
  and selected by an online policy, then packed.

A source is built from a :class:`Feed` (the training samples and the run's batch settings: plain values,
so a source can be built and tested without a loop) and answers :meth:`BatchSource.micro_batches`; the
loop calls :meth:`BatchSource.after_step` after every optimizer step and hands it the checkpoint folder
to :meth:`BatchSource.save` into / :meth:`BatchSource.load` from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.core.layout import MicroBatch, empty_batch, layout_batch
from winnow.trainer.packing import plan, step_batches


@dataclass(kw_only=True)
class Feed:
    """What a batch source reads: the training samples and the run's batch settings, on this rank."""

    train: Any  # winnow.trainer.packing.Samples: ids, weights, lengths, sample_ids
    layout: str  # padded | packed (resolved)
    tokens_per_batch: int
    virtual_tokens: int = 0  # prompt tuning: each row costs that many more positions
    seed: int
    grad_accum: int
    world: int = 1
    rank: int = 0
    pad_id: int = 0
    device: Any = "cpu"
    epochs: int = 1
    max_steps: int = 0
    save_every: int = 0

    @property
    def per_step(self) -> int:
        """Micro-batches (or mini-batches) drawn per optimizer step over all ranks."""
        return self.world * self.grad_accum

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` when set, whatever ``epochs`` says (as transformers' ``max_steps`` overrides
        ``num_train_epochs``: the epochs repeat, each in its own order); else ``epochs`` full epochs.
        Before issue 28 ``max_steps`` only capped ``epochs``: 40 asked with 12 steps in one epoch ran 12."""
        return self.max_steps if self.max_steps else self.epochs * steps_per_epoch

    def checkpoint_after(self, done: int) -> bool:
        """Whether the loop saves a checkpoint after ``done`` optimizer steps in mid-run."""
        return bool(self.save_every) and done % self.save_every == 0


class BatchSource:
    """The interface (and the state-free defaults) of a source of micro-batches."""

    steps_per_epoch: int = 1
    stats: dict[str, int]  # per-step counters, summed over ranks into metrics.jsonl (sorted keys)

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of optimizer step ``step`` (every rank returns the same count)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (0-based) and before any checkpoint of it."""

    def save(self, folder: Path) -> None:
        """Add this source's state to a checkpoint folder (rank 0 writes checkpoints: gather what the ranks
        hold in :meth:`after_step`, which runs before every checkpoint)."""

    def load(self, folder: Path) -> None:
        """Restore the state :meth:`save` wrote."""


class PlannedBatches(BatchSource):
    """The epoch planned once: first-fit-decreasing packs of the samples, shuffled per epoch."""

    def __init__(self, feed: Feed):
        self.feed = feed
        self.plan = plan(feed.train.lengths + feed.virtual_tokens, feed.tokens_per_batch, feed.layout)
        self.steps_per_epoch = math.ceil(len(self.plan) / feed.per_step)
        self.stats = {}

    def micro_batches(self, step: int) -> list[MicroBatch]:
        f, tr = self.feed, self.feed.train
        out = []
        for b in step_batches(step, len(self.plan), f.seed, f.world, f.rank, f.grad_accum):
            if b is None:
                out.append(empty_batch(f.pad_id))
                continue
            idx = self.plan[b]
            out.append(
                layout_batch([tr.ids[k] for k in idx], [tr.weights[k] for k in idx], f.layout, f.pad_id)
            )
        return out
