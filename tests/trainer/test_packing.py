"""Packing invariants over whole epochs, checked against the raw (untrimmed) samples.

Ground truth: the set of (sample, position, token, weight) with weight != 0 and position >= 1, read off
the inputs directly. Every epoch, the micro-batches of all ranks and steps must gather each of them
exactly once, with the token and weight at that position, from the hidden state just before it in the
same sample (no target across a sample boundary), with positions restarting at 0 per sample.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from winnow.trainer.packing import best_fit_decreasing, layout_batch, plan, prepare, step_batches, trim

from trainer_fixtures import weighted_samples


def _truth(ids, ws):
    return Counter(
        (k, i, int(x[i]), float(w[i]))
        for k, (x, w) in enumerate(zip(ids, ws, strict=True))
        for i in range(1, len(x))
        if w[i] != 0
    )


def _seen(prep, orig_index, batch_samples, layout):
    """(sample, position, token, weight) of every gathered entry of one micro-batch, from its arrays."""
    b = layout_batch([prep.ids[k] for k in batch_samples], [prep.weights[k] for k in batch_samples], layout)
    width = b.input_ids.shape[1]
    if layout == "packed":
        starts = b.cu_seqlens[:-1].astype(np.int64)
        assert (b.position_ids[0] == np.arange(width) - np.repeat(starts, np.diff(b.cu_seqlens))).all()
        row_of = np.searchsorted(b.cu_seqlens, b.gather, side="right") - 1
        col = b.gather - starts[row_of]
    else:
        row_of, col = np.divmod(b.gather, width)
        assert (b.position_ids == np.arange(width)).all()
    out = []
    flat = b.input_ids.reshape(-1)
    for g, r, c, t, w in zip(b.gather, row_of, col, b.targets, b.weights, strict=True):
        k = batch_samples[r]
        assert c + 1 < len(prep.ids[k])  # the target is inside the same sample
        assert flat[g] == prep.ids[k][c]  # the gathered hidden state is the token just before the target
        assert t == prep.ids[k][c + 1] and w == prep.weights[k][c + 1]
        out.append((orig_index[k], int(c + 1), int(t), float(w)))
    return out


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("world, accum", [(1, 1), (2, 3), (3, 2)])
def test_every_weighted_target_once_per_epoch(layout, world, accum):
    ids, ws = weighted_samples(90, seed=7, hi=70)
    ids.append(np.arange(3, 203))  # longer than max_seq_len: skipped, counted
    ws.append(np.ones(200, np.float32))
    prep = prepare(ids, ws, [str(i) for i in range(len(ids))], max_seq_len=128)
    n_zero = sum(not w[1:].any() for w in ws[:-1])
    assert n_zero > 5 and prep.skipped == {"zero_weight": n_zero, "longer_than_max_seq_len": 1}
    orig = [int(s) for s in prep.sample_ids]
    truth = _truth(ids[:-1], ws[:-1])
    batches = plan(prep.lengths, 160, layout)
    n_steps = -(-len(batches) // (world * accum))
    orders = []
    for epoch in range(2):
        seen, n_multi = Counter(), 0
        for s in range(epoch * n_steps, (epoch + 1) * n_steps):
            for rank in range(world):
                for b in step_batches(s, len(batches), seed=11, world=world, rank=rank, grad_accum=accum):
                    if b is not None:
                        seen.update(_seen(prep, orig, batches[b], layout))
                        n_multi += len(batches[b]) > 1
                        orders.append(b)
        assert seen == truth
        assert len(truth) > 500 and n_multi > 5  # non-vacuous: many targets, shared batches
    assert orders[: len(batches)] != orders[len(batches) :]  # reshuffled per epoch


def test_trim_and_best_fit_decreasing():
    x, w = trim(np.arange(10), np.array([5, 0, 1, 0, 2, 0, 0, 0, 0, 0], np.float32))
    assert x.tolist() == [0, 1, 2, 3, 4] and w.tolist() == [0, 0, 1, 0, 2]  # weight at 0 never counts
    assert trim(np.arange(4), np.array([1, 0, 0, 0], np.float32)) is None
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert [sum(lengths[i] for i in b) for b in bins] == [10, 10, 10]  # 30 tokens, 3 full bins
