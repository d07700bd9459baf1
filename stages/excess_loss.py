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

Memory (issue 16). The whole-dataset top-k (``batch_size=0``) is streamed: each scored token's
score goes to a temporary file as an order-preserving 8-byte key, a radix select over 16-bit digits
finds the k-th largest in three more reads of that file, and shards are written one at a time, so
memory does not grow with the run (the file does: 8 bytes a supervised token on disk). Simulated
mini-batches (``batch_size > 0``) draw samples from every shard, so that path keeps every scored
token's float64 score and each shard's mask in memory (about 9 bytes a supervised token plus the
padded masks). Measured by ``benchmarks/bench_scale.py`` (2-core VM under load): peak RSS 606 MB at
20k samples and 1,251 MB at 100k (15M supervised tokens) when every score was held; 541 and 553 MB
streamed. Side by side at 20k the wall time did not change (40-44 s before, 39-42 s after, load ~15).

Output ``scores/excess_loss``: ``batch``, ``n_supervised``, ``n_token_keep``, ``mean_excess``,
per-token ``token_score`` (the excess loss) and ``token_keep``, null where a token is not scored.
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
def _scores(run: RunDir, part: int, read, keys) -> tuple[io.Shard, np.ndarray, np.ndarray]:
    """One shard's (shard, scored mask, excess loss with NaN off the mask), float64 (B, T)."""
    import torch

    shard = io.read_shard(run, part, read)
    mask = shard.valid(*keys)
    score = excess_loss(
        -torch.from_numpy(shard.signals[keys[0]]),
        -torch.from_numpy(shard.signals[keys[1]]),
        torch.from_numpy(mask),
    )
    return shard, mask, score.numpy()


def _commit(
    st: io.StageOutput, part: int, sample_id, mask, n_tokens, score_pad, keep_pad, batch, inputs
) -> None:
    n_sup = mask.sum(1)
    sums = np.where(mask, score_pad, 0.0).sum(1)
    mean = np.where(n_sup > 0, sums / np.maximum(n_sup, 1), np.nan)
    table = pa.table(
        {
            "sample_id": sample_id,
            "batch": pa.array(batch, type=pa.int32()),
            "n_supervised": pa.array(n_sup, type=pa.int32()),
            "n_token_keep": pa.array(keep_pad.sum(1), type=pa.int32()),
            "mean_excess": pa.array(mean, type=pa.float64(), from_pandas=True),
            "token_score": io.to_list_array(score_pad, mask, n_tokens, pa.float32()),
            "token_keep": io.to_list_array(keep_pad, mask, n_tokens, pa.bool_()),
        }
    )
    st.commit(part, table, inputs)


def order_keys(x: np.ndarray) -> np.ndarray:
    """float64 -> uint64 keys whose unsigned order is the numeric order (-0.0 counts as 0.0)."""
    bits = (np.asarray(x, np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


def _kth_largest_key(spill, sizes: list[int], hist: np.ndarray, k: int) -> tuple[int, int]:
    """(t, above): the k-th largest key t and how many keys are > t, by radix select over 16-bit
    digits (the first histogram comes from pass 1; each further digit is one read of the spill)."""
    prefix, above, shift = 0, 0, 48
    while True:
        from_top = np.cumsum(hist[::-1])
        i = int(np.searchsorted(above + from_top, k))  # first digit (from the top) reaching k
        digit = 65535 - i
        above += int(from_top[i] - hist[digit])
        prefix |= digit << shift
        if shift == 0:
            return prefix, above
        high, shift = prefix >> shift, shift - 16
        hist = np.zeros(65536, np.int64)
        for keys in _spilled(spill, sizes):
            inside = keys[(keys >> np.uint64(shift + 16)) == np.uint64(high)]
            hist += np.bincount(
                ((inside >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=65536
            )


def _spilled(spill, sizes: list[int]):
    spill.seek(0)
    for n in sizes:
        yield np.fromfile(spill, dtype=np.uint64, count=n)


def _whole_dataset(run: RunDir, st: io.StageOutput, parts, read, keys, inputs, k_ratio: float) -> dict:
    """The global top ``⌊k_ratio·N⌋`` with memory independent of N (issue 16).

    Pass 1 writes each scored token's order key to a temporary file (8 bytes a token, on disk) and
    histograms its top 16 bits; a radix select finds the k-th largest key in three more reads of that
    file; pass 2 keeps keys above it and, of the keys equal to it, the earliest in (shard, row,
    position) order: the very tokens ``top_fraction`` over the concatenated scores keeps.
    """
    import tempfile

    hist, sizes, missing = np.zeros(65536, np.int64), [], 0
    with tempfile.TemporaryFile(prefix="winnow-excess-") as spill:
        for part in parts:
            shard, mask, score = _scores(run, part, read, keys)
            order = order_keys(score[mask])
            order.tofile(spill)
            hist += np.bincount((order >> np.uint64(48)).astype(np.int64), minlength=65536)
            sizes.append(len(order))
            missing += shard.supervised_without_signal(*keys)
        n = sum(sizes)
        k = io.floor_count(k_ratio, n)
        t, above = _kth_largest_key(spill, sizes, hist, k) if k else (None, 0)
        ties_left, n_samples = k - above, 0
        for part, got in zip(parts, _spilled(spill, sizes), strict=True):
            shard, mask, score = _scores(run, part, read, keys)
            keep = np.zeros(len(got), bool)
            if t is not None:
                tie = got == np.uint64(t)
                keep = (got > np.uint64(t)) | (tie & (np.cumsum(tie) <= ties_left))
                ties_left -= int((tie & keep).sum())
            keep_pad = np.zeros(mask.shape, bool)
            keep_pad[mask] = keep
            batch = np.where(mask.any(1), 0, -1)
            _commit(st, part, shard.sample_id, mask, shard.n_tokens, score, keep_pad, batch, inputs)
            n_samples += len(shard.n_tokens)
    return {
        "samples": n_samples,
        "scored_tokens": n,
        "kept_tokens": k,
        "batches": 1,
        "supervised_without_signal": missing,
    }


def _simulated_batches(run: RunDir, st: io.StageOutput, parts, read, keys, inputs, params) -> dict:
    """Top-k per seeded mini-batch of samples drawn across shards: every scored token's float64 score
    and each shard's mask stay in memory (global state, about 9 bytes a supervised token)."""
    import torch

    masks, flats, n_tok, missing = [], [], [], 0
    for part in parts:
        shard, mask, score = _scores(run, part, read, keys)
        masks.append(mask)
        flats.append(score[mask])
        n_tok.append(shard.n_tokens)
        missing += shard.supervised_without_signal(*keys)
    flat = torch.from_numpy(np.concatenate(flats)) if flats else torch.zeros(0, dtype=torch.float64)
    per_sample = np.concatenate([m.sum(1) for m in masks])  # scored tokens per sample
    starts = np.concatenate([[0], np.cumsum(per_sample)])
    keep_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    batch = np.full(len(per_sample), -1, dtype=np.int32)
    scored = np.flatnonzero(per_sample > 0)
    batches = io.simulated_batches(len(scored), params.batch_size, params.seed)
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
        _commit(st, part, sample_id, mask, n_tokens, score_pad, keep_pad, batch[row0 : row0 + n_rows], inputs)
        row0 += n_rows
    return {
        "samples": int(len(per_sample)),
        "scored_tokens": int(flat.numel()),
        "kept_tokens": int(keep_flat.sum()),
        "batches": len(batches),
        "supervised_without_signal": missing,
    }


def run_excess_loss(run: RunDir, params: ExcessLossParams) -> dict:
    started = time.time()
    parts = io.samples_parts(run)
    for alias in (params.current, params.reference):
        io.require_signals(run, alias, ["logprob"], parts)
    st = io.StageOutput(run, NAME, params, CODE_VERSION, started)
    tables = [io.SAMPLES, f"signals/{params.current}", f"signals/{params.reference}"]
    inputs = io.table_inputs(run, tables)  # top-k across the dataset: whole-table inputs
    keys = [(params.current, "logprob"), (params.reference, "logprob")]
    read = {params.current: ["logprob"], params.reference: ["logprob"]}
    counts: dict = {}
    if not io.all_fresh(st.out, parts, st.fp, inputs):
        io.drop_orphans(st.out, parts)
        n_samples = sum(r.rows for r in run.table(io.SAMPLES).records())
        if params.batch_size <= 0 or params.batch_size >= n_samples:  # one batch: the whole dataset
            counts = _whole_dataset(run, st, parts, read, keys, inputs, params.k_ratio)
        else:
            counts = _simulated_batches(run, st, parts, read, keys, inputs, params)
    return st.finish(len(parts), counts)


STEP = Step(
    name=NAME,
    params=ExcessLossParams,
    run=run_excess_loss,
)
