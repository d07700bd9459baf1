"""Counting, top-k and mini-batch drawing shared by the stage array functions (numpy and torch only).

The trainer's online policies call these on GPU machines, which have torch and numpy but no polars,
duckdb or datasets, so this module imports nothing from the run store or pyarrow (a test imports it
with those packages blocked).

* **Counts.** ``⌊r·n⌋``, ``⌈r·n⌉`` and ``r·n`` rounded *half up* go through :func:`floor_count`,
  :func:`ceil_count` and :func:`round_count`, which absorb float round-off (0.29·100 is
  28.999999999999996 in float64). Python's ``round`` rounds half to even (``round(0.5*5) == 2``):
  never use it for a count, or one stage keeps 2 of 5 where another keeps 3.
* **Top-k.** :func:`lowest_k_per_row`, :func:`highest_k_per_row` and :func:`top_fraction` break
  ties by position (stable sorts): same inputs, same selection, on any machine.
* **Mini-batches.** :func:`minibatches` is the one definition of "a training mini-batch" shared by
  the offline stages and the trainer's online selection: a seeded permutation cut into batches of
  ``batch_size`` (the last may be smaller, like a data loader that keeps its last partial batch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Tolerance for ratio * count before floor/ceil: 0.29 * 100 is 28.999999999999996 in float64.
COUNT_EPS = 1e-9

# The paper's per-device batch of Q-Tuning (and the default mini-batch of every offline stage that
# simulates the trainer's per-batch selection).
DEFAULT_BATCH_SIZE = 8


def floor_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)``, robust to float round-off (0.29 * 100 -> 29, not 28)."""
    return int(math.floor(ratio * n + COUNT_EPS))


def ceil_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)``, robust to float round-off (0.6 * 5 -> 3 even if the product is 3.0000000000000004)."""
    return int(math.ceil(ratio * n - COUNT_EPS))


def round_count(ratio: float, n: int) -> int:
    """``ratio * n`` rounded half up (2.5 -> 3), not Python's half-to-even."""
    return int(math.floor(ratio * n + 0.5 + COUNT_EPS))


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


def minibatches(n: int, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> list[np.ndarray]:
    """Indices of ``n`` samples cut into mini-batches of ``batch_size`` after a seeded shuffle.

    ``batch_size <= 0`` means one batch holding every sample in order (the whole dataset). The last
    batch may be smaller, as with a data loader that keeps its last partial batch.
    """
    if batch_size <= 0 or batch_size >= n:
        return [np.arange(n)]
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
