"""cDPO's critical-token contrast as an array function (torch only): the maths of
:mod:`winnow.stages.critical_tokens`, importable on a GPU machine without pyarrow or the run store.

Two per-token meanings, two outputs (never one column that flips meaning with the label, where a
hand-written weighting would up-weight the critical tokens of wrong answers): ``p_ce`` is the contrastive
probability on every supervised token (cDPO's chosen-side weight when the answer is correct), and
``criticality = 1 - p_CE`` exists on incorrect answers only (cDPO's rejected-side weight: high = critical).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class CriticalResult(NamedTuple):
    p_ce: torch.Tensor  # (B, T) p_CE on supervised tokens, NaN elsewhere
    criticality: torch.Tensor  # (B, T) 1 - p_CE on supervised tokens of incorrect rows, NaN elsewhere
    critical: torch.Tensor  # (B, T) bool: p_CE < threshold on incorrect rows
    keep_sample: torch.Tensor  # (B,) bool: the SFT mapping, keep = is_correct
    token_keep: torch.Tensor  # (B, T) bool: supervised tokens of kept rows


def critical_token_scores(
    p_ce: torch.Tensor,
    mask: torch.Tensor,
    is_correct: torch.Tensor,
    threshold: float = 0.5,
    labelled: torch.Tensor | None = None,
) -> CriticalResult:
    """cDPO token weights and the SFT mapping for one batch.

    p_ce: (B, T) contrastive probability of token i; mask: (B, T) bool supervised positions;
    is_correct: (B,) bool; labelled: (B,) bool, False for rows without a label (all True if None),
    which get no criticality and are not kept.
    """
    import torch

    if labelled is None:
        labelled = torch.ones_like(is_correct, dtype=torch.bool)
    bad = (~is_correct.bool() & labelled)[:, None]
    nan = float("nan")
    criticality = torch.where(mask & bad, 1.0 - p_ce, nan)
    critical = mask & bad & (p_ce < threshold)
    keep_sample = is_correct.bool() & labelled
    return CriticalResult(
        torch.where(mask, p_ce, nan), criticality, critical, keep_sample, mask & keep_sample[:, None]
    )
