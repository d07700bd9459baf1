"""Critical-token contrast (cDPO; Lin et al., "Critical Tokens Matter", arXiv 2411.19943): per-token
weights from a positive and a negative model, turned into SFT-usable scores.

The model pass (``winnow score DIR --contrast --positive P --negative N [--beta 1]``, another module)
writes ``signals/contrast`` with ``p_ce[i] = softmax((1+β)·z_pos - β·z_neg)[x_i]``: the probability of
token i under the contrastive distribution of the logits predicting it (ALGORITHMS.md §4; β = 1 in
the authors' code). A low ``p_CE`` marks a token the negative model (trained on wrong answers) prefers
much more than the positive one: a *critical token*.

This stage reads the correctness label from a ``meta_`` column (``--set label=meta_is_correct``;
booleans, 0/1 numbers or strings such as true/false, correct/incorrect, yes/no) and writes, over
supervised tokens (``loss_mask == 1`` and ``p_ce`` present):

* ``token_p_ce``: ``p_CE`` on every supervised token (whatever the label); on a correct sample it is
  cDPO's chosen-side weight ``w_cho`` (used when ``only_neg=False``);
* ``token_criticality = 1 - p_CE`` on incorrect samples only (cDPO's rejected-side weight ``w_rej``;
  high = critical), null elsewhere, and ``token_critical = p_CE < threshold`` on the same tokens;
* unlabelled samples (null label): no criticality and ``keep`` null — this stage has no verdict.

Before ``critical_tokens/2`` one ``token_score`` column held ``p_CE`` on correct rows and ``1 - p_CE``
on incorrect ones, so a hand-written SQL weighting over it up-weighted the critical tokens of wrong
answers: each meaning now has its own column.

Mapping to SFT (winnow is an SFT tool; the paper puts the weights inside a token-level DPO loss,
``-log σ(β·(Σ w_cho·Δlogπ_cho - Σ w_rej·Δlogπ_rej))``, which pushes *down* the critical tokens of
the rejected answer): SFT can only push likelihood up, so an incorrect answer must never be trained
on — least of all its critical tokens. Hence ``keep = is_correct`` (incorrect samples are dropped,
reason ``incorrect``; their ``token_keep`` is False), and correct samples are kept with all their
supervised tokens; a policy may optionally weight their tokens by ``token_p_ce``. The critical
tokens of incorrect answers are diagnostics (where does the reasoning go wrong?), never training targets.

``threshold = 0.5`` for ``token_critical`` is winnow's choice (the paper uses the continuous weight
1 - p_CE and defines no cut-off). Output ``scores/critical_tokens``: ``is_correct``, ``keep``,
``reason``, ``n_supervised``, ``n_critical``, ``mean_p_ce``, ``min_p_ce``, per-token ``token_p_ce``,
``token_criticality``, ``token_critical``, ``token_keep``. Per-sample maths, so shards are recomputed
only when their inputs changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from winnow.core.markdown import per_sample_section
from winnow.core.shards import Computed
from winnow.core.steps import Ref
from winnow.core.store import UserError
from winnow.stages import stage_io as io
from winnow.stages.critical_tokens_math import CriticalResult, critical_token_scores  # noqa: F401
from winnow.stages.stage import Ctx, Stage

CODE_VERSION = "critical_tokens/2"
NAME = "critical_tokens"
CONTRAST_COMMAND = "winnow score {root} --contrast --positive POSITIVE_MODEL --negative NEGATIVE_MODEL"

TRUE_WORDS = {"true", "t", "yes", "y", "1", "correct", "right", "pass", "passed"}
FALSE_WORDS = {"false", "f", "no", "n", "0", "incorrect", "wrong", "fail", "failed"}


@dataclass(kw_only=True)
class CriticalTokensParams:
    """Parameters of the critical-token stage (`winnow score DIR critical_tokens --set key=value`)."""

    label: str = "meta_is_correct"  # samples column holding the correctness label
    contrast: str = "contrast"  # signals/<contrast> written by the contrast pass, with p_ce
    threshold: float = 0.5  # winnow's cut-off: p_CE below it marks a critical token

    def __post_init__(self) -> None:
        if not self.label.startswith("meta_"):
            raise ValueError(
                f"label={self.label!r} must name a meta_ column, e.g. --set label=meta_is_correct"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]; e.g. --set threshold=0.5")
        if not self.contrast:
            raise ValueError("contrast must name the contrast signals table, e.g. --set contrast=contrast")


# ---- stage adapter ---------------------------------------------------------------------------------
def parse_labels(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A label column -> ``(is_correct, labelled)`` bool arrays; unknown values are a UserError."""
    arr = column.combine_chunks()
    labelled = np.asarray(arr.is_valid())
    values = arr.to_pylist()
    out = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool):
            out[i] = v
        elif isinstance(v, int | float) and v in (0, 1):
            out[i] = bool(v)
        elif isinstance(v, str) and v.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            out[i] = v.strip().lower() in TRUE_WORDS
        elif isinstance(v, str) and not v.strip():
            labelled[i] = False
        else:
            raise UserError(
                f"{name}: row {i} holds {v!r}, not a correctness label; use booleans, 0/1 or one of "
                f"{sorted(TRUE_WORDS)} / {sorted(FALSE_WORDS)}"
            )
    return out, labelled


def card_section(card, spec) -> list[str]:
    """The card's critical_tokens section: the per-sample minimum p_CE."""
    return per_sample_section(card, "critical_tokens", "min_p_ce")


def _reason(correct: bool, labelled: bool) -> str:
    return "unlabelled" if not labelled else ("correct" if correct else "incorrect")


def _check_label(ctx: Ctx) -> None:
    """The label column exists (exit 2 naming the fix)."""
    params = ctx.params
    samples_schema = ctx.run.table(io.SAMPLES).schema()
    names = samples_schema.names if samples_schema is not None else []
    if params.label not in names:
        metas = [n for n in names if n.startswith("meta_")]
        raise UserError(
            f"samples has no column {params.label!r}; available meta_ columns: {metas or 'none'}; "
            "pick one with --set label=meta_<name> (or ingest data that carries a correctness field)"
        )


def _shard_table(shard, params: CriticalTokensParams, key: tuple[str, str]) -> pa.Table:
    import torch

    correct, labelled = parse_labels(shard.samples.column(params.label), f"samples.{params.label}")
    mask_np = shard.valid(key)
    p_ce = shard.signals[key]
    res = critical_token_scores(
        torch.from_numpy(p_ce),
        torch.from_numpy(mask_np),
        torch.from_numpy(correct),
        params.threshold,
        torch.from_numpy(labelled),
    )
    n_sup = mask_np.sum(1)
    has = n_sup > 0
    p_masked = np.where(mask_np, p_ce, 0.0)
    critical = res.critical.numpy()
    incorrect = labelled & ~correct
    token_keep_valid = mask_np & labelled[:, None]
    return pa.table(
        {
            "sample_id": shard.sample_id,
            "is_correct": pa.array(correct, type=pa.bool_(), mask=~labelled),
            "keep": pa.array(res.keep_sample.numpy(), type=pa.bool_(), mask=~labelled),
            "reason": pa.array([_reason(c, lab) for c, lab in zip(correct, labelled, strict=True)]),
            "n_supervised": pa.array(n_sup, type=pa.int32()),
            "n_critical": pa.array(critical.sum(1), type=pa.int32(), mask=~incorrect),
            "mean_p_ce": pa.array(
                np.where(has, p_masked.sum(1) / np.maximum(n_sup, 1), np.nan),
                type=pa.float64(),
                from_pandas=True,
            ),
            "min_p_ce": pa.array(
                np.where(has, np.where(mask_np, p_ce, np.inf).min(1, initial=np.inf), np.nan),
                type=pa.float64(),
                from_pandas=True,
            ),
            "token_p_ce": io.to_list_array(res.p_ce.numpy(), mask_np, shard.n_tokens, pa.float32()),
            "token_criticality": io.to_list_array(
                res.criticality.numpy(), mask_np & incorrect[:, None], shard.n_tokens, pa.float32()
            ),
            "token_critical": io.to_list_array(
                critical, mask_np & incorrect[:, None], shard.n_tokens, pa.bool_()
            ),
            "token_keep": io.to_list_array(
                res.token_keep.numpy(), token_keep_valid, shard.n_tokens, pa.bool_()
            ),
        }
    )


def _compute(ctx: Ctx, part: int, state: None) -> Computed:
    """One shard: per-sample maths, so shards are recomputed only when their inputs changed."""
    key = (ctx.params.contrast, "p_ce")
    shard = ctx.shard(part, sample_columns=[ctx.params.label])
    table = _shard_table(shard, ctx.params, key)
    return Computed([table], counts={"supervised_without_signal": shard.supervised_without_signal(key)})


STAGE = Stage(
    name=NAME,
    help="cDPO critical tokens: p_CE scores; for SFT drop incorrect samples, weight correct tokens by p_CE",
    params=CriticalTokensParams,
    code_version=CODE_VERSION,
    reads=("samples", Ref("signals/{contrast}", columns=("p_ce",), hint=CONTRAST_COMMAND)),
    columns=("keep", "reason", "token_keep", "min_p_ce"),
    check=_check_label,
    compute=_compute,
    card=card_section,
)
STEP = STAGE  # the runnable step (``STEP.run(run, params)``) is the stage itself
