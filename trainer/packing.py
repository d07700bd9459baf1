"""From weighted samples to micro-batches: trim, plan, shuffle (the layout itself: :mod:`winnow.core.layout`).

Conventions: ``token_weight[i]`` weighs token ``i`` *as a target*, predicted by the hidden state at
``i - 1`` (the export's and the selection's convention), so ``token_weight[0]`` never counts.

* **Trim.** A sample is cut after its last nonzero-weight target: under causal attention no later token
  changes any loss term, so this is exact and saves their whole forward and backward (bench_train.py,
  trailing half of each response at weight 0: the epoch took 2.79x less time, 1.40x the weighted
  tokens/s of the all-ones run; the HF and TRL baselines do the same work either way). Samples whose weights sum to 0 are dropped;
  samples still longer than ``max_seq_len`` are skipped with a counted reason.
* **Plan** (which samples share a micro-batch; the model passes' planner, :func:`winnow.core.layout.plan_batches`),
  two layouts: ``packed`` (GPU, varlen attention): best-fit decreasing into ``tokens_per_batch`` tokens per
  pack, one flat row with ``position_ids`` restarting per sample and ``cu_seqlens`` marking the samples;
  ``padded`` (CPU): length-bucketed rows, one sample per row, right padding and no attention mask
  (on this CPU a masked packed row runs 4-5x slower than bucketed rows, which pad <= 10%).
* **Shuffle.** The plan is fixed for a run; the order of its micro-batches is a permutation seeded by
  ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
* **Gather.** Only positions whose target weighs != 0 reach the LM head:
  :class:`winnow.core.layout.MicroBatch` carries their flat indices (``gather``), targets and weights,
  laid out by :func:`winnow.core.layout.layout_batch` through the one packer
  (:func:`winnow.core.layout.pack_varlen`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from winnow.core.layout import plan_batches


@dataclass
class Prepared:
    """Trimmed training samples and the reasons others were left out."""

    ids: list[np.ndarray]  # int64 token ids, trimmed
    weights: list[np.ndarray]  # float32, aligned with ids (weight of token i as a target)
    sample_ids: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)


def trim(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut after the last nonzero-weight target (position 0 has no predictor and is ignored); None when
    nothing weighs."""
    w = np.asarray(weights, dtype=np.float32).copy()
    w[:1] = 0.0
    nz = np.flatnonzero(w)
    if nz.size == 0:
        return None
    end = int(nz[-1]) + 1
    return np.asarray(ids, dtype=np.int64)[:end], w[:end]


def prepare(
    ids: Sequence[np.ndarray], weights: Sequence[np.ndarray], sample_ids: Sequence[str], max_seq_len: int
) -> Prepared:
    out = Prepared([], [], [])
    for x, w, sid in zip(ids, weights, sample_ids, strict=True):
        t = trim(x, w)
        if t is None:
            out.skipped["zero_weight"] = out.skipped.get("zero_weight", 0) + 1
            continue
        if len(t[0]) > max_seq_len:
            out.skipped["longer_than_max_seq_len"] = out.skipped.get("longer_than_max_seq_len", 0) + 1
            continue
        out.ids.append(t[0])
        out.weights.append(t[1])
        out.sample_ids.append(sid)
    return out


# ------------------------------------------------------------------------------------- planning
def plan(lengths: Sequence[int], tokens_per_batch: int, layout: str) -> list[list[int]]:
    """Micro-batches (lists of sample indices) covering every sample exactly once (the layout module's
    plans; a packed micro-batch never exceeds ``tokens_per_batch``)."""
    return [p.samples for p in plan_batches(lengths, tokens_per_batch, layout, oversize_alone=False)]


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the plan's micro-batches in ``epoch`` (a seeded permutation)."""
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def step_batches(
    step: int, n_batches: int, seed: int, world: int, rank: int, grad_accum: int
) -> list[int | None]:
    """Plan indices of rank ``rank``'s ``grad_accum`` micro-batches in optimizer step ``step`` (None: an
    empty micro-batch at the end of an epoch). Step ``s`` of epoch ``e`` takes positions
    ``s·world·g + rank·g + m`` of ``epoch_order(e)``, so ``g`` on ``world`` ranks and ``world·g`` in one
    process run the same micro-batches per step."""
    per_step = world * grad_accum
    steps_per_epoch = -(-n_batches // per_step)
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(n_batches, seed, epoch)
    out: list[int | None] = []
    for m in range(grad_accum):
        i = within * per_step + rank * grad_accum + m
        out.append(int(order[i]) if i < n_batches else None)
    return out
