"""Token Cleaning, fixed model (Pang et al., "Fine-Grained Data Selection for LLM Supervised Fine-Tuning",
ICML 2025; ALGORITHMS_TRAINING.md §3): keep the response tokens the base model has most to learn on
relative to a reference model warmed on trusted data.

``score_i = ℓ_base(i) − ℓ_reference(i)`` with ``ℓ(i) = -logprob[i]`` of the ``base`` (the model to be
fine-tuned) and ``reference`` (a copy of it fine-tuned briefly on a trusted subset) aliases, over
supervised tokens where both log-probs exist (:mod:`winnow.stages.token_cleaning_math`). Selection:

* ``level="global"`` (the authors' default): the ``⌊rho·N⌋`` highest scores of all N scored tokens of
  the pool, ties to the earlier token in (shard, row, position) order, as the code's stable sort over
  the dataset order. It runs on Rho-1's whole-pool top-k (:func:`winnow.stages.excess_loss.scan_whole`:
  order keys spilled to a temporary file, a radix select, memory independent of N); a later cross-rank
  reduction belongs in that one function.
* ``level="sample"`` (the "RHO" baseline as the paper's summary describes it, UNCONFIRMED): each sample
  keeps its own ``⌊rho·n_i⌋`` highest tokens (n_i = 1 keeps none).

**How it differs from Rho-1** (``excess_loss``): the same difference of losses, but Rho-1 compares the
model *being trained* at each step with the reference and keeps the top k% of each training mini-batch
(online in the trainer, or offline over simulated mini-batches of 8 samples), so a token's fate depends
on the batch it lands in and on how far training has gone. Token Cleaning scores once, with the fixed
base, and ranks the whole pool (or each sample) before training; training is ordinary SFT on the kept
tokens. ``winnow score RUN excess_loss --set batch_size=0 --set current=base`` computes the same global
selection; this stage names the method, adds the per-sample level and its own card section.

Samples may keep zero tokens; ``winnow select`` then drops them (reason ``no_token_weight``), so no
training batch has a zero weight sum (the authors' HF mean would be NaN there).

Identical models are refused as in Rho-1 (same weight fingerprint, or a score of exactly 0 everywhere).

Output ``scores/token_cleaning``: ``n_supervised``, ``n_token_keep``, ``mean_score`` and per-token
``token_score`` (float32) and ``token_keep``, null where a token is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.core.markdown import md_table
from winnow.core.steps import Ref
from winnow.stages import excess_loss as ex
from winnow.stages import stage_io as io
from winnow.stages.stage import Ctx, Stage
from winnow.stages.token_cleaning_math import LEVELS, token_cleaning_select

CODE_VERSION = "token_cleaning/1"
NAME = "token_cleaning"


@dataclass(kw_only=True)
class TokenCleaningParams:
    """Parameters of Token Cleaning (`winnow select RUN token_cleaning --set rho=0.6 --set level=global`)."""

    base: str = "base"  # signals alias of the model to be fine-tuned (ℓ_base)
    reference: str = "reference"  # signals alias of the reference warmed on trusted data (ℓ_reference)
    rho: float = 0.6  # share of response tokens kept (the code's data_prop; paper: 50-70%)
    level: str = "global"  # global: top rho of the whole pool; sample: top rho of each sample ("RHO")

    def __post_init__(self) -> None:
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be in (0, 1]; e.g. --set rho=0.6")
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} must be one of {list(LEVELS)}; e.g. --set level=global")
        if not self.base or not self.reference:
            raise ValueError("base and reference must name signals aliases, e.g. --set reference=reference")
        if self.base == self.reference:
            raise ValueError(
                f"base and reference are both {self.base!r}: every score would be 0; "
                "--set reference=ALIAS of the base warmed on trusted data"
            )


def _refuse_zero(params: TokenCleaningParams, n: int, nonzero: int) -> None:
    ex.refuse_zero_excess(
        n,
        nonzero,
        f"token_cleaning (signals/{params.base} vs signals/{params.reference})",
        f"--set reference=ALIAS of the base warmed on trusted data, not a copy of {params.base!r}.",
    )


def _check_models(ctx: Ctx) -> None:
    p = ctx.params
    io.refuse_same_weights(
        ctx.run,
        p.reference,
        p.base,
        "every token would score 0 and the top-k would keep tokens in input order. Score the base warmed "
        f"on trusted data as {p.reference!r}: `{io.signals_command(ctx.run, p.reference, ['logprob'])}`",
    )


@dataclass
class _PerSample:
    counts: dict[str, int] = field(default_factory=dict)


def _scan(ctx: Ctx) -> Any:
    """``global``: the whole-pool cutoff (Rho-1's spilled radix select); ``sample``: only the counts and
    the all-zero check (each shard then selects on its own)."""
    p = ctx.params
    aliases = (p.base, p.reference)
    refuse = lambda n, nonzero: _refuse_zero(p, n, nonzero)  # noqa: E731
    if p.level == "global":
        return ex.scan_whole(ctx, aliases, p.rho, refuse)
    n = nonzero = missing = 0
    for part in ctx.parts:
        _, _, flat, miss = ex.shard_scores(ctx, part, *aliases)
        n, nonzero, missing = n + len(flat), nonzero + int((flat != 0).sum()), missing + miss
    refuse(n, nonzero)
    keys = ("samples", "kept_tokens")
    return _PerSample({"scored_tokens": n, "supervised_without_signal": missing} | dict.fromkeys(keys, 0))


def _per_sample_keep(ctx: Ctx, part: int, state: _PerSample) -> tuple:
    import torch

    p = ctx.params
    shard, mask, flat, _ = ex.shard_scores(ctx, part, p.base, p.reference)
    nll = [torch.from_numpy(-shard.signals[(a, "logprob")]) for a in (p.base, p.reference)]
    _, keep = token_cleaning_select(*nll, torch.from_numpy(mask), p.rho, "sample")
    state.counts["samples"] += len(shard.n_tokens)
    return shard, mask, flat, keep.numpy()[mask]


def _compute(ctx: Ctx, part: int, state: Any) -> pa.Table:
    if isinstance(state, _PerSample):
        shard, mask, flat, keep = _per_sample_keep(ctx, part, state)
        state.counts["kept_tokens"] += int(keep.sum())
    else:
        shard, mask, flat, keep = ex.whole_keep(ctx, part, state)
    table = ex.shard_table(shard.sample_id, np.zeros(len(mask), np.int32), mask, shard.n_tokens, flat, keep)
    return table.drop_columns(["batch"]).rename_columns(
        ["mean_score" if c == "mean_excess" else c for c in table.column_names if c != "batch"]
    )


def card_section(card: Any, spec: Any) -> list[str]:
    """What Token Cleaning kept: its parameters, scored and kept tokens, samples left with none."""
    params = (card.man.get("steps", {}).get(f"stage:{NAME}") or {}).get("config", {})
    (scored, kept, samples, empty) = card.q(
        f"select sum(list_count(token_keep))::bigint, "
        f"coalesce(sum(list_sum(token_keep::integer[])), 0)::bigint, count(*), "
        f"count_if(n_supervised > 0 and n_token_keep = 0) from scores_{NAME}"
    )[0]
    share = kept / scored if scored else float("nan")
    header = ["base", "reference", "rho", "level", "scored tokens", "kept tokens", "kept share"]
    row = [params.get("base"), params.get("reference"), params.get("rho"), params.get("level")]
    return [
        f"### {NAME}: kept tokens (score = ℓ_base − ℓ_reference)",
        "",
        md_table([*header, "samples", "samples keeping none"], [[*row, scored, kept, share, samples, empty]]),
        "",
    ]


STAGE = Stage(
    name=NAME,
    help="Token Cleaning (fixed model): base-model loss minus reference loss, top rho of the pool or per sample",
    params=TokenCleaningParams,
    code_version=CODE_VERSION,
    reads=(
        "samples",
        *(Ref(f"signals/{{{alias}}}", columns=("logprob",)) for alias in ("base", "reference")),
    ),
    columns=("token_keep", "mean_score"),
    check=_check_models,
    scan=_scan,
    compute=_compute,
    counts=lambda state: state.counts,
    card=card_section,
)
STEP = STAGE
