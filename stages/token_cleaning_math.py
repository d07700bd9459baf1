"""Token Cleaning's score and selection as array functions (torch only): the maths of
:mod:`winnow.stages.token_cleaning` and of the self-evolving rounds (:mod:`winnow.pipeline.token_cleaning_rounds`),
importable on a GPU machine without pyarrow or the run store.

``Score(x_ij) = ℓ_base(x_ij) − ℓ_reference(x_ij)`` (Pang et al., ICML 2025, code ``scripts/generate_token_label.py``:
``loss_base − loss_ref``) is Rho-1's excess loss with the *base* model (the one to be fine-tuned, fixed)
in place of the current one, so it is :func:`winnow.stages.excess_loss_math.excess_loss`. What differs is
the pool the top-k runs over: the whole (sub)set at once (``level="global"``, the authors' default), or
each sample alone (``level="sample"``, the "RHO" baseline), never a training mini-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from winnow.stages import topk
from winnow.stages.excess_loss_math import excess_loss

if TYPE_CHECKING:
    import torch

LEVELS = ("global", "sample")


def per_sample_counts(mask: torch.Tensor, rho: float) -> torch.Tensor:
    """(B,) ``⌊rho·n_i⌋`` per row, n_i = the row's scored tokens (the code's per-sample count: n_i = 1 keeps 0)."""
    import torch

    n = mask.sum(1).tolist()
    return torch.tensor([topk.floor_count(rho, int(x)) for x in n], dtype=torch.long, device=mask.device)


def token_cleaning_select(
    nll_base: torch.Tensor,
    nll_ref: torch.Tensor,
    mask: torch.Tensor,
    rho: float = 0.6,
    level: str = "global",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, keep)`` over a (B, T) block holding the whole pool to clean (global) or any rows (sample).

    nll_base, nll_ref: per-token losses at index i (position convention of the tables); mask: bool, True on
    scored response tokens. ``global``: keep the ``⌊rho·N⌋`` highest scores of all N masked tokens, ties to
    the earlier token in row-major order (the authors' stable sort over the dataset order); ``sample``: the
    ``⌊rho·n_i⌋`` highest of each row, ties to the earlier position. A row may keep nothing.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} must be one of {list(LEVELS)}")
    score = excess_loss(nll_base, nll_ref, mask)
    if level == "global":
        return score, topk.top_fraction(score, mask, rho)
    return score, topk.highest_k_per_row(score, mask, per_sample_counts(mask, rho))
