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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from winnow.core.markdown import md_table
from winnow.core.shards import rank_parts
from winnow.core.steps import Ref
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
from winnow.stages.stage import Ctx, Stage

CODE_VERSION = "eu_plane/1"
NAME = "eu_plane"


@dataclass(kw_only=True)
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


def _sample_stats(ctx: Ctx, keys) -> tuple:
    """Pass 1: per-sample error and uncertainty over the whole dataset, with shard sizes.

    Under torchrun each rank reads its own shards (``rank_parts``) and the per-sample values are
    gathered and put back in shard order: the same float64 bits as one process, since each sample's
    statistics depend on that sample alone; the plane itself is then drawn on every rank alike."""
    import torch

    got = {}
    for part in rank_parts(ctx.run, ctx.parts, ctx.d):
        shard = ctx.shard(part)
        mask = torch.from_numpy(shard.valid(*keys))
        nll = -torch.from_numpy(shard.signals[keys[0]])
        err, unc, _ = eu_sample_stats(nll, torch.from_numpy(shard.signals[keys[1]]), mask)
        got[part] = (err.numpy(), unc.numpy(), shard.supervised_without_signal(*keys))
    for other in ctx.d.gather(got) if ctx.d.world > 1 else []:
        got.update(other)
    errs = [torch.from_numpy(got[p][0]) for p in ctx.parts]
    uncs = [torch.from_numpy(got[p][1]) for p in ctx.parts]
    return torch.cat(errs), torch.cat(uncs), [len(e) for e in errs], sum(got[p][2] for p in ctx.parts)


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


@dataclass
class _Plane:
    """The scan's result: per-sample statistics and quadrants over the whole dataset (N,), the row where
    each shard starts, and the supervised tokens without a signal."""

    error: Any
    uncertainty: Any
    got: dict
    starts: dict[int, int]
    missing: int


def _keys(params: EUPlaneParams) -> list[tuple[str, str]]:
    return [(params.alias, "logprob"), (params.alias, "entropy")]


def _scan(ctx: Ctx) -> _Plane:
    """Global statistics first: every sample's PPL and entropy, then the quadrants of each mini-batch."""
    error, uncertainty, sizes, missing = _sample_stats(ctx, _keys(ctx.params))
    got = _batch_quadrants(error, uncertainty, ctx.params)
    starts = dict(zip(ctx.parts, [0, *np.cumsum(sizes)[:-1].tolist()], strict=True))
    return _Plane(error, uncertainty, got, starts, missing)


def _compute(ctx: Ctx, part: int, plane: _Plane) -> pa.Table:
    """Pass 2: one shard's token scores and token keep, from its rows of the plane."""
    shard = ctx.shard(part)
    rows = slice(plane.starts[part], plane.starts[part] + len(shard.n_tokens))
    per_row = {k: v[rows] for k, v in plane.got.items()}
    keys = _keys(ctx.params)
    return _shard_table(shard, keys, ctx.params, plane.error[rows], plane.uncertainty[rows], **per_row)


def _counts(plane: _Plane) -> dict[str, Any]:
    kept = kept_by_counts(plane.got["quadrant"].numpy(), plane.got["kept_by"].numpy())
    counts: dict[str, Any] = {
        "samples": int(plane.error.numel()),
        "scored": int((~plane.error.isnan()).sum()),
        "batches": int(plane.got["batch"].max()) + 1,
        "kept_by": kept,
        "supervised_without_signal": plane.missing,
    }
    warning = _topup_warning(kept)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
        counts["warnings"] = [warning]
    return counts


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


# ---- card section ----------------------------------------------------------------------------------
MAX_POINTS = 20_000  # the scatter draws a reservoir sample of at most this many samples (bounded memory)


def card_section(card: Any, spec: Any) -> list[str]:
    """The card's EU-plane section: samples and kept per quadrant, where the kept came from, the plot."""
    rows = card.q(
        "select quadrant, count(*), count_if(keep), median(error), median(uncertainty) "
        "from scores_eu_plane group by 1 order by 1"
    )
    return [
        "### EU plane (Q-Tuning)",
        "",
        md_table(["quadrant", "samples", "kept", "median PPL", "median entropy"], [list(r) for r in rows]),
        "",
        *_kept_by_lines(card),
        *_plot(card),
    ]


def _kept_by_lines(card: Any) -> list[str]:
    """Where the kept samples came from: the quadrants or the top-up (the step's manifest counts)."""
    counts = card.man.get("steps", {}).get(f"stage:{NAME}", {}).get("counts", {})
    kept = counts.get("kept_by")
    if not kept:
        return []
    text = ", ".join(f"{k.replace('topup_', 'top-up from ')}: {v}" for k, v in kept.items())
    return [f"Kept by origin ({counts.get('batches', '?')} mini-batches): {text}.", ""] + [
        f"**Warning:** {w}" for w in counts.get("warnings", [])
    ]


def _plot(card: Any) -> list[str]:
    """Each sample by PPL (log) and mean entropy, coloured by quadrant (counts in the legend: all samples)."""
    import matplotlib.pyplot as plt

    counts = dict(card.q("select quadrant, count(*) from scores_eu_plane where error is not null group by 1"))
    if not counts:
        return []
    pts = card.sample(
        "select error, uncertainty, quadrant from scores_eu_plane where error is not null", MAX_POINTS
    )
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for quad in sorted(counts):
        sel = [(r[0], r[1]) for r in pts if r[2] == quad]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=6, alpha=0.6, label=f"{quad} ({counts[quad]})")
    ax.set_xscale("log")
    ax.set_xlabel("error: PPL over supervised tokens (log)")
    ax.set_ylabel("uncertainty: mean entropy (nats)")
    total = sum(counts.values())
    ax.set_title(
        "EU plane" + (f" ({len(pts)} of {total} samples drawn at random)" if len(pts) < total else "")
    )
    ax.legend(fontsize=7, markerscale=2)
    return card.plot(
        fig, "eu_plane.png", "EU plane: each sample by PPL and mean entropy, coloured by quadrant"
    )


STAGE = Stage(
    name=NAME,
    help="Q-Tuning EU plane: sample quadrants by PPL x entropy, token pruning in Q2",
    params=EUPlaneParams,
    code_version=CODE_VERSION,
    reads=("samples", Ref("signals/{alias}", columns=("logprob", "entropy"))),
    columns=("keep", "reason", "token_keep"),
    scan=_scan,
    compute=_compute,
    counts=_counts,
    card=card_section,
    shard_split=True,  # the scan's reads are split and gathered; each shard's compute needs only the plane
)
STEP = STAGE  # the runnable step (``STEP.run(run, params)``) is the stage itself
