"""Row layout, the one module of it: which samples share a forward, and how they are laid out in tensors.

The model passes (:func:`plan_batches`, :func:`collate`) and the trainer (:func:`plan_batches`,
:func:`layout_batch`) lay rows out here, and both packed layouts go through one packer,
:func:`pack_varlen` (torch ops on any device; :func:`winnow.kernels.cupy_packing.pack_cupy` is its CuPy
alternative with the same signature, tested against it).

Two layouts, one invariant: a sample's values depend only on the sample (no token attends to another
sample, and the last token of one sample never predicts the first of another; shifting is done per
sample by the caller, from the positions this module returns).

* ``padded`` (default on CPU, and on GPU without FlashAttention): one sample per row, rows right-padded
  to the longest row of the batch, **no attention mask** at all. Right padding sits after every real
  token, so the plain causal mask already hides it from them: the model runs SDPA's ``is_causal``
  fast path and every architecture's own masking (sliding windows included) stays untouched. Samples
  are sorted by length (longest first, so an out-of-memory shows up on the first batch) and cut
  greedily: a batch closes when one more sample would exceed the token budget or push padding above
  ``max_pad_frac`` (10%) of the batch's computed tokens, so at most 10% of computed tokens are padding.
* ``packed`` (GPU with ``flash_attention_2``): samples concatenated into one row of at most
  ``token_budget`` tokens with ``position_ids`` restarting at 0 per sample; which samples share a row is
  best-fit decreasing (:func:`best_fit_decreasing`: longest first, each into the fullest row it fits). FlashAttention then runs
  varlen attention per sample; under SDPA/eager transformers builds a block-diagonal mask from the
  positions, but **only when no KV cache is created** (callers must pass ``use_cache=False``; with a
  cache the samples silently attend to each other, a test checks it).

Measured on this machine (2 shared cores, fp32, body only — embeddings + 4 Llama layers, hidden 256,
V=32k — over 96 samples with log-normal lengths 16–1024, 27k tokens, token budget 8192; best of 3–4,
two sessions, tokens/s):

=====================================================  ==============
layout                                                 tokens/s
=====================================================  ==============
one sample per forward (no padding)                    11.3k – 15.7k
padded, length-bucketed (9.0% padding)                 11.6k – 13.8k
packed rows, transformers' block-diagonal SDPA mask     2.6k –  2.8k
packed rows, per-sample SDPA loop (custom attention)   15.2k – 15.4k
=====================================================  ==============

The masked packed row is 4–5x slower on CPU (SDPA falls back to its math kernel and computes the full
quadratic score matrix of the row), so CPU uses ``padded``. A hand-written varlen loop was at most
~1.3x faster on the body, which is not where a pass spends its time (at V=32k the LM head costs 2.6x
the body's FLOPs per position here, plus its softmax), and it would need per-architecture attention
code (sliding windows, softcapping, sinks); bucketing needs none. In whole passes
(benchmarks/bench_model_pass.py) padding stayed at 7.3-8.3%.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from winnow.kernels.packed import Packed

if TYPE_CHECKING:
    import torch

LAYOUTS = ("padded", "packed")
MAX_PAD_FRAC = 0.10


@dataclass(frozen=True)
class BatchPlan:
    """One forward: ``rows[r]`` lists the samples (indices into the caller's list) laid in row ``r``,
    left to right; every row is ``width`` tokens long (the longest row)."""

    rows: tuple[tuple[int, ...], ...]
    width: int
    real_tokens: int

    @property
    def computed_tokens(self) -> int:
        return len(self.rows) * self.width

    @property
    def samples(self) -> list[int]:
        return [s for row in self.rows for s in row]


def plan_padded(
    lengths: Sequence[int], token_budget: int, max_pad_frac: float = MAX_PAD_FRAC
) -> list[BatchPlan]:
    """Length-bucketed batches, one sample per row; padding <= ``max_pad_frac`` of each batch's tokens.

    A sample longer than ``token_budget`` gets a batch of its own (the budget is a target, not a cap
    on sample length).
    """
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")  # longest first; ties keep input order (deterministic)
    plans: list[BatchPlan] = []
    i = 0
    while i < len(order):
        width = int(lens[order[i]])
        rows = [int(order[i])]
        real = width
        i += 1
        while i < len(order):
            n = len(rows) + 1
            cand = int(lens[order[i]])
            if n * width > token_budget or (n * width - (real + cand)) > max_pad_frac * n * width:
                break
            rows.append(int(order[i]))
            real += cand
            i += 1
        plans.append(BatchPlan(rows=tuple((r,) for r in rows), width=max(width, 1), real_tokens=real))
    return plans


def best_fit_decreasing(lengths: Sequence[int], capacity: int, oversize_alone: bool = False) -> list[list[int]]:
    """Bins of sample indices, each summing to <= ``capacity`` tokens; longest first, each into the
    fullest bin it fits (ties by length keep input order, so the plan is deterministic). A sample longer
    than ``capacity`` is an error, or with ``oversize_alone`` a bin of its own (a model pass's budget is a
    target, not a cap on sample length)."""
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size and int(lens.max()) > capacity and not oversize_alone:
        raise ValueError(f"a sample of {int(lens.max())} tokens exceeds the pack capacity {capacity}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, bin number)
    for i in np.argsort(-lens, kind="stable"):
        n = int(lens[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([int(i)])
            bisect.insort(free, (max(capacity - n, 0), len(bins) - 1))
            continue
        room, b = free.pop(k)
        bins[b].append(int(i))
        bisect.insort(free, (room - n, b))
    return bins


def plan_packed(lengths: Sequence[int], token_budget: int, oversize_alone: bool = True) -> list[BatchPlan]:
    """One row per batch, its samples chosen by :func:`best_fit_decreasing` into ``token_budget`` tokens."""
    plans = []
    for b in best_fit_decreasing(lengths, token_budget, oversize_alone):
        n = int(sum(int(lengths[i]) for i in b))
        plans.append(BatchPlan(rows=(tuple(b),), width=max(n, 1), real_tokens=n))
    return plans


def plan_batches(
    lengths: Sequence[int], token_budget: int, layout: str, oversize_alone: bool = True
) -> list[BatchPlan]:
    """The batches of ``layout`` (the trainer passes ``oversize_alone=False``: its packs are a cap)."""
    if layout == "padded":
        return plan_padded(lengths, token_budget)
    if layout == "packed":
        return plan_packed(lengths, token_budget, oversize_alone)
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


@dataclass
class Collated:
    """Tensors of one batch plus where each sample sits in them.

    ``starts[k]`` is the flat index (``row * width + column``) of the first token of the ``k``-th sample
    of ``plan.samples``; its tokens occupy ``starts[k] : starts[k] + lengths[k]`` of the flattened
    ``(rows * width)`` axis. ``segment`` numbers the samples of the batch (``k``), -1 on padding.
    """

    input_ids: torch.Tensor  # (R, W) int64
    position_ids: torch.Tensor  # (R, W) int64, restarting at 0 per sample; padding continues the row
    segment: torch.Tensor  # (R, W) int64
    samples: list[int]
    starts: np.ndarray  # (S,) int64
    lengths: np.ndarray  # (S,) int64
    layout: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


def _rows(
    rows: Sequence[Sequence[np.ndarray]], width: int, layout: str, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``rows[r]`` (samples, left to right) laid into ``(R, width)`` arrays: ids (``pad_id`` after the
    samples), positions restarting at 0 per sample, the sample number ``k`` (-1 on padding), and each
    sample's flat start and length."""
    n_rows = len(rows)
    ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (n_rows, 1))
    seg = np.full((n_rows, width), -1, dtype=np.int64)
    starts, lens = [], []
    for r, row in enumerate(rows):
        col = 0
        for x in row:
            n = len(x)
            ids[r, col : col + n] = x
            pos[r, col : col + n] = np.arange(n)
            seg[r, col : col + n] = len(starts)
            starts.append(r * width + col)
            lens.append(n)
            col += n
        if layout == "packed" and col < width:
            # keep positions increasing by one after the last sample, so the tail is not taken for a sample
            pos[r, col:] = np.arange(width - col) + (pos[r, col - 1] + 1 if col else 0)
    return ids, pos, seg, np.asarray(starts, dtype=np.int64), np.asarray(lens, dtype=np.int64)


def collate(
    plan: BatchPlan,
    seqs: Sequence[np.ndarray],
    layout: str,
    device: torch.device | str = "cpu",
    pad_id: int = 0,
) -> Collated:
    """Lay the samples of ``plan`` into ``(R, W)`` tensors.

    Padding uses ``pad_id`` (any valid id: padding is never attended to by real tokens and its outputs
    are never read). In the padded layout ``position_ids`` is a plain ``arange`` per row, identical to
    what the model would build itself, so callers may omit it.
    """
    import torch

    ids, pos, seg, starts, lens = _rows([[seqs[s] for s in row] for row in plan.rows], plan.width, layout, pad_id)
    return Collated(
        input_ids=torch.from_numpy(ids).to(device),
        position_ids=torch.from_numpy(pos).to(device),
        segment=torch.from_numpy(seg).to(device),
        samples=plan.samples,
        starts=starts,
        lengths=lens,
        layout=layout,
    )


def padding_fraction(plans: Sequence[BatchPlan]) -> float:
    computed = sum(p.computed_tokens for p in plans)
    return 1.0 - sum(p.real_tokens for p in plans) / computed if computed else 0.0


# ------------------------------------------------------------------------------------- the varlen packer
def check_ragged(offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be a non-decreasing (S+1,) array starting at 0")
    if int(offsets[-1]) != ids.size or ids.size != weights.size:
        raise ValueError(f"offsets end at {int(offsets[-1])} but ids/weights hold {ids.size}/{weights.size}")


def stage(
    offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets int64, ids int64, weights float32) on ``device``. For CUDA the three arrays are laid
    into one pinned host buffer and copied with a single non-blocking transfer on the current stream
    (torch's pinned allocator keeps the buffer alive until that copy is done)."""
    import torch

    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    check_ragged(offsets, ids, weights)
    device = torch.device(device)
    if device.type != "cuda":
        return tuple(torch.from_numpy(x).to(device) for x in (offsets, ids, weights))  # type: ignore[return-value]
    a, b = offsets.nbytes, offsets.nbytes + ids.nbytes  # both multiples of 8: every view stays aligned
    host = torch.empty(b + weights.nbytes, dtype=torch.uint8, pin_memory=True)
    buf = host.numpy()
    buf[:a] = offsets.view(np.uint8)
    buf[a:b] = ids.view(np.uint8)
    buf[b:] = weights.view(np.uint8)
    dev = host.to(device, non_blocking=True)
    return dev[:a].view(torch.int64), dev[a:b].view(torch.int64), dev[b:].view(torch.float32)


def pack_varlen(offsets: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, trim: bool = True) -> Packed:
    """Pack one micro-batch in Arrow layout (``offsets`` (S+1,), ``ids`` (T,), ``weights`` (T,) with
    ``weights[i]`` weighing token ``i`` *as a target*) into one varlen row: see :class:`Packed`.

    ``trim``: each sample is cut after its last nonzero-weight target (under causal attention no later
    token changes a loss term) and samples without one are dropped, so no zero-length segment reaches the
    attention kernel (the CuPy packer's semantics). ``trim=False`` keeps every sample whole, in order (the
    trainer's rows, trimmed once by ``prepare`` and mapped back sample by sample). Position 0 of a sample
    never predicts anything; no target crosses a sample. Vectorised torch ops, on the inputs' device.
    """
    import torch

    dev = ids.device
    n_samples = offsets.numel() - 1
    lens = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(n_samples, device=dev), lens)  # (T,) owner of each token
    local = torch.arange(ids.numel(), device=dev) - offsets[:-1][sample]  # index inside its sample
    weighted = (weights != 0) & (local >= 1)
    if trim:
        last = torch.full((n_samples,), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(0, sample[weighted], local[weighted], reduce="amax")
        kept_len = last + 1  # 0 when the sample weighs nothing
    else:
        kept_len = lens
    keep = local < kept_len[sample]
    starts = torch.cumsum(kept_len, 0) - kept_len  # packed start of each sample
    flat = starts[sample] + local
    kept = kept_len[kept_len > 0] if trim else kept_len
    cu = torch.zeros(kept.numel() + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(kept, 0)
    return Packed(
        input_ids=ids[keep],
        position_ids=local[keep],
        cu_seqlens=cu,
        max_seqlen=int(kept.max()) if kept.numel() else 0,
        gather=flat[weighted] - 1,
        targets=ids[weighted],
        weights=weights[weighted].to(torch.float32),
    )


# ------------------------------------------------------------------------------------- trainer micro-batches
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


def _packed_whole(seqs: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> Packed:
    import torch

    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    cat = lambda xs, dt: np.concatenate([np.asarray(x, dt) for x in xs]) if len(xs) else np.zeros(0, dt)  # noqa: E731
    ids, w = cat(seqs, np.int64), cat(weights, np.float32)
    return pack_varlen(*(torch.from_numpy(x) for x in (offsets, ids, w)), trim=False)


def layout_batch(
    seqs: Sequence[np.ndarray], weights: Sequence[np.ndarray], layout: str, pad_id: int = 0
) -> MicroBatch:
    """Lay the samples of one micro-batch out (packed: one flat row; padded: one right-padded row each).
    Both take their targets from :func:`pack_varlen` (whole samples); padded maps them onto its rows.

    Same arrays, dtypes included, as the trainer's former numpy packer (checked on 8-200 samples of 10-500
    tokens). Cost on this loaded 2-core CPU with one torch thread (the trainer's default), best of 7:
    0.26-0.77 ms per micro-batch of 8-60 samples (numpy packer: 0.05-0.89 ms), well under 1% of a tiny
    model's optimizer step (~100 ms and more)."""
    p = _packed_whole(seqs, weights)
    cu, g = p.cu_seqlens.numpy(), p.gather.numpy()
    tg, wt = p.targets.numpy(), p.weights.numpy()
    len_sq = int(sum(len(s) ** 2 for s in seqs))
    if layout == "packed":
        ids, pos = p.input_ids.numpy()[None], p.position_ids.numpy()[None]
        return MicroBatch(ids, pos, g, tg, wt, cu, layout, len(seqs), int(cu[-1]), len_sq)
    width = max((len(s) for s in seqs), default=1)
    ids, pos, _, _, _ = _rows([[s] for s in seqs], width, "padded", pad_id)
    row = np.searchsorted(cu, g, side="right") - 1  # the sample (= row) of each gathered position
    g = row * width + (g - cu[row])
    return MicroBatch(ids, pos, g, tg, wt, None, layout, len(seqs), int(cu[-1]), len_sq)


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
