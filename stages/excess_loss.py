"""Excess loss (Rho-1 / Selective Language Modeling; Lin et al., arXiv 2404.07965): keep the tokens on
which the model being trained is furthest behind a reference model trained on good data.

Maths (ALGORITHMS.md §3): ``score_i = L_cur(i) - L_ref(i)`` with ``L(i) = -logprob[i]`` under the
``current`` and ``reference`` aliases (signed: high = learnable and wanted), over supervised tokens
(``loss_mask == 1`` and both log-probs present). Keep the ``⌊k_ratio·N⌋`` highest scores across
the whole batch (N = its scored tokens), not per sample; ties go to the earlier token.

Rho-1 selects per training mini-batch with the model as it is at that step. Offline there is one
fixed ``current`` model, and B is a seeded simulated mini-batch of ``batch_size = 8`` samples by default
(:func:`winnow.stages.topk.minibatches`, the trainer's own batch definition, as in eu_plane), or the whole
dataset with ``batch_size=0`` (one global top-k%). Samples with no scored token are left out of B. Both are
approximations of the trainer's real batches: the real selection also changes as the model trains. The
trainer calls :func:`excess_loss_select` on one mini-batch with the live loss.

Identical models: the stage refuses a reference whose weight fingerprint (a hash of the tensors, recorded by
the model pass) equals the current model's, and data whose excess loss is exactly 0 on every scored token
(then the top-k would keep the first 60% of tokens in input order).

UNCONFIRMED (a parameter): ``k_ratio = 0.6`` — inferred from "9B selected of 15B tokens" for the
1B model (0.7 for the 7B model); the paper states no ratio for SFT.

Memory (issue 16): both paths spill each scored token's score to a temporary file (8 bytes a supervised
token on disk) and write shards one at a time, so memory does not grow with the run beyond per-sample
scalars. The whole-dataset top-k (``batch_size=0``) spills order-preserving 8-byte keys and a radix
select over 16-bit digits finds the k-th largest in three more reads of the file. Simulated mini-batches
(``batch_size > 0``, the default) draw samples from every shard: each batch reads its rows back with
``pread`` and keeps only its cutoff score and each row's number of kept ties (about 40 bytes a sample
in all, with the batch index and offsets); pass 2 applies them shard by shard. Measured by
``benchmarks/bench_scale.py`` (2-core VM under load): with ``batch_size=0``, peak RSS 606 MB at 20k
samples and 1,251 MB at 100k (15M supervised tokens) when every score was held, 505, 553 and 510 MB at
20k, 100k and 300k streamed; the mini-batch path held every score (about 1.25 GB at 100k) until it
was streamed the same way (benchmarks/RESULTS.md, "Scale ... to 1M").

Output ``scores/excess_loss``: ``batch``, ``n_supervised``, ``n_token_keep``,
``mean_excess``, per-token ``token_score`` (the excess loss) and ``token_keep``, null where a token
is not scored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.core.markdown import per_sample_section
from winnow.core.steps import Ref
from winnow.stages import stage_io as io
from winnow.stages import topk
from winnow.stages.excess_loss_math import excess_loss, excess_loss_select, refuse_zero_excess  # noqa: F401
from winnow.stages.stage import Ctx, Stage

CODE_VERSION = "excess_loss/1"
NAME = "excess_loss"


@dataclass(kw_only=True)
class ExcessLossParams:
    """Parameters of the excess-loss stage (`winnow score DIR excess_loss --set key=value`)."""

    current: str = "current"  # alias of the model being trained (its loss is L_cur)
    reference: str = "reference"  # alias of the reference model (L_ref)
    k_ratio: float = 0.6  # UNCONFIRMED: fraction of scored tokens kept per batch
    batch_size: int = topk.DEFAULT_BATCH_SIZE  # simulated mini-batch in samples; 0 = the whole dataset
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


# ---- stage adapter ---------------------------------------------------------------------------------
def _check_models(ctx: Ctx) -> None:
    params = ctx.params
    io.refuse_same_weights(
        ctx.run,
        params.reference,
        params.current,
        "the excess loss would be 0 for every token and the top-k would keep tokens in input order. "
        f"Score a model trained on high-quality data as {params.reference!r}: "
        f"`{io.signals_command(ctx.run, params.reference, ['logprob'])}`",
    )


def shard_table(sample_id, batch, mask, n_tokens, score_flat, keep_flat) -> pa.Table:
    score_pad = np.full(mask.shape, np.nan)
    keep_pad = np.zeros(mask.shape, dtype=bool)
    score_pad[mask] = score_flat
    keep_pad[mask] = keep_flat
    n_sup = mask.sum(1)
    sums = np.where(mask, score_pad, 0.0).sum(1)
    mean = np.where(n_sup > 0, sums / np.maximum(n_sup, 1), np.nan)
    return pa.table(
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


def order_keys(x: np.ndarray) -> np.ndarray:
    """float64 -> uint64 keys whose unsigned order is the numeric order (-0.0 counts as 0.0)."""
    bits = (np.asarray(x, np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


def _spilled(spill, sizes: list[int]):
    spill.seek(0)
    for n in sizes:
        yield np.fromfile(spill, dtype=np.uint64, count=n)


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
            digits = ((inside >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64)
            hist += np.bincount(digits, minlength=65536)


def _shard_scores(ctx: Ctx, part: int) -> tuple:
    return shard_scores(ctx, part, ctx.params.current, ctx.params.reference)


def shard_scores(ctx: Ctx, part: int, current: str, reference: str) -> tuple:
    """One shard's (shard, scored mask, ``ℓ_current − ℓ_reference`` at the scored positions in row-major
    order, supervised tokens without both signals); Token Cleaning passes its base as ``current``."""
    import torch

    keys = [(current, "logprob"), (reference, "logprob")]
    shard = ctx.shard(part)
    mask = shard.valid(*keys)
    score = excess_loss(
        -torch.from_numpy(shard.signals[keys[0]]),
        -torch.from_numpy(shard.signals[keys[1]]),
        torch.from_numpy(mask),
    )
    return shard, mask, score.numpy()[mask], shard.supervised_without_signal(*keys)


def _refuse_zero(params: ExcessLossParams, n: int, nonzero: int) -> None:
    refuse_zero_excess(
        n,
        nonzero,
        f"excess_loss (signals/{params.current} vs signals/{params.reference})",
        f"--set reference=ALIAS of a model trained on high-quality data, not a copy of {params.current!r}.",
    )


@dataclass
class _Whole:
    """The whole-dataset top-k: the spill of order keys (read back shard by shard), the k-th largest key
    ``t`` and how many of the keys equal to it are still to keep; counts."""

    spill: Any
    spilled: Any
    t: int | None
    ties_left: int
    counts: dict[str, int]
    aliases: tuple[str, str]  # (current, reference): the signals the scores come from

    def close(self) -> None:
        self.spill.close()


def _scan_whole(ctx: Ctx) -> _Whole:
    params = ctx.params
    refuse = lambda n, nonzero: _refuse_zero(params, n, nonzero)  # noqa: E731
    return scan_whole(ctx, (params.current, params.reference), params.k_ratio, refuse)


def scan_whole(ctx: Ctx, aliases: tuple[str, str], ratio: float, refuse: Any) -> _Whole:
    """The global top ``⌊ratio·N⌋`` of ``ℓ_current − ℓ_reference`` (``aliases``) with memory independent
    of N (issue 16); ``refuse(n, nonzero)`` rejects all-zero scores. The one global statistic of a
    whole-pool top-k (Rho-1 with ``batch_size=0``, Token Cleaning's ``level=global``).

    Pass 1 writes each scored token's order key to a temporary file and histograms its top 16 bits; a
    radix select finds the k-th largest key in three more reads of that file; pass 2
    (:func:`_compute_whole`) keeps the keys above it and, of the keys equal to it, the earliest in
    (shard, row, position) order: the very tokens ``top_fraction`` over the concatenated scores keeps.
    """
    import tempfile

    hist, sizes, missing, nonzero = np.zeros(65536, np.int64), [], 0, 0
    spill = tempfile.TemporaryFile(prefix="winnow-excess-")
    for part in ctx.parts:
        _, _, flat, miss = shard_scores(ctx, part, *aliases)
        order = order_keys(flat)
        order.tofile(spill)
        hist += np.bincount((order >> np.uint64(48)).astype(np.int64), minlength=65536)
        sizes.append(len(order))
        missing, nonzero = missing + miss, nonzero + int((flat != 0).sum())
    n = sum(sizes)
    refuse(n, nonzero)
    k = io.floor_count(ratio, n)
    t, above = _kth_largest_key(spill, sizes, hist, k) if k else (None, 0)
    counts = {
        "samples": 0,
        "scored_tokens": n,
        "kept_tokens": k,
        "batches": 1,
        "supervised_without_signal": missing,
    }
    return _Whole(spill, _spilled(spill, sizes), t, k - above, counts, aliases)


def whole_keep(ctx: Ctx, part: int, state: _Whole) -> tuple:
    """Pass 2 of :func:`scan_whole` for one shard: (shard, scored mask, scores, kept) in row-major order."""
    shard, mask, flat, _ = shard_scores(ctx, part, *state.aliases)
    got = next(state.spilled)
    keep = np.zeros(len(got), bool)
    if state.t is not None:
        tie = got == np.uint64(state.t)
        keep = (got > np.uint64(state.t)) | (tie & (np.cumsum(tie) <= state.ties_left))
        state.ties_left -= int((tie & keep).sum())
    state.counts["samples"] += len(shard.n_tokens)
    return shard, mask, flat, keep


def _compute_whole(ctx: Ctx, part: int, state: _Whole) -> pa.Table:
    shard, mask, flat, keep = whole_keep(ctx, part, state)
    batch = np.where(mask.any(1), 0, -1)
    return shard_table(shard.sample_id, batch, mask, shard.n_tokens, flat, keep)


def _batch_cutoffs(spill, starts: np.ndarray, rows: np.ndarray, k_ratio: float) -> tuple[float, np.ndarray]:
    """One mini-batch's top-k as per-sample scalars: the smallest kept score ``t`` and, for each row, how
    many of its tokens scoring exactly ``t`` are kept (ties go to the earlier token in batch order, so
    within a row to the earlier position). Each row's scores are read back from the spill file."""
    import torch

    counts = (starts[rows + 1] - starts[rows]).astype(np.int64)
    chunks = [
        os.pread(spill.fileno(), int(8 * c), int(8 * starts[r])) for r, c in zip(rows, counts, strict=True)
    ]
    bmask = np.arange(int(counts.max()))[None, :] < counts[:, None]
    vals = np.zeros(bmask.shape, np.float64)
    vals[bmask] = np.frombuffer(b"".join(chunks), np.float64)  # row-major fill keeps each row in order
    keep = topk.top_fraction(torch.from_numpy(vals), torch.from_numpy(bmask), k_ratio).numpy()
    if not keep.any():
        return np.inf, np.zeros(len(rows), np.int32)
    t = float(vals[keep].min())
    return t, (keep & (vals == t)).sum(1).astype(np.int32)


def _keep_from_cutoffs(
    flat: np.ndarray, per_row: np.ndarray, cut: np.ndarray, ties: np.ndarray
) -> np.ndarray:
    """A shard's kept tokens (flat, row-major) from each row's cutoff and number of kept ties."""
    row = np.repeat(np.arange(len(per_row)), per_row)
    t = cut[row]
    tie = flat == t
    run_ties = np.cumsum(tie)
    before_row = np.concatenate([[0], run_ties])[np.cumsum(per_row) - per_row]
    rank = run_ties - np.repeat(before_row, per_row)  # 1-based rank of a tie within its row
    return (flat > t) | (tie & (rank <= ties[row]))


@dataclass
class _Batches:
    """Simulated mini-batches' top-k as per-sample scalars: each sample's batch, cutoff score and number
    of kept ties, its scored tokens, and where each shard's rows start; counts."""

    per: np.ndarray
    batch: np.ndarray
    cut: np.ndarray
    ties: np.ndarray
    row0: dict[int, int]
    counts: dict[str, int]


def _scan_batches(ctx: Ctx) -> _Batches | None:
    """The top-k of each simulated mini-batch with only per-sample scalars in memory (issue 16).

    Pass 1 spills every scored token's float64 excess loss to a temporary file in (shard, row,
    position) order. Each mini-batch reads its rows back (``pread``), and keeps of its top-k only the
    cutoff score and each row's number of kept ties (:func:`_batch_cutoffs`); pass 2
    (:func:`_compute_batches`) recomputes each shard's scores and applies the cutoffs. ``None`` when
    there is a single batch (the whole dataset).
    """
    import tempfile

    params = ctx.params
    with tempfile.TemporaryFile(prefix="winnow-excess-") as spill:
        per_sample, missing, nonzero = [], 0, 0
        for part in ctx.parts:
            _, mask, flat, miss = _shard_scores(ctx, part)
            np.asarray(flat, np.float64).tofile(spill)
            per_sample.append(mask.sum(1).astype(np.int64))
            missing, nonzero = missing + miss, nonzero + int((flat != 0).sum())
        spill.flush()
        per = np.concatenate(per_sample) if per_sample else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(per)])
        _refuse_zero(params, int(starts[-1]), nonzero)
        scored = np.flatnonzero(per > 0)
        batches = topk.minibatches(len(scored), params.batch_size, params.seed)
        if len(batches) == 1:
            return None
        batch = np.full(len(per), -1, np.int32)
        cut, ties = np.full(len(per), np.inf), np.zeros(len(per), np.int32)
        for b, sel in enumerate(batches):
            rows = scored[sel]
            cut[rows], ties[rows] = _batch_cutoffs(spill, starts, rows, params.k_ratio)
            batch[rows] = b
    row0 = dict(zip(ctx.parts, np.cumsum([0, *(len(x) for x in per_sample)])[:-1].tolist(), strict=True))
    counts = {
        "samples": int(len(per)),
        "scored_tokens": int(starts[-1]),
        "kept_tokens": 0,
        "batches": len(batches),
        "supervised_without_signal": missing,
    }
    return _Batches(per, batch, cut, ties, row0, counts)


def _compute_batches(ctx: Ctx, part: int, state: _Batches) -> pa.Table:
    shard, mask, flat, _ = _shard_scores(ctx, part)
    rows = slice(state.row0[part], state.row0[part] + mask.shape[0])
    keep = _keep_from_cutoffs(flat, state.per[rows], state.cut[rows], state.ties[rows])
    state.counts["kept_tokens"] += int(keep.sum())
    return shard_table(shard.sample_id, state.batch[rows], mask, shard.n_tokens, flat, keep)


def _scan(ctx: Ctx) -> _Whole | _Batches:
    """Simulated mini-batches when there are several, else one batch: the whole dataset."""
    n_samples = sum(r.rows for r in ctx.run.table(io.SAMPLES).records())
    batch_size = ctx.params.batch_size
    whole = batch_size <= 0 or batch_size >= n_samples  # one batch: the whole dataset
    return (None if whole else _scan_batches(ctx)) or _scan_whole(ctx)


def _compute(ctx: Ctx, part: int, state: _Whole | _Batches) -> pa.Table:
    if isinstance(state, _Whole):
        return _compute_whole(ctx, part, state)
    return _compute_batches(ctx, part, state)


def card_section(card: Any, spec: Any) -> list[str]:
    """The card's excess_loss section: the per-sample mean excess loss."""
    return per_sample_section(card, NAME, "mean_excess")


STAGE = Stage(
    name=NAME,
    help="Rho-1 excess loss: current-model loss minus reference-model loss, top-k% across the batch",
    params=ExcessLossParams,
    code_version=CODE_VERSION,
    reads=(
        "samples",
        Ref("signals/{current}", columns=("logprob",)),
        Ref("signals/{reference}", columns=("logprob",)),
    ),
    columns=("token_keep", "mean_excess"),
    check=_check_models,
    scan=_scan,
    compute=_compute,
    counts=lambda state: state.counts,
    card=card_section,
)
STEP = STAGE  # the runnable step (``STEP.run(run, params)``) is the stage itself
