"""ssToken as array functions (torch only): the maths of :mod:`winnow.stages.sstoken`, importable on a GPU
machine without pyarrow or the run store, so the trainer's online selection calls the very functions the
offline stage uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from winnow.stages import topk

if TYPE_CHECKING:
    import torch

NORM_EPS = 1e-8  # the authors' epsilon in the min-max normalisation


# ---- array functions (torch; the trainer calls these online on one mini-batch) ------------------------
class SSTokenResult(NamedTuple):
    rel: torch.Tensor  # (B, T) L_his - L_cur, NaN off the mask
    score: torch.Tensor  # (B, T) γ·REL^ + (1-γ)·attn, NaN off the mask
    keep: torch.Tensor  # (B, T) bool


def retrospective_excess_loss(
    nll_his: torch.Tensor, nll_cur: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) ``nll_his - nll_cur`` on the mask, NaN elsewhere."""
    import torch

    return torch.where(mask, nll_his - nll_cur, float("nan"))


def minmax_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min + 1e-8)`` over each row's masked positions (0 when all equal)."""
    import torch

    lo = torch.where(mask, x, float("inf")).amin(1, keepdim=True)
    hi = torch.where(mask, x, float("-inf")).amax(1, keepdim=True)
    return (x - lo) / (hi - lo + NORM_EPS)


def sstoken_scores(
    rel: torch.Tensor,
    attn: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float = 0.5,
    attn_minmax: bool = False,
) -> torch.Tensor:
    """(B, T) ``γ·minmax_row(rel) + (1-γ)·attn`` on the mask, NaN elsewhere.

    ``attn`` may be None when ``gamma == 1``; ``attn_minmax`` min-max normalises it per row too.
    """
    import torch

    score = torch.zeros_like(rel)
    if gamma > 0:
        score = score + gamma * minmax_rows(rel, mask)
    if gamma < 1:
        if attn is None:
            raise ValueError(f"gamma={gamma} < 1 needs the attention importance")
        score = score + (1.0 - gamma) * (minmax_rows(attn, mask) if attn_minmax else attn)
    return torch.where(mask, score, float("nan"))


def sstoken_select(
    nll_his: torch.Tensor,
    nll_cur: torch.Tensor,
    attn: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float = 0.5,
    rho: float = 0.6,
    attn_minmax: bool = False,
) -> SSTokenResult:
    """ssToken on one batch: keep the ``⌈ρ·|T_b|⌉`` highest-scoring supervised tokens of every row.

    nll_his, nll_cur: (B, T) per-token losses at index i under the history and current models;
    attn: (B, T) attention of query i to the prompt (None when gamma == 1); mask: (B, T) bool.
    """
    import torch

    rel = retrospective_excess_loss(nll_his, nll_cur, mask)
    score = sstoken_scores(rel, attn, mask, gamma, attn_minmax)
    n = mask.sum(1)
    k = torch.ceil(n.double() * rho - topk.COUNT_EPS).long()
    return SSTokenResult(rel, score, topk.highest_k_per_row(score, mask, k))
