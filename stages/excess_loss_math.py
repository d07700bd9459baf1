"""Rho-1's excess loss as array functions (torch only): the maths of :mod:`winnow.stages.excess_loss`,
importable on a GPU machine without pyarrow or the run store, so the trainer's online selection calls the
very functions the offline stage uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from winnow.core.errors import UserError
from winnow.stages import topk

if TYPE_CHECKING:
    import torch


def excess_loss(nll_cur: torch.Tensor, nll_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ``nll_cur - nll_ref`` on the mask, NaN elsewhere."""
    import torch

    return torch.where(mask, nll_cur - nll_ref, float("nan"))


def excess_loss_select(
    nll_cur: torch.Tensor, nll_ref: torch.Tensor, mask: torch.Tensor, k_ratio: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rho-1 on one batch: ``(score, keep)``, keep = top ``⌊k_ratio·N⌋`` excess losses across the batch.

    nll_cur, nll_ref: (B, T) per-token losses at index i (position convention of the tables);
    mask: (B, T) bool, True on supervised tokens. Train with loss ``Σ keep·ℓ / Σ keep``.
    """
    score = excess_loss(nll_cur, nll_ref, mask)
    return score, topk.top_fraction(score, mask, k_ratio)


def refuse_zero_excess(n_scored: int, n_nonzero: int, what: str, fix: str) -> None:
    """Raise :class:`UserError` when every scored token's excess loss is exactly 0.

    Identical models give that: the top-k then keeps tokens in input order (Rho-1) or ranks by
    attention alone (ssToken), silently. ``what`` names the two models, ``fix`` says what to run.
    """
    if n_scored and not n_nonzero:
        raise UserError(
            f"{what}: the excess loss is exactly 0 on all {n_scored} scored tokens, so the two models "
            f"assign identical likelihoods (the same weights?) and the selection would be arbitrary. {fix}"
        )
