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

Offline, B is a seeded simulated mini-batch of ``batch_size = 8`` samples by default
(:func:`winnow.stages.topk.minibatches`, the very function the trainer's online Q-Tuning draws its batches
with): the paper recomputes the plane every training step on a per-device batch of 8, and the plane means
something different over a whole dataset. Measured on the quickstart (``builtin:demo``,
``builtin:tiny-warm``, r_sample = 0.25; docs/CHANGES.md): with ``batch_size=0`` (one batch) PPL and
entropy are correlated over the dataset, so Q2 ∪ Q4 reach only 215 of the 495 target even at α ≈ 0.49,
the top-up fills the rest from Q1 by min-max-normalised |PPL−Ent| over a heavy-tailed PPL, and the
selection keeps 92/99 off-topic and 81/139 junk-span samples against 249/1400 clean ones; with batches of
8 it keeps 9/99 off-topic, 39/139 junk-span and 359/1400 clean (Q2 141, Q4 140, top-up 214).
``batch_size=0`` remains available. The manifest records how many kept samples came from each quadrant
and from the top-up (``counts.kept_by``), and the stage warns when the top-up is more than half of what
it kept. The trainer calls :func:`eu_plane_select` on one mini-batch. Stage output ``scores/eu_plane``:
``batch``, ``error``, ``uncertainty``, ``quadrant``, ``supp``, ``alpha``, ``keep``, ``reason``,
``n_supervised``, ``n_token_keep``, and per-token ``token_score`` (Eq. 7 for every supervised token of
every scored sample, so other policies can use it) and ``token_keep`` (null at unsupervised positions).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from winnow.core.steps import Step
from winnow.core.store import RunDir
from winnow.stages import stage_io as io
from winnow.stages import topk
from winnow.stages.eu_plane_math import (  # noqa: F401  (re-exported: the stage's public array API)
    BY_QUADRANT,
    BY_TOPUP_EXTREME,
    BY_TOPUP_MIDDLE,
    DROPPED,
    MIDDLE,
    Q1,
    Q2,
    Q3,
    Q4,
    QUADRANT_NAMES,
    UNSCORED,
    EUPlaneResult,
    Quadrants,
    eu_plane_select,
    eu_quadrants,
    eu_sample_stats,
    eu_token_keep,
    eu_token_mask,
    eu_token_scores,
    sorted_quantile,
)

CODE_VERSION = "eu_plane/1"
NAME = "eu_plane"


@dataclass
class EUPlaneParams:
    """Parameters of the EU-plane stage (`winnow score DIR eu_plane --set key=value`)."""

    alias: str = "current"  # signals/<alias> with logprob and entropy
    r_sample: float = 0.25  # fraction of each batch kept (paper grid: 0.125, 0.25, 0.5)
    r_token: float = 0.5  # fraction of a Q2 sample's supervised tokens kept (paper grid: 0.5, 0.7)
    lam: float = 0.5  # λ of Eq. 7 (paper Table 7)
    k_max: int = 10  # bisection steps (UNCONFIRMED: "typically < 10")
    alpha_max: float = 0.49  # upper end of the bisection interval (paper)
    batch_size: int = topk.DEFAULT_BATCH_SIZE  # simulated mini-batch (paper: 8 per device); 0 = whole dataset
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


def _sample_stats(run: RunDir, parts: list[int], params: EUPlaneParams, keys) -> tuple:
    """Pass 1: per-sample error and uncertainty over the whole dataset, with shard sizes."""
    import torch

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
    return torch.cat(errs), torch.cat(uncs), sizes, missing


def _batch_quadrants(error, uncertainty, params: EUPlaneParams) -> dict:
    """Quadrants per (simulated) mini-batch of scored samples, as whole-dataset (N,) tensors."""
    import torch

    total = error.numel()
    got = {
        "quadrant": torch.full((total,), UNSCORED, dtype=torch.int8),
        "kept_by": torch.zeros(total, dtype=torch.int8),
        "supp": torch.full((total,), float("nan"), dtype=torch.float64),
        "alpha": torch.full((total,), float("nan"), dtype=torch.float64),
        "batch": torch.full((total,), -1, dtype=torch.int64),
    }
    scored = torch.nonzero(~error.isnan()).flatten()
    for b, sel in enumerate(topk.minibatches(scored.numel(), params.batch_size, params.seed)):
        rows = scored[torch.from_numpy(sel)]
        q = eu_quadrants(
            error[rows], uncertainty[rows], params.r_sample, k_max=params.k_max, alpha_max=params.alpha_max
        )
        got["quadrant"][rows], got["kept_by"][rows], got["supp"][rows] = q.quadrant, q.kept_by, q.supp
        got["alpha"][rows], got["batch"][rows] = q.alpha, b
    return got


def kept_by_counts(quadrant: np.ndarray, kept_by: np.ndarray) -> dict[str, int]:
    """Kept samples by origin: ``Q2``/``Q4`` (the quadrants), ``topup_Q1``/``topup_Q3``/``topup_middle``."""
    out: dict[str, int] = {}
    for q in (Q2, Q4):
        out[QUADRANT_NAMES[q]] = int(((quadrant == q) & (kept_by == BY_QUADRANT)).sum())
    for q in (Q1, Q3, MIDDLE):
        out[f"topup_{QUADRANT_NAMES[q]}"] = int(((quadrant == q) & (kept_by > BY_QUADRANT)).sum())
    return out


def _topup_warning(kept: dict[str, int]) -> str | None:
    total = sum(kept.values())
    topup = sum(v for k, v in kept.items() if k.startswith("topup_"))
    if total and 2 * topup > total:
        return (
            f"eu_plane: {topup} of the {total} kept samples came from the top-up, not from Q2/Q4 "
            f"({kept}): the plane barely separates this data; try a smaller --set batch_size or r_sample"
        )
    return None


def run_eu_plane(run: RunDir, params: EUPlaneParams) -> dict:
    started = time.time()
    parts = io.samples_parts(run)
    signals = f"signals/{params.alias}"
    io.require_signals(run, params.alias, ["logprob", "entropy"], parts)
    st = io.StageOutput(run, NAME, params, CODE_VERSION, started)
    inputs = io.table_inputs(run, [io.SAMPLES, signals])  # global statistics: whole-table inputs
    keys = [(params.alias, "logprob"), (params.alias, "entropy")]
    counts: dict = {}
    if not io.all_fresh(st.out, parts, st.fp, inputs):
        io.drop_orphans(st.out, parts)
        error, uncertainty, sizes, missing = _sample_stats(run, parts, params, keys)
        got = _batch_quadrants(error, uncertainty, params)
        # pass 2: token scores and token keep, one shard at a time
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            rows = slice(start, start + size)
            start += size
            shard = io.read_shard(run, part, {params.alias: ["logprob", "entropy"]})
            per_row = {k: v[rows] for k, v in got.items()}
            st.commit(
                part, _shard_table(shard, keys, params, error[rows], uncertainty[rows], **per_row), inputs
            )
        kept = kept_by_counts(got["quadrant"].numpy(), got["kept_by"].numpy())
        counts = {
            "samples": int(error.numel()),
            "scored": int((~error.isnan()).sum()),
            "batches": int(got["batch"].max()) + 1,
            "kept_by": kept,
            "supervised_without_signal": missing,
        }
        warning = _topup_warning(kept)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            counts["warnings"] = [warning]
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
