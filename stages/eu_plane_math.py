"""Q-Tuning's EU plane as array functions (torch and numpy only): the maths of :mod:`winnow.stages.eu_plane`,
importable on a GPU machine without pyarrow or the run store, so the trainer's online Q-Tuning calls the very
functions the offline stage uses (the module docstring of :mod:`winnow.stages.eu_plane` states the maths)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from winnow.stages import topk

if TYPE_CHECKING:
    import torch

# quadrant codes returned by the array functions
UNSCORED, MIDDLE = -1, 0
Q1, Q2, Q3, Q4 = 1, 2, 3, 4  # noise (drop), misconception (keep, prune tokens), redundant (drop), calibration
QUADRANT_NAMES = {UNSCORED: "unscored", MIDDLE: "middle", Q1: "Q1", Q2: "Q2", Q3: "Q3", Q4: "Q4"}
# kept_by codes
DROPPED, BY_QUADRANT, BY_TOPUP_EXTREME, BY_TOPUP_MIDDLE = 0, 1, 2, 3


# ---- array functions (torch; the trainer calls these online on one mini-batch) ------------------------
class Quadrants(NamedTuple):
    quadrant: torch.Tensor  # (B,) int8: -1 unscored, 0 middle, 1..4 = Q1..Q4
    kept_by: torch.Tensor  # (B,) int8: 0 dropped, 1 quadrant, 2 top-up from Q1∪Q3, 3 top-up from middle
    supp: torch.Tensor  # (B,) float64 |PPL^ - Ent^|, NaN when unscored
    alpha: float  # α of the partition used
    target: int  # round(r_sample * |B|)


class EUPlaneResult(NamedTuple):
    error: torch.Tensor  # (B,) sample PPL
    uncertainty: torch.Tensor  # (B,) sample mean entropy
    quadrant: torch.Tensor  # (B,) int8
    keep_sample: torch.Tensor  # (B,) bool
    kept_by: torch.Tensor  # (B,) int8
    supp: torch.Tensor  # (B,)
    token_score: torch.Tensor  # (B, T) Eq. 7, NaN off the mask
    token_keep: torch.Tensor  # (B, T) bool, False off the mask and in dropped samples
    alpha: float
    target: int


def eu_sample_stats(
    nll: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(PPL, mean entropy, n)`` over ``mask``; NaN for rows with no masked token.

    nll, entropy: (B, T) float (any value off the mask, NaN included); mask: (B, T) bool.
    """
    import torch

    n = mask.sum(1)  # (B,)
    denom = n.clamp_min(1).to(nll.dtype)
    mean_nll = torch.where(mask, nll, 0.0).sum(1) / denom
    mean_ent = torch.where(mask, entropy, 0.0).sum(1) / denom
    empty = n == 0
    nan = torch.full_like(mean_nll, float("nan"))
    return torch.where(empty, nan, mean_nll.exp()), torch.where(empty, nan, mean_ent), n


def sorted_quantile(sorted_x: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an ascending 1-D tensor."""
    n = sorted_x.numel()
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    t = pos - lo
    a, b = float(sorted_x[lo]), float(sorted_x[hi])
    # the two-sided form returns a or b exactly at t = 0 or 1 (and when a == b), like numpy's _lerp
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)


def _partition(err: torch.Tensor, unc: torch.Tensor, err_sorted, unc_sorted, alpha: float) -> torch.Tensor:
    import torch

    ppl_lo, ppl_hi = sorted_quantile(err_sorted, alpha), sorted_quantile(err_sorted, 1.0 - alpha)
    ent_lo, ent_hi = sorted_quantile(unc_sorted, alpha), sorted_quantile(unc_sorted, 1.0 - alpha)
    e_hi, e_lo = err > ppl_hi, err <= ppl_lo  # on a threshold -> the lower band
    u_hi, u_lo = unc > ent_hi, unc <= ent_lo
    q = torch.zeros(err.shape, dtype=torch.int8, device=err.device)
    q[e_hi & u_hi] = Q1
    q[e_hi & u_lo] = Q2
    q[e_lo & u_lo] = Q3
    q[e_lo & u_hi] = Q4
    return q


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else x.new_zeros(x.shape)


def eu_quadrants(
    error: torch.Tensor,
    uncertainty: torch.Tensor,
    r_sample: float,
    *,
    k_max: int = 10,
    alpha_max: float = 0.49,
) -> Quadrants:
    """Algorithm 1, stage 1: quadrants by bisection over α = β, then the top-up to the target.

    Rows whose error is NaN (no supervised token) are unscored and excluded from B.
    """
    import torch

    err_all = error.detach().double()
    unc_all = uncertainty.detach().double()
    scored = ~(err_all.isnan() | unc_all.isnan())
    idx = torch.nonzero(scored).flatten()
    quadrant = torch.full(error.shape, UNSCORED, dtype=torch.int8, device=error.device)
    kept_by = torch.zeros(error.shape, dtype=torch.int8, device=error.device)
    supp_all = torch.full(error.shape, float("nan"), dtype=torch.float64, device=error.device)
    n = idx.numel()
    target = topk.round_count(r_sample, n)
    if n == 0:
        return Quadrants(quadrant, kept_by, supp_all, 0.0, 0)
    err, unc = err_all[idx], unc_all[idx]
    err_sorted, unc_sorted = err.sort().values, unc.sort().values

    best_alpha, best = 0.0, _partition(err, unc, err_sorted, unc_sorted, 0.0)  # α = 0 keeps nobody
    lo, hi = 0.0, alpha_max
    for _ in range(k_max):
        alpha = (lo + hi) / 2
        q = _partition(err, unc, err_sorted, unc_sorted, alpha)
        kept = int(((q == Q2) | (q == Q4)).sum())
        if kept <= target:
            best_alpha, best = alpha, q
        if kept == target:
            break
        if kept < target:
            lo = alpha
        else:
            hi = alpha

    supp = (_minmax(err) - _minmax(unc)).abs()
    by = torch.where((best == Q2) | (best == Q4), BY_QUADRANT, DROPPED).to(torch.int8)
    need = target - int((by == BY_QUADRANT).sum())
    for pool, code in (((best == Q1) | (best == Q3), BY_TOPUP_EXTREME), (best == MIDDLE, BY_TOPUP_MIDDLE)):
        if need <= 0:
            break
        cand = torch.nonzero(pool).flatten()
        order = torch.sort(supp[cand], descending=True, stable=True).indices  # ties: earlier sample
        take = cand[order[:need]]
        by[take] = code
        need -= take.numel()
    assert need <= 0, "top-up ran out of samples although target <= |B|"

    quadrant[idx] = best
    kept_by[idx] = by
    supp_all[idx] = supp
    return Quadrants(quadrant, kept_by, supp_all, best_alpha, target)


def eu_token_scores(
    nll: torch.Tensor,
    mask: torch.Tensor,
    lam: float = 0.5,
    *,
    neighbour_fill: str = "self",
    neighbour_mean: bool = False,
    token_measure: str = "ppl",
) -> torch.Tensor:
    """Eq. 7 per token: ``(1-λ)·v_i + λ·(v_{i-1} + v_{i+1})``, ``v = exp(ℓ)``; NaN off the mask.

    A neighbour off the mask (outside the row, prompt, template between turns) is replaced by
    ``v_i`` (``neighbour_fill="self"``) or left out (``"omit"``). ``neighbour_mean`` divides the
    neighbour sum by the number of neighbours that entered it.
    """
    import torch

    v = torch.where(mask, nll, 0.0)
    if token_measure == "ppl":
        v = torch.where(mask, v.exp(), 0.0)
    prev_ok = torch.zeros_like(mask)
    next_ok = torch.zeros_like(mask)
    prev_ok[:, 1:] = mask[:, :-1]
    next_ok[:, :-1] = mask[:, 1:]
    prev_v = torch.zeros_like(v)
    next_v = torch.zeros_like(v)
    prev_v[:, 1:] = v[:, :-1]
    next_v[:, :-1] = v[:, 1:]
    if neighbour_fill == "self":
        neigh = torch.where(prev_ok, prev_v, v) + torch.where(next_ok, next_v, v)
        count = torch.full_like(v, 2.0)
    elif neighbour_fill == "omit":
        neigh = torch.where(prev_ok, prev_v, 0.0) + torch.where(next_ok, next_v, 0.0)
        count = prev_ok.to(v.dtype) + next_ok.to(v.dtype)
    else:
        raise ValueError(f"neighbour_fill={neighbour_fill!r} must be 'self' or 'omit'")
    if neighbour_mean:
        neigh = neigh / count.clamp_min(1.0)
    score = (1.0 - lam) * v + lam * neigh
    return torch.where(mask, score, float("nan"))


def eu_token_keep(score: torch.Tensor, mask: torch.Tensor, r_token: float) -> torch.Tensor:
    """Keep ``max(1, ⌊r_token·|T|⌋)`` lowest-score tokens of every row with a masked token."""
    import torch

    n = mask.sum(1)
    k = torch.floor(n.double() * r_token + topk.COUNT_EPS).long().clamp_min(1)
    return topk.lowest_k_per_row(score, mask, torch.minimum(k, n))


def eu_token_mask(
    score: torch.Tensor, mask: torch.Tensor, quadrant: torch.Tensor, keep_sample: torch.Tensor, r_token: float
) -> torch.Tensor:
    """Algorithm 1, stage 2: (B, T) bool tokens to train on.

    Q2 rows keep their lowest-score tokens (:func:`eu_token_keep`); every other kept row (Q4 and
    top-ups) keeps all its masked tokens; dropped rows keep none.
    """
    pruned = eu_token_keep(score, mask, r_token)
    return mask & keep_sample[:, None] & (pruned | (quadrant != Q2)[:, None])


def eu_plane_select(
    nll: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    r_sample: float,
    r_token: float,
    lam: float = 0.5,
    k_max: int = 10,
    *,
    alpha_max: float = 0.49,
    neighbour_fill: str = "self",
    neighbour_mean: bool = False,
    token_measure: str = "ppl",
) -> EUPlaneResult:
    """Q-Tuning on one batch: which samples to train on and which of their tokens.

    nll, entropy: (B, T) per-token loss ``-log p(x_i|x_<i)`` and predictive entropy at index i
    (the position convention of the tables); mask: (B, T) bool, True on supervised tokens.
    Train on rows with ``keep_sample`` and positions with ``token_keep``.
    """
    error, uncertainty, _ = eu_sample_stats(nll, entropy, mask)
    quads = eu_quadrants(error, uncertainty, r_sample, k_max=k_max, alpha_max=alpha_max)
    score = eu_token_scores(
        nll,
        mask,
        lam,
        neighbour_fill=neighbour_fill,
        neighbour_mean=neighbour_mean,
        token_measure=token_measure,
    )
    keep_sample = quads.kept_by != DROPPED
    token_keep = eu_token_mask(score, mask, quads.quadrant, keep_sample, r_token)
    return EUPlaneResult(
        error,
        uncertainty,
        quads.quadrant,
        keep_sample,
        quads.kept_by,
        quads.supp,
        score,
        token_keep,
        quads.alpha,
        quads.target,
    )
