"""From weighted samples to micro-batches: trim, plan, shuffle, lay out.

Conventions: ``token_weight[i]`` weighs token ``i`` *as a target*, predicted by the hidden state at
``i - 1`` (the export's and the selection's convention), so ``token_weight[0]`` never counts.

* **Trim.** A sample is cut after its last nonzero-weight target: under causal attention no later token
  changes any loss term, so this is exact and saves their whole forward and backward (bench_train.py,
  trailing half of each response at weight 0: the epoch took 2.79x less time, 1.40x the weighted
  tokens/s of the all-ones run; the HF and TRL baselines do the same work either way). Samples whose weights sum to 0 are dropped;
  samples still longer than ``max_seq_len`` are skipped with a counted reason.
* **Plan** (which samples share a micro-batch), two layouts:
  ``packed`` (GPU, varlen attention): best-fit decreasing into ``tokens_per_batch`` tokens per pack,
  one flat row with ``position_ids`` restarting per sample and ``cu_seqlens`` marking the samples;
  ``padded`` (CPU): length-bucketed rows, one sample per row, right padding and no attention mask
  (the model passes' layout, :func:`winnow.core.layout.plan_padded`: on this CPU a masked
  packed row runs 4-5x slower than bucketed rows, which pad <= 10%).
* **Shuffle.** The plan is fixed for a run; the order of its micro-batches is a permutation seeded by
  ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
* **Gather.** Only positions whose target weighs != 0 reach the LM head: :class:`MicroBatch` carries
  their flat indices (``gather``), targets and weights.

:func:`pack_varlen` is the packer's contract for a GPU implementation (a CuPy/Triton packer mirrors
it): ragged token lists and weights in; flat ids, positions, ``cu_seqlens`` and the gather index out.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from winnow.core.layout import plan_padded

LAYOUTS = ("padded", "packed")


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
def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= ``capacity`` tokens; longest first, each into the
    fullest bin it fits (ties by length keep input order, so the plan is deterministic)."""
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size and int(lens.max()) > capacity:
        raise ValueError(f"a sample of {int(lens.max())} tokens exceeds the pack capacity {capacity}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, bin number)
    for i in np.argsort(-lens, kind="stable"):
        n = int(lens[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([int(i)])
            bisect.insort(free, (capacity - n, len(bins) - 1))
            continue
        room, b = free.pop(k)
        bins[b].append(int(i))
        bisect.insort(free, (room - n, b))
    return bins


def plan(lengths: Sequence[int], tokens_per_batch: int, layout: str) -> list[list[int]]:
    """Micro-batches (lists of sample indices) covering every sample exactly once."""
    if layout == "packed":
        return best_fit_decreasing(lengths, tokens_per_batch)
    if layout == "padded":
        return [list(p.samples) for p in plan_padded(lengths, tokens_per_batch)]
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


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


# ------------------------------------------------------------------------------------- layout
@dataclass
class MicroBatch:
    """One micro-batch as arrays. ``input_ids``/``position_ids`` are (R, W): R rows of W tokens (packed:
    one row). Flat index ``r * W + c``: ``gather`` lists the positions whose *next* token is a weighted
    target, ``targets``/``weights`` that token and its weight. ``cu_seqlens`` (packed) bounds the samples
    in the flat row."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    gather: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    cu_seqlens: np.ndarray | None
    layout: str
    n_samples: int
    real_tokens: int  # tokens of samples (padding excluded)
    len_sq: int = 0  # Σ length² over the samples (attention FLOPs for the MFU estimate)

    @property
    def weight_sum(self) -> float:
        return float(self.weights.sum(dtype=np.float64))


def _weighted_positions(w: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.flatnonzero(w[1:]) + 1  # target positions with weight != 0
    return t - 1 + offset, t


def _len_sq(seqs: Sequence[np.ndarray]) -> int:
    return int(sum(len(s) ** 2 for s in seqs))


def pack_varlen(
    seqs: Sequence[np.ndarray], weights: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ragged (ids, weights) -> flat ``input_ids`` (T,), ``position_ids`` (T,), ``cu_seqlens`` (S+1,)
    int32, ``gather`` (M,) int64 flat positions predicting a weighted target, its ``targets`` (M,) and
    ``weights`` (M,) float32. No target crosses a sample: position ``cu_seqlens[k+1]-1`` never gathers."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    ids = (
        np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if len(seqs) else np.zeros(0, np.int64)
    )
    pos = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
    g, tg, wt = [], [], []
    for k, w in enumerate(weights):
        gp, tp = _weighted_positions(np.asarray(w), int(cu[k]))
        g.append(gp)
        tg.append(np.asarray(seqs[k], dtype=np.int64)[tp])
        wt.append(np.asarray(w, dtype=np.float32)[tp])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return ids, pos, cu, cat(g, np.int64), cat(tg, np.int64), cat(wt, np.float32)


def layout_batch(
    seqs: Sequence[np.ndarray], weights: Sequence[np.ndarray], layout: str, pad_id: int = 0
) -> MicroBatch:
    """Lay the samples of one micro-batch out (packed: one flat row; padded: one right-padded row each)."""
    if layout == "packed":
        ids, pos, cu, g, tg, wt = pack_varlen(seqs, weights)
        return MicroBatch(ids[None], pos[None], g, tg, wt, cu, layout, len(seqs), int(cu[-1]), _len_sq(seqs))
    width = max((len(s) for s in seqs), default=1)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    g, tg, wt = [], [], []
    for r, (s, w) in enumerate(zip(seqs, weights, strict=True)):
        ids[r, : len(s)] = s
        gp, tp = _weighted_positions(np.asarray(w), r * width)
        g.append(gp)
        tg.append(np.asarray(s, dtype=np.int64)[tp])
        wt.append(np.asarray(w, dtype=np.float32)[tp])
    pos = np.tile(np.arange(width, dtype=np.int64), (len(seqs), 1))
    return MicroBatch(
        ids,
        pos,
        np.concatenate(g),
        np.concatenate(tg),
        np.concatenate(wt).astype(np.float32),
        None,
        layout,
        len(seqs),
        sum(len(s) for s in seqs),
        _len_sq(seqs),
    )


def empty_batch(pad_id: int = 0) -> MicroBatch:
    """A one-token micro-batch with nothing to learn: ranks without a real micro-batch at the end of an
    epoch run it so every rank takes part in the gradient all-reduce."""
    z = np.zeros(0, dtype=np.int64)
    return MicroBatch(
        np.full((1, 1), pad_id, np.int64),
        np.zeros((1, 1), np.int64),
        z,
        z,
        np.zeros(0, np.float32),
        None,
        "padded",
        0,
        0,
    )
