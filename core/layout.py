"""Token-budget batching for model passes: which samples share a forward, and how they are laid out.

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
  ``token_budget`` tokens with ``position_ids`` restarting at 0 per sample. FlashAttention then runs
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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


def plan_packed(lengths: Sequence[int], token_budget: int) -> list[BatchPlan]:
    """One row per batch holding consecutive samples (input order) up to ``token_budget`` tokens."""
    plans: list[BatchPlan] = []
    cur: list[int] = []
    cur_tokens = 0

    def close() -> None:
        if cur:
            plans.append(BatchPlan(rows=(tuple(cur),), width=max(cur_tokens, 1), real_tokens=cur_tokens))

    for idx, n in enumerate(lengths):
        n = int(n)
        if cur and cur_tokens + n > token_budget:
            close()
            cur, cur_tokens = [], 0
        cur.append(idx)
        cur_tokens += n
    close()
    return plans


def plan_batches(lengths: Sequence[int], token_budget: int, layout: str) -> list[BatchPlan]:
    if layout == "padded":
        return plan_padded(lengths, token_budget)
    if layout == "packed":
        return plan_packed(lengths, token_budget)
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

    n_rows, width = len(plan.rows), plan.width
    ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (n_rows, 1))
    seg = np.full((n_rows, width), -1, dtype=np.int64)
    starts, lens, order = [], [], []
    k = 0
    for r, row in enumerate(plan.rows):
        col = 0
        for s in row:
            x = np.asarray(seqs[s])
            n = len(x)
            ids[r, col : col + n] = x
            pos[r, col : col + n] = np.arange(n)
            seg[r, col : col + n] = k
            starts.append(r * width + col)
            lens.append(n)
            order.append(s)
            col += n
            k += 1
        if layout == "packed" and col < width:
            # keep positions increasing by one after the last sample, so the tail is not taken for a sample
            pos[r, col:] = np.arange(width - col) + (pos[r, col - 1] + 1 if col else 0)
    return Collated(
        input_ids=torch.from_numpy(ids).to(device),
        position_ids=torch.from_numpy(pos).to(device),
        segment=torch.from_numpy(seg).to(device),
        samples=order,
        starts=np.asarray(starts, dtype=np.int64),
        lengths=np.asarray(lens, dtype=np.int64),
        layout=layout,
    )


def padding_fraction(plans: Sequence[BatchPlan]) -> float:
    computed = sum(p.computed_tokens for p in plans)
    return 1.0 - sum(p.real_tokens for p in plans) / computed if computed else 0.0
