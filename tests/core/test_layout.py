"""Batching invariants: every sample exactly once, <=10% padding, budget kept, positions restart per sample."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.core.layout import (
    MAX_PAD_FRAC,
    collate,
    padding_fraction,
    plan_batches,
    plan_packed,
    plan_padded,
)


def _lognormal(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(180), 0.9, n)), 16, 1024).astype(int)


@given(
    lengths=st.lists(st.integers(1, 700), min_size=1, max_size=120),
    budget=st.integers(16, 4096),
)
@settings(max_examples=150, deadline=None)
def test_padded_plan_invariants(lengths, budget):
    plans = plan_padded(lengths, budget)
    seen = sorted(s for p in plans for s in p.samples)
    assert seen == list(range(len(lengths)))  # every sample exactly once
    for p in plans:
        assert all(len(row) == 1 for row in p.rows)  # one sample per row
        assert p.width == max(lengths[s] for s in p.samples)
        assert p.real_tokens == sum(lengths[s] for s in p.samples)
        assert p.computed_tokens - p.real_tokens <= MAX_PAD_FRAC * p.computed_tokens + 1e-9
        if len(p.rows) > 1:
            assert p.computed_tokens <= budget


def test_padded_plan_is_not_vacuous_on_skewed_lengths():
    lens = _lognormal(500)
    plans = plan_padded(lens, 8192)
    multi = [p for p in plans if len(p.rows) > 1]
    assert len(multi) >= 10 and max(len(p.rows) for p in plans) >= 20  # real batching happened
    assert padding_fraction(plans) <= MAX_PAD_FRAC
    assert plans == plan_padded(lens, 8192)  # deterministic
    assert plans[0].width == lens.max()  # longest first


@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=80), budget=st.integers(16, 2048))
@settings(max_examples=100, deadline=None)
def test_packed_plan_invariants(lengths, budget):
    plans = plan_packed(lengths, budget)
    assert sorted(s for p in plans for s in p.samples) == list(range(len(lengths)))  # once each
    assert all(sum(lengths[s] for s in p.samples) == p.real_tokens for p in plans)
    for p in plans:
        assert len(p.rows) == 1 and p.width == p.real_tokens  # no padding at all
        assert p.width <= budget or len(p.samples) == 1


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_collate_places_samples_and_restarts_positions(layout):
    rng = np.random.default_rng(1)
    lens = [5, 17, 3, 9, 12, 1, 30]
    seqs = [rng.integers(1, 100, n) for n in lens]
    checked = 0
    for plan in plan_batches(lens, 40, layout):
        col = collate(plan, seqs, layout, pad_id=0)
        ids, pos, seg = col.input_ids.numpy(), col.position_ids.numpy(), col.segment.numpy()
        flat_ids, flat_pos, flat_seg = ids.reshape(-1), pos.reshape(-1), seg.reshape(-1)
        covered = np.zeros(flat_ids.size, bool)
        for k, s in enumerate(col.samples):
            a, n = col.starts[k], col.lengths[k]
            assert n == lens[s]
            np.testing.assert_array_equal(flat_ids[a : a + n], seqs[s])
            np.testing.assert_array_equal(flat_pos[a : a + n], np.arange(n))  # restart at 0 per sample
            assert (flat_seg[a : a + n] == k).all()
            assert a // plan.width == (a + n - 1) // plan.width  # a sample never spans two rows
            covered[a : a + n] = True
            checked += 1
        assert (flat_seg[~covered] == -1).all()  # everything else is padding
        if layout == "padded":  # right padding only: a row is [sample, pad...]
            for r in range(ids.shape[0]):
                n = int((seg[r] >= 0).sum())
                assert (seg[r, :n] >= 0).all() and (seg[r, n:] == -1).all()
                np.testing.assert_array_equal(pos[r], np.arange(plan.width))  # = the model's own default
    assert checked == len(lens)


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match="layout"):
        plan_batches([3, 4], 100, "ragged")
