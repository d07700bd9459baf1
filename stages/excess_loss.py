"""Excess loss (Rho-1 / Selective Language Modeling; Lin et al., arXiv 2404.07965): keep the tokens on
which the model being trained is furthest behind a reference model trained on good data.

Maths (ALGORITHMS.md §3): ``score_i = L_cur(i) - L_ref(i)`` with ``L(i) = -logprob[i]`` under the
``current`` and ``reference`` aliases (signed: high = learnable and wanted), over supervised tokens
(``loss_mask == 1`` and both log-probs present). Keep the ``⌊k_ratio·N⌋`` highest scores across
the whole batch (N = its scored tokens), not per sample; ties go to the earlier token.

Rho-1 selects per training mini-batch with the model as it is at that step. Offline there is one
fixed ``current`` model, and B is either the whole dataset (``batch_size=0``: one global top-k%) or
seeded simulated mini-batches of ``batch_size`` samples (samples with no scored token are left out).
Both are approximations of the trainer's real batches: the real selection also changes as the model
trains. The trainer calls :func:`excess_loss_select` on one mini-batch with the live loss.

UNCONFIRMED (a parameter): ``k_ratio = 0.6`` — inferred from "9B selected of 15B tokens" for the
1B model (0.7 for the 7B model); the paper states no ratio for SFT.

The global top-k holds every scored token's float64 score in memory once (8 bytes per supervised
token plus a byte per token for the masks: about 1 GB for 100M supervised tokens); shards are then
written one at a time. Output ``scores/excess_loss``: ``batch``, ``n_supervised``, ``n_token_keep``,
``mean_excess``, per-token ``token_score`` (the excess loss) and ``token_keep``, null where a token
is not scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from winnow.pipeline.steps import Step
from winnow.pipeline.store import RunDir
from winnow.stages import stage_io as io

if TYPE_CHECKING:
    import torch

CODE_VERSION = "excess_loss/1"
NAME = "excess_loss"


@dataclass
class ExcessLossParams:
    """Parameters of the excess-loss stage (`winnow score DIR excess_loss --set key=value`)."""

    current: str = "current"  # alias of the model being trained (its loss is L_cur)
    reference: str = "reference"  # alias of the reference model (L_ref)
    k_ratio: float = 0.6  # UNCONFIRMED: fraction of scored tokens kept per batch
    batch_size: int = 0  # simulated mini-batch size in samples; 0 = the whole dataset is one batch
    seed: int = 0  # shuffle seed of the simulated mini-batches

    def __post_init__(self) -> None:
        if not 0.0 < self.k_ratio <= 1.0:
            raise ValueError(f"k_ratio={self.k_ratio} must be in (0, 1]; e.g. --set k_ratio=0.6")
        if self.batch_size < 0:
            raise ValueError(f"batch_size={self.batch_size} must be >= 0 (0 = whole dataset)")
        if not self.current or not self.reference:
            raise ValueError(
                "current and reference must name signals aliases, e.g. --set reference=reference"
            )
        if self.current == self.reference:
            raise ValueError(
                f"current and reference are both {self.current!r}: the excess loss would be 0 everywhere; "
                "--set reference=ALIAS of a model trained on high-quality data"
            )


# ---- array functions (torch; the trainer calls these online on one mini-batch) ------------------------
def excess_loss(nll_cur: torch.Tensor, nll_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ``nll_cur - nll_ref`` on the mask, NaN elsewhere."""
    import torch

    return torch.where(mask, nll_cur - nll_ref, float("nan"))


def excess_loss_select(
    nll_cur: torch.Tensor, nll_ref: torch.Tensor, mask: torch.Tensor, k_ratio: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rho-1 on one batch: ``(score, keep)``, keep = top ``⌊k_ratio·N⌋`` excess losses across the batch.

    nll_cur, nll_ref: (B, T) per-token losses at index i (position convention of the tables);
    mask: (B, T) bool, True on supervised tokens. Train with loss ``Σ keep·ℓ / Σ keep``.
    """
    score = excess_loss(nll_cur, nll_ref, mask)
    return score, io.top_fraction(score, mask, k_ratio)


# ---- stage adapter ---------------------------------------------------------------------------------
def run_excess_loss(run: RunDir, params: ExcessLossParams) -> dict:
    import torch

    started = time.time()
    parts = io.samples_parts(run)
    for alias in (params.current, params.reference):
        io.require_signals(run, alias, ["logprob"], parts)
    st = io.StageOutput(run, NAME, params, CODE_VERSION, started)
    out, fp = st.out, st.fp
    tables = [io.SAMPLES, f"signals/{params.current}", f"signals/{params.reference}"]
    inputs = io.table_inputs(run, tables)  # top-k across the dataset: whole-table inputs
    keys = [(params.current, "logprob"), (params.reference, "logprob")]
    read = {params.current: ["logprob"], params.reference: ["logprob"]}
    counts: dict = {}
    if not io.all_fresh(out, parts, fp, inputs):
        io.drop_orphans(out, parts)
        # pass 1: every scored token's excess loss, flat in (shard, row, position) order
        masks, flats, n_tok, missing = [], [], [], 0
        for part in parts:
            shard = io.read_shard(run, part, read)
            mask = shard.valid(*keys)
            score = excess_loss(
                -torch.from_numpy(shard.signals[keys[0]]),
                -torch.from_numpy(shard.signals[keys[1]]),
                torch.from_numpy(mask),
            )
            masks.append(mask)
            flats.append(score.numpy()[mask])
            n_tok.append(shard.n_tokens)
            missing += shard.supervised_without_signal(*keys)
        flat = torch.from_numpy(np.concatenate(flats)) if flats else torch.zeros(0, dtype=torch.float64)
        per_sample = np.concatenate([m.sum(1) for m in masks])  # scored tokens per sample
        starts = np.concatenate([[0], np.cumsum(per_sample)])
        keep_flat = torch.zeros(flat.numel(), dtype=torch.bool)
        batch = np.full(len(per_sample), -1, dtype=np.int32)
        scored = np.flatnonzero(per_sample > 0)
        batches = io.simulated_batches(len(scored), params.batch_size, params.seed)
        if len(batches) == 1:  # the whole dataset: one row, the very same top-k function
            keep_flat = io.top_fraction(
                flat[None], torch.ones(1, flat.numel(), dtype=torch.bool), params.k_ratio
            )[0]
            batch[scored] = 0
        else:
            for b, sel in enumerate(batches):
                rows = scored[sel]
                width = int(per_sample[rows].max())
                vals = torch.zeros(len(rows), width, dtype=torch.float64)
                bmask = torch.arange(width)[None, :] < torch.from_numpy(per_sample[rows])[:, None]
                index = torch.from_numpy(
                    np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows]).astype(np.int64)
                )
                vals[bmask] = flat[index]  # row-major fill keeps each sample's tokens in order
                keep_flat[index] = io.top_fraction(vals, bmask, params.k_ratio)[bmask]
                batch[rows] = b
        # pass 2: write each shard from the flat arrays
        keep_np, flat_np, start, row0 = keep_flat.numpy(), flat.numpy(), 0, 0
        for part, mask, n_tokens, shard_flat in zip(parts, masks, n_tok, flats, strict=True):
            n_rows, n_flat = mask.shape[0], len(shard_flat)
            score_pad = np.full(mask.shape, np.nan)
            keep_pad = np.zeros(mask.shape, dtype=bool)
            score_pad[mask] = flat_np[start : start + n_flat]
            keep_pad[mask] = keep_np[start : start + n_flat]
            start += n_flat
            sample_id = run.table(io.SAMPLES).read_part(part, columns=["sample_id"]).column("sample_id")
            n_sup = mask.sum(1)
            sums = np.where(mask, score_pad, 0.0).sum(1)
            mean = np.where(n_sup > 0, sums / np.maximum(n_sup, 1), np.nan)
            table = pa.table(
                {
                    "sample_id": sample_id,
                    "batch": pa.array(batch[row0 : row0 + n_rows], type=pa.int32()),
                    "n_supervised": pa.array(n_sup, type=pa.int32()),
                    "n_token_keep": pa.array(keep_pad.sum(1), type=pa.int32()),
                    "mean_excess": pa.array(mean, type=pa.float64(), from_pandas=True),
                    "token_score": io.to_list_array(score_pad, mask, n_tokens, pa.float32()),
                    "token_keep": io.to_list_array(keep_pad, mask, n_tokens, pa.bool_()),
                }
            )
            row0 += n_rows
            st.commit(part, table, inputs)
        counts = {
            "samples": int(len(per_sample)),
            "scored_tokens": int(flat.numel()),
            "kept_tokens": int(keep_flat.sum()),
            "batches": len(batches),
            "supervised_without_signal": missing,
        }
    return st.finish(len(parts), counts)


STEP = Step(
    name=NAME,
    params=ExcessLossParams,
    run=run_excess_loss,
)
