"""The two-model contrast pass of cDPO (ALGORITHMS.md §4): ``signals/contrast/``.

``winnow score DIR --contrast --positive P --negative N [--beta 1.0]``.

For every target position ``i`` (supervised by default) of every sample, with ``z_pos``/``z_neg`` the
logits of the positive and negative models at position ``i-1``::

    p_ce[i] = softmax((1 + beta) * z_pos - beta * z_neg)[x_i]      (beta = 1: 2 z_pos - z_neg, the paper's)

plus each model's own ``log p(x_i | x_<i)`` (``logprob_pos``, ``logprob_neg``). Critical tokens are the
ones with low ``p_ce`` in rejected responses; the cDPO weight of a rejected token is ``1 - p_ce``.

Both bodies run on the same batch (same batching as the model pass, :mod:`.batching`), and the two
heads are applied together in fp32 chunks at the needed positions only
(:func:`.chunked_head.contrast_scores`): never full logits for a batch. Both models must share the
samples' tokenizer (checked, exit 2 otherwise) and the same vocabulary size. Settings, resolution,
fingerprints, threads and the manifest are the model pass's (:mod:`.pass_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from winnow.core.errors import UserError
from winnow.core.steps import Step
from winnow.core.store import RunDir
from winnow.stages.passes.model_scoring import forward_hidden, gather_targets, list_column, read_samples
from winnow.stages.passes.pass_step import PassContext, PassJob, PassSettings, run_pass

if TYPE_CHECKING:
    from winnow.core.model_io import LoadedModel

TABLE = "signals/contrast"
OUT_COLUMNS = ("p_ce", "logprob_pos", "logprob_neg")


@dataclass
class ContrastParams(PassSettings):
    """Parameters of ``winnow score DIR --contrast --positive P --negative N``."""

    positive: str  # model trained on correct responses (local dir or builtin:<name>)
    negative: str  # model trained on incorrect responses
    beta: float = 1.0  # contrast strength: (1 + beta) z_pos - beta z_neg

    def __post_init__(self) -> None:
        where = "contrast_pass"
        if not self.positive or not self.negative:
            raise ValueError(f"{where}: give both positive and negative models (--positive P --negative N)")
        if not self.beta >= 0:
            raise ValueError(f"{where}: beta={self.beta} must be >= 0 (the paper uses 1.0)")
        self.check_settings(where)


def contrast_samples(
    pos: LoadedModel,
    neg: LoadedModel,
    seqs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    beta: float = 1.0,
    positions: str = "supervised",
    token_budget: int = 4096,
    head_chunk: int = 0,
    advance: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """p_ce, logprob_pos, logprob_neg on the flat token axis of ``seqs`` (+ the computed-position mask)."""
    import torch

    from winnow.core.layout import collate, plan_batches
    from winnow.kernels.switch import contrast_scores

    lengths = np.array([len(x) for x in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = {c: np.zeros(int(offsets[-1]), np.float32) for c in OUT_COLUMNS}
    valid = np.zeros(int(offsets[-1]), bool)
    with torch.inference_mode():
        for plan in plan_batches(lengths, token_budget, pos.layout):
            col = collate(plan, seqs, pos.layout, pos.device, pos.pad_id)
            src, tgt, dest = gather_targets(col, seqs, masks, positions, offsets)
            if len(src):
                idx = torch.from_numpy(src).to(pos.device)
                h_pos = forward_hidden(pos, col).reshape(-1, pos.hidden_size)[idx]  # (N, d_pos)
                h_neg = forward_hidden(neg, col).reshape(-1, neg.hidden_size)[idx]  # (N, d_neg)
                scores = contrast_scores(
                    pos.head, h_pos, neg.head, h_neg, torch.from_numpy(tgt).to(pos.device), beta, head_chunk
                )
                for c, v in zip(OUT_COLUMNS, scores, strict=True):
                    out[c][dest] = v.cpu().numpy()
                valid[dest] = True
            if advance is not None:
                advance(plan.real_tokens)
    return out, valid


def _load_pair(ctx: PassContext) -> tuple[LoadedModel, LoadedModel]:
    pos, neg = ctx.load("positive"), ctx.load("negative")
    if pos.head.vocab_size != neg.head.vocab_size:
        raise UserError(
            f"positive and negative models have different vocabularies ({pos.head.vocab_size} vs "
            f"{neg.head.vocab_size}); the contrast needs one token space"
        )
    if pos.layout != neg.layout:  # one batch feeds both bodies
        raise UserError("positive and negative models need the same attention layout; set layout=padded")
    return pos, neg


def _compute(
    p: ContrastParams,
    ctx: PassContext,
    pair: tuple[LoadedModel, LoadedModel],
    tbl: pa.Table,
    advance: Callable[[int], None],
) -> pa.Table:
    seqs, masks, lengths = read_samples(tbl)
    vals, valid = contrast_samples(
        pair[0],
        pair[1],
        seqs,
        masks,
        beta=p.beta,
        positions=p.positions,
        token_budget=ctx.token_budget,
        head_chunk=p.head_chunk,
        advance=advance,
    )
    cols = {"sample_id": tbl["sample_id"].combine_chunks()}
    cols |= {c: list_column(vals[c], valid, lengths) for c in OUT_COLUMNS}
    return pa.table(cols)


def run_contrast_pass(run: RunDir, p: ContrastParams) -> dict[str, Any]:
    """p_ce and both models' log-probs for every pending samples shard; returns the manifest entry."""
    job = PassJob(
        kind="contrast_pass",
        alias="contrast",
        models={"positive": p.positive, "negative": p.negative},
        settings={"beta": p.beta, "positions": p.positions},
        load=_load_pair,
        compute=lambda ctx, pair, tbl, advance: _compute(p, ctx, pair, tbl, advance),
        record={"beta": p.beta},
    )
    return run_pass(run, p, job)


STEP = Step(
    name="contrast_pass",
    params=ContrastParams,
    run=run_contrast_pass,
)
