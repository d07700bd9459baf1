"""EU plane (Q-Tuning; Wang et al., "Winning the Pruning Gamble", arXiv 2509.23873): joint sample and
token pruning from one model's per-token loss and entropy.

Maths (ALGORITHMS.md §1, Algorithm 1 of the paper, made precise where the paper is silent):

* Per sample, over its supervised tokens T (``loss_mask == 1`` and a signal present):
  ``error = PPL = exp(mean_{i∈T} ℓ_i)`` with ``ℓ_i = -logprob[i]``, and
  ``uncertainty = mean_{i∈T} H_i`` (full-vocabulary entropy, nats). A sample with no supervised
  token is not ranked (quadrant ``unscored``) and is not part of the batch B.
* Thresholds at a bisection point α (= β, the paper updates both identically):
  ``ppl_lo = Q_α(PPL)``, ``ppl_hi = Q_{1-α}(PPL)``, ``ent_lo = Q_α(Ent)``, ``ent_hi = Q_{1-α}(Ent)``
  with linear-interpolation quantiles (numpy's default). Bands per axis: low ``x <= lo``, high
  ``x > hi``, middle otherwise: a sample exactly on a threshold belongs to the lower band, so no
  sample is in two quadrants even when the thresholds coincide (ties, all-equal values).
  Q1 = high PPL & high Ent (harmful noise, drop), Q2 = high PPL & low Ent (valuable misconception,
  keep and prune tokens), Q3 = low PPL & low Ent (redundant, drop), Q4 = low PPL & high Ent
  (calibration data, keep all tokens); everything else is the ``middle`` band.
* ``target = round_half_up(r_sample * |B|)``. Bisection over α ∈ [0, alpha_max] for at most
  ``k_max`` steps: kept = |Q2 ∪ Q4| grows monotonically with α; if kept < target relax (α up), if
  kept > target tighten, stop early when kept == target. The partition used is that of the last α
  that kept at most the target (α = 0 keeps nobody, so one always exists).
* Top-up (paper): while fewer than the target are kept, add samples from Q1 ∪ Q3 by decreasing
  ``supp = |PPL^ - Ent^|`` (``^`` = min-max normalised over B; 0 when all equal), then (winnow's
  completion of the rule, so the target is always met) from the middle band by the same score.
  Ties go to the earlier sample. Top-up samples keep all their tokens (Algorithm 1 prunes Q2 only).
* Q2 token score, Eq. 7 (no 1/2 on the neighbour sum, as printed in the paper):
  ``s_i = (1-λ)·PPL_i + λ·(PPL_{i-1} + PPL_{i+1})`` with ``PPL_i = exp(ℓ_i)``; keep the
  ``k = max(1, ⌊r_token·|T|⌋)`` tokens with the LOWEST ``s_i`` (ties: earlier position first).

UNCONFIRMED choices (ALGORITHMS.md §1(f)), each a parameter with the documented default:
``neighbour_fill="self"`` (a missing or unsupervised neighbour — sequence end, prompt, the template
between two assistant turns — is replaced by the token itself; ``"omit"`` drops it from the sum),
``neighbour_mean=False`` (the paper's sum; True divides by the number of neighbours, as the slime
re-implementation's /2), ``token_measure="ppl"`` (``"nll"`` uses ℓ_i instead of exp(ℓ_i)),
``k_max=10`` (paper: "typically < 10" iterations). Linear-interpolation quantiles and the
lower-band tie rule are winnow's precise reading of the paper's silence.

``token_keep`` means "train the loss on this token": a pruned token stays in the input as context
(the paper's ``m(x) ⊙ x`` could also mean removal; loss-masking is ALGORITHMS.md §1(f)'s most
plausible reading and the trainer's business either way).

Offline, B is the whole dataset (``batch_size=0``) or seeded simulated mini-batches
(``batch_size``, ``seed``): Q-Tuning recomputes the plane every training step, so simulated batches
approximate what an online run would see, with a fixed model. The trainer calls
:func:`eu_plane_select` on one mini-batch. Stage output ``scores/eu_plane``: ``batch``, ``error``,
``uncertainty``, ``quadrant``, ``supp``, ``alpha``, ``keep``, ``reason``, ``n_supervised``,
``n_token_keep``, and per-token ``token_score`` (Eq. 7 for every supervised token of every scored
sample, so other policies can use it) and ``token_keep`` (null at unsupervised positions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pyarrow as pa

from winnow.pipeline.steps import Step
from winnow.pipeline.store import RunDir
from winnow.stages import stage_io as io

if TYPE_CHECKING:
    import torch

CODE_VERSION = "eu_plane/1"
NAME = "eu_plane"

# quadrant codes returned by the array functions
UNSCORED, MIDDLE = -1, 0
QUADRANT_NAMES = {-1: "unscored", 0: "middle", 1: "Q1", 2: "Q2", 3: "Q3", 4: "Q4"}
# kept_by codes
DROPPED, BY_QUADRANT, BY_TOPUP_EXTREME, BY_TOPUP_MIDDLE = 0, 1, 2, 3


@dataclass
class EUPlaneParams:
    """Parameters of the EU-plane stage (`winnow score DIR eu_plane --set key=value`)."""

    alias: str = "current"  # signals/<alias> with logprob and entropy
    r_sample: float = 0.25  # fraction of each batch kept (paper grid: 0.125, 0.25, 0.5)
    r_token: float = 0.5  # fraction of a Q2 sample's supervised tokens kept (paper grid: 0.5, 0.7)
    lam: float = 0.5  # λ of Eq. 7 (paper Table 7)
    k_max: int = 10  # bisection steps (UNCONFIRMED: "typically < 10")
    alpha_max: float = 0.49  # upper end of the bisection interval (paper)
    batch_size: int = 0  # simulated mini-batch size; 0 = the whole dataset is one batch
    seed: int = 0  # shuffle seed of the simulated mini-batches
    neighbour_fill: Literal["self", "omit"] = "self"  # UNCONFIRMED edge rule of Eq. 7
    neighbour_mean: bool = False  # UNCONFIRMED: paper sums neighbours; True averages them (slime)
    token_measure: Literal["ppl", "nll"] = "ppl"  # UNCONFIRMED: PPL_i = exp(ℓ_i) (paper's word)

    def __post_init__(self) -> None:
        if not 0.0 < self.r_sample <= 1.0:
            raise ValueError(f"r_sample={self.r_sample} must be in (0, 1]; e.g. --set r_sample=0.25")
        if not 0.0 < self.r_token <= 1.0:
            raise ValueError(f"r_token={self.r_token} must be in (0, 1]; e.g. --set r_token=0.5")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam} must be in [0, 1]; the paper uses --set lam=0.5")
        if self.k_max < 1:
            raise ValueError(f"k_max={self.k_max} must be >= 1; the paper uses fewer than 10 steps")
        if not 0.0 < self.alpha_max < 0.5:
            raise ValueError(
                f"alpha_max={self.alpha_max} must be in (0, 0.5) so low and high bands never overlap"
            )
        if self.batch_size < 0:
            raise ValueError(f"batch_size={self.batch_size} must be >= 0 (0 = whole dataset)")
        if not self.alias:
            raise ValueError("alias must name a signals table, e.g. --set alias=current")


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
    q[e_hi & u_hi] = 1
    q[e_hi & u_lo] = 2
    q[e_lo & u_lo] = 3
    q[e_lo & u_hi] = 4
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
    target = io.round_count(r_sample, n)
    if n == 0:
        return Quadrants(quadrant, kept_by, supp_all, 0.0, 0)
    err, unc = err_all[idx], unc_all[idx]
    err_sorted, unc_sorted = err.sort().values, unc.sort().values

    best_alpha, best = 0.0, _partition(err, unc, err_sorted, unc_sorted, 0.0)  # α = 0 keeps nobody
    lo, hi = 0.0, alpha_max
    for _ in range(k_max):
        alpha = (lo + hi) / 2
        q = _partition(err, unc, err_sorted, unc_sorted, alpha)
        kept = int(((q == 2) | (q == 4)).sum())
        if kept <= target:
            best_alpha, best = alpha, q
        if kept == target:
            break
        if kept < target:
            lo = alpha
        else:
            hi = alpha

    supp = (_minmax(err) - _minmax(unc)).abs()
    by = torch.where((best == 2) | (best == 4), BY_QUADRANT, DROPPED).to(torch.int8)
    need = target - int((by == BY_QUADRANT).sum())
    for pool, code in (((best == 1) | (best == 3), BY_TOPUP_EXTREME), (best == MIDDLE, BY_TOPUP_MIDDLE)):
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
    k = torch.floor(n.double() * r_token + io.COUNT_EPS).long().clamp_min(1)
    return io.lowest_k_per_row(score, mask, torch.minimum(k, n))


def eu_token_mask(
    score: torch.Tensor, mask: torch.Tensor, quadrant: torch.Tensor, keep_sample: torch.Tensor, r_token: float
) -> torch.Tensor:
    """Algorithm 1, stage 2: (B, T) bool tokens to train on.

    Q2 rows keep their lowest-score tokens (:func:`eu_token_keep`); every other kept row (Q4 and
    top-ups) keeps all its masked tokens; dropped rows keep none.
    """
    pruned = eu_token_keep(score, mask, r_token)
    return mask & keep_sample[:, None] & (pruned | (quadrant != 2)[:, None])


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


# ---- stage adapter ---------------------------------------------------------------------------------
def _reason(quadrant: int, kept_by: int) -> str:
    if quadrant == UNSCORED:
        return "no_supervised_tokens"
    name = QUADRANT_NAMES[quadrant].lower()
    if kept_by == BY_QUADRANT:
        return f"kept_{name}"
    if kept_by in (BY_TOPUP_EXTREME, BY_TOPUP_MIDDLE):
        return f"topup_{name}"
    return f"dropped_{name}"


def run_eu_plane(run: RunDir, params: EUPlaneParams) -> dict:
    import torch

    started = time.time()
    parts = io.samples_parts(run)
    signals = f"signals/{params.alias}"
    io.require_signals(run, params.alias, ["logprob", "entropy"], parts)
    st = io.StageOutput(run, NAME, params, CODE_VERSION, started)
    out, fp = st.out, st.fp
    inputs = io.table_inputs(run, [io.SAMPLES, signals])  # global statistics: whole-table inputs
    keys = [(params.alias, "logprob"), (params.alias, "entropy")]
    counts: dict = {}
    if not io.all_fresh(out, parts, fp, inputs):
        io.drop_orphans(out, parts)
        # pass 1: per-sample error and uncertainty over the whole dataset
        errs, uncs, sizes, missing = [], [], [], 0
        for part in parts:
            shard = io.read_shard(run, part, {params.alias: ["logprob", "entropy"]})
            mask = torch.from_numpy(shard.valid(*keys))
            nll = -torch.from_numpy(shard.signals[keys[0]])
            err, unc, _ = eu_sample_stats(nll, torch.from_numpy(shard.signals[keys[1]]), mask)
            errs.append(err)
            uncs.append(unc)
            sizes.append(len(err))
            missing += shard.supervised_without_signal(*keys)
        error, uncertainty = torch.cat(errs), torch.cat(uncs)
        # quadrants per (simulated) batch of scored samples
        total = error.numel()
        quadrant = torch.full((total,), UNSCORED, dtype=torch.int8)
        kept_by = torch.zeros(total, dtype=torch.int8)
        supp = torch.full((total,), float("nan"), dtype=torch.float64)
        alpha = torch.full((total,), float("nan"), dtype=torch.float64)
        batch = torch.full((total,), -1, dtype=torch.int64)
        scored = torch.nonzero(~error.isnan()).flatten()
        for b, sel in enumerate(io.simulated_batches(scored.numel(), params.batch_size, params.seed)):
            rows = scored[torch.from_numpy(sel)]
            q = eu_quadrants(
                error[rows],
                uncertainty[rows],
                params.r_sample,
                k_max=params.k_max,
                alpha_max=params.alpha_max,
            )
            quadrant[rows], kept_by[rows], supp[rows] = q.quadrant, q.kept_by, q.supp
            alpha[rows], batch[rows] = q.alpha, b
        # pass 2: token scores and token keep, one shard at a time
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            rows = slice(start, start + size)
            start += size
            shard = io.read_shard(run, part, {params.alias: ["logprob", "entropy"]})
            table = _shard_table(
                shard,
                keys,
                params,
                error[rows],
                uncertainty[rows],
                quadrant[rows],
                kept_by[rows],
                supp[rows],
                alpha[rows],
                batch[rows],
            )
            st.commit(part, table, inputs)
        counts = {"samples": total, "scored": int(scored.numel()), "supervised_without_signal": missing}
    return st.finish(len(parts), counts)


def _shard_table(
    shard: io.Shard, keys, params: EUPlaneParams, error, uncertainty, quadrant, kept_by, supp, alpha, batch
) -> pa.Table:
    import torch

    mask_np = shard.valid(*keys)
    mask = torch.from_numpy(mask_np)
    nll = -torch.from_numpy(shard.signals[keys[0]])
    score = eu_token_scores(
        nll,
        mask,
        params.lam,
        neighbour_fill=params.neighbour_fill,
        neighbour_mean=params.neighbour_mean,
        token_measure=params.token_measure,
    )
    keep = kept_by != DROPPED
    token_keep = eu_token_mask(score, mask, quadrant, keep, params.r_token)
    q_np, by_np = quadrant.numpy(), kept_by.numpy()
    return pa.table(
        {
            "sample_id": shard.sample_id,
            "batch": pa.array(batch.numpy(), type=pa.int32()),
            "error": pa.array(error.numpy(), type=pa.float64(), from_pandas=True),
            "uncertainty": pa.array(uncertainty.numpy(), type=pa.float64(), from_pandas=True),
            "quadrant": pa.array([QUADRANT_NAMES[int(q)] for q in q_np], type=pa.string()),
            "supp": pa.array(supp.numpy(), type=pa.float64(), from_pandas=True),
            "alpha": pa.array(alpha.numpy(), type=pa.float64(), from_pandas=True),
            "keep": pa.array(keep.numpy(), type=pa.bool_()),
            "reason": pa.array([_reason(int(q), int(b)) for q, b in zip(q_np, by_np, strict=True)]),
            "n_supervised": pa.array(mask_np.sum(1), type=pa.int32()),
            "n_token_keep": pa.array(token_keep.numpy().sum(1), type=pa.int32()),
            "token_score": io.to_list_array(score.numpy(), mask_np, shard.n_tokens, pa.float32()),
            "token_keep": io.to_list_array(token_keep.numpy(), mask_np, shard.n_tokens, pa.bool_()),
        }
    )


STEP = Step(
    name=NAME,
    params=EUPlaneParams,
    run=run_eu_plane,
)
