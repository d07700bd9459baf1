"""ssToken (Qin et al., "Self-modulated and Semantic-aware Token Selection", arXiv 2510.18250): per
sample, keep the response tokens that the model has learned most since its history model, mixed with
how much each token's query attends to the prompt.

Maths (ALGORITHMS.md §2, = the authors' ``filter_tokens_with_attention_loss``), per sample over its
supervised tokens T (``loss_mask == 1`` and the needed signals present):

* retrospective excess loss ``REL_i = L_his(i) - L_cur(i)`` with ``L(i) = -logprob[i]`` under the
  ``history`` and ``current`` aliases (positive: the current model has improved on token i);
* ``REL^_i = (REL_i - min_T REL) / (max_T REL - min_T REL + 1e-8)`` (min-max within the sample, the
  authors' epsilon; all-equal REL gives 0);
* ``score_i = γ·REL^_i + (1-γ)·attn_i`` where ``attn_i = attn_importance[i]`` of the current model;
* keep the ``⌈ρ·|T|⌉`` highest scores of the sample (ties: earlier position first).

Attention alignment, replicated from the authors' code on purpose: ``attn_importance`` is anchored at
the *query* (index i = attention row i, whose hidden state predicts token i+1, summed over prompt
columns, last layer, mean over heads), and ssToken adds row i to the loss of token i. winnow keeps that
pairing (index i with index i) rather than shifting by one; the stage refuses a column whose field
metadata declares another anchor.

Offline, ``current`` must be a model that differs from ``history`` (e.g. the base model warmed up on
part of the data): with identical weights REL is 0 everywhere and the score degenerates to attention.
When both aliases carry the same weight fingerprint the stage exits 2 and says so; ``--set gamma=0``
asks for attention-only scores explicitly (then no history is read). The authors' code also starts
every epoch with attention-only selection until a sample index >= 10000 is seen; that training-time
quirk is not reproduced. The EMA history model (paper Eq. 4, "optional", not in the released code)
is the trainer's business: it passes its own ``nll_his`` to :func:`sstoken_select`.

What REL rewards, measured (``benchmarks/RESULTS.md``, quality models): when the ``current`` model
was warmed up on the very data being scored, corrupted tokens (junk spans, a wrong ``####`` number) are
where it improved most on its history model, so REL ranks them *highest* (AUROC 0.000 as a detector)
and ssToken keeps them: 18% of junk tokens pruned against 39% of all tokens. Self-modulated selection
keeps whatever the model is learning now; run sample-level filters (Rho-1 excess loss, cDPO) first.

Defaults γ = 0.5 (``--ratio``), ρ = 0.6 (``--data_prop``; the paper uses 0.8 for 14B models).
UNCONFIRMED (a parameter): whether the paper normalises the attention term; the released code does
not (it is a sum of probabilities, already in [0, 1]), so ``attn_minmax=False``; True min-max
normalises it within the sample like REL.
Output ``scores/sstoken``: ``n_supervised``, ``n_token_keep``, ``rel_min``, ``rel_max``, per-token
``rel``, ``token_score`` and ``token_keep`` (null where a token is not scored). Per-sample selection,
so shards are independent: each records its own input shards and is skipped when they are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from winnow.core.shards import Computed
from winnow.core.steps import Ref
from winnow.core.store import UserError
from winnow.stages import stage_io as io
from winnow.stages.excess_loss_math import refuse_zero_excess
from winnow.stages.sstoken_math import (  # noqa: F401  (re-exported: the stage's public array API)
    NORM_EPS,
    SSTokenResult,
    minmax_rows,
    retrospective_excess_loss,
    sstoken_scores,
    sstoken_select,
)
from winnow.stages.stage import Ctx, Stage

CODE_VERSION = "sstoken/1"
NAME = "sstoken"


@dataclass(kw_only=True)
class SSTokenParams:
    """Parameters of the ssToken stage (`winnow score DIR sstoken --set key=value`)."""

    current: str = "current"  # alias of the current model: logprob and attn_importance
    history: str = "history"  # alias of the history model (the base model before SFT): logprob
    gamma: float = 0.5  # weight of the normalised REL; 1 - gamma weighs attention ("ratio" in code)
    rho: float = 0.6  # fraction of each sample's supervised tokens kept ("data_prop" in code)
    attn_minmax: bool = (
        False  # UNCONFIRMED: the code adds raw attention (in [0, 1]); True min-max normalises it
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1]; the paper uses --set gamma=0.5")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be in (0, 1]; the paper uses --set rho=0.6")
        if not self.current or not self.history:
            raise ValueError("current and history must name signals aliases, e.g. --set history=history")
        if self.gamma > 0 and self.current == self.history:
            raise ValueError(
                f"current and history are both {self.current!r}: REL would be 0 everywhere; "
                "--set history=ALIAS of the model before fine-tuning"
            )


# ---- stage adapter ---------------------------------------------------------------------------------
def _current_columns(p: SSTokenParams) -> list[str]:
    return (["logprob"] if p.gamma > 0 else []) + (["attn_importance"] if p.gamma < 1 else [])


def _check(ctx: Ctx) -> None:
    """Attention anchored at the query; with REL, a history model whose weights differ from current's."""
    params = ctx.params
    table = ctx.run.table(f"signals/{params.current}")
    anchor = io.field_anchor(table, "attn_importance")
    if params.gamma < 1 and anchor not in (None, "query"):
        raise UserError(
            f"signals/{params.current}.attn_importance is anchored at {anchor!r}; "
            "ssToken pairs the attention row of query i with the loss of token i and needs anchor 'query'"
        )
    if params.gamma > 0:
        io.refuse_same_weights(
            ctx.run,
            params.history,
            params.current,
            "the retrospective excess loss would be 0 for every token and ssToken would silently rank by "
            f"attention alone. Score a model that has moved away from the history model as {params.current!r}, "
            f"e.g. a warmed-up copy: `{io.signals_command(ctx.run, params.current, ['logprob', 'attn_importance'])}` "
            "(or --set gamma=0 to ask for attention-only scores)",
        )


def _shard_table(shard, params: SSTokenParams, keys, part) -> pa.Table:
    import torch

    use_rel, use_attn = params.gamma > 0, params.gamma < 1
    mask_np = shard.valid(*keys)
    mask = torch.from_numpy(mask_np)
    zeros = torch.zeros(mask.shape, dtype=torch.float64)
    nll_cur = -torch.from_numpy(shard.signals[(params.current, "logprob")]) if use_rel else zeros
    nll_his = -torch.from_numpy(shard.signals[(params.history, "logprob")]) if use_rel else zeros
    attn = torch.from_numpy(shard.signals[(params.current, "attn_importance")]) if use_attn else None
    res = sstoken_select(nll_his, nll_cur, attn, mask, params.gamma, params.rho, params.attn_minmax)
    rel = res.rel.numpy()
    if use_rel:
        refuse_zero_excess(
            int(mask_np.sum()),
            int((rel[mask_np] != 0).sum()),
            f"sstoken (signals/{params.history} vs signals/{params.current}, {io.part_name(part)})",
            "Score a model that has moved away from the history model as current (or --set gamma=0).",
        )
    has = mask_np.any(1)
    rel_min = np.where(has, np.where(mask_np, rel, np.inf).min(1, initial=np.inf), np.nan)
    rel_max = np.where(has, np.where(mask_np, rel, -np.inf).max(1, initial=-np.inf), np.nan)
    rel_valid = mask_np if use_rel else np.zeros_like(mask_np)
    return pa.table(
        {
            "sample_id": shard.sample_id,
            "n_supervised": pa.array(mask_np.sum(1), type=pa.int32()),
            "n_token_keep": pa.array(res.keep.numpy().sum(1), type=pa.int32()),
            "rel_min": pa.array(
                rel_min if use_rel else np.full(len(has), np.nan), type=pa.float64(), from_pandas=True
            ),
            "rel_max": pa.array(
                rel_max if use_rel else np.full(len(has), np.nan), type=pa.float64(), from_pandas=True
            ),
            "rel": io.to_list_array(rel, rel_valid, shard.n_tokens, pa.float32()),
            "token_score": io.to_list_array(res.score.numpy(), mask_np, shard.n_tokens, pa.float32()),
            "token_keep": io.to_list_array(res.keep.numpy(), mask_np, shard.n_tokens, pa.bool_()),
        }
    )


def _compute(ctx: Ctx, part: int, state: None) -> Computed:
    """One shard: per-sample maths, so shards are independent (per-shard inputs)."""
    shard = ctx.shard(part)
    keys = ctx.keys()
    table = _shard_table(shard, ctx.params, keys, part)
    return Computed([table], counts={"supervised_without_signal": shard.supervised_without_signal(*keys)})


STAGE = Stage(
    name=NAME,
    help="ssToken: retrospective excess loss (history - current) mixed with attention, top-rho per sample",
    params=SSTokenParams,
    code_version=CODE_VERSION,
    reads=(
        "samples",
        Ref("signals/{current}", columns=_current_columns),
        Ref("signals/{history}", lambda p: p.gamma > 0, columns=("logprob",)),
    ),
    columns=("token_keep",),
    check=_check,
    compute=_compute,
)
STEP = STAGE  # the runnable step (``STEP.run(run, params)``) is the stage itself
