"""Parquet adapter helpers of the scoring stages: list <-> padded round trips with nulls, alignment of
signals to samples by sample_id, input checks that name the command to run, selection helpers against
brute-force references, simulated batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.pipeline.store import RunDir, UserError
from winnow.stages import stage_io as io

from stage_fixtures import decimal_count, write_signals, write_synthetic_samples

FAST = settings(max_examples=40, deadline=None)

lists = st.lists(
    st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(-1e3, 1e3, width=32)), max_size=7)),
    min_size=1,
    max_size=6,
)


@FAST
@given(lists)
def test_padded_to_list_round_trip_keeps_nulls_and_lengths(rows):
    arr = pa.array(rows, type=pa.list_(pa.float32()))
    n_tokens = np.array([len(r) if r is not None else 0 for r in rows], dtype=np.int64)
    pad = io.padded(arr, n_tokens)
    assert pad.shape == (len(rows), int(n_tokens.max()))
    back = io.to_list_array(pad, ~np.isnan(pad), n_tokens, pa.float32())
    # a null list comes back as an empty list of the same (zero) length; values and nulls are exact
    assert back.to_pylist() == [r if r is not None else [] for r in rows]


def test_padded_respects_slices():
    arr = pa.array([[1.0], [2.0, None], [3.0, 4.0, 5.0]], type=pa.list_(pa.float32())).slice(1)
    pad = io.padded(arr, np.array([2, 3]))
    assert np.array_equal(pad[0, :2], [2.0, np.nan], equal_nan=True)
    assert pad[1].tolist() == [3.0, 4.0, 5.0]


def test_counts_are_robust_to_round_off():
    assert io.floor_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert io.ceil_count(0.6, 5) == 3
    assert io.ceil_count(0.7, 10) == 7
    assert io.round_count(0.25, 10) == 3  # half up, not half to even
    assert io.round_count(0.5, 5) == 3
    assert io.round_count(0.4, 5) == 2


def _brute_lowest_k(score, mask, k):
    out = np.zeros_like(mask)
    for b in range(score.shape[0]):
        pos = [i for i in range(score.shape[1]) if mask[b, i]]
        pos.sort(key=lambda i: (score[b, i], i))  # ties: earlier position
        out[b, pos[: k[b]]] = True
    return out


@FAST
@given(st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_lowest_and_highest_k_match_brute_force_with_ties(b, t, seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 3, size=(b, t)).astype(np.float64)  # many ties on purpose
    mask = rng.random((b, t)) < 0.7
    k = rng.integers(0, t + 1, size=b).clip(max=mask.sum(1))
    got = io.lowest_k_per_row(torch.from_numpy(score), torch.from_numpy(mask), torch.from_numpy(k)).numpy()
    assert np.array_equal(got, _brute_lowest_k(score, mask, k))
    got_hi = io.highest_k_per_row(
        torch.from_numpy(score), torch.from_numpy(mask), torch.from_numpy(k)
    ).numpy()
    assert np.array_equal(got_hi, _brute_lowest_k(-score, mask, k))


@FAST
@given(st.integers(1, 5), st.integers(1, 9), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_top_fraction_matches_brute_force(b, t, ratio, seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(-2, 3, size=(b, t)).astype(np.float64)
    mask = rng.random((b, t)) < 0.6
    got = io.top_fraction(torch.from_numpy(score), torch.from_numpy(mask), ratio).numpy()
    flat = [(i, j) for i in range(b) for j in range(t) if mask[i, j]]
    flat.sort(key=lambda ij: (-score[ij], ij))  # highest first, ties: earlier in row-major order
    want = np.zeros_like(mask)
    for ij in flat[: decimal_count(ratio, len(flat), "ROUND_FLOOR")]:
        want[ij] = True
    assert np.array_equal(got, want)


@FAST
@given(st.integers(0, 50), st.integers(0, 12), st.integers(0, 5))
def test_simulated_batches_partition_the_samples(n, size, seed):
    batches = io.simulated_batches(n, size, seed)
    flat = np.concatenate(batches) if batches else np.zeros(0, int)
    assert sorted(flat.tolist()) == list(range(n))
    if 0 < size < n:
        assert all(len(b) == size for b in batches[:-1]) and 0 < len(batches[-1]) <= size
    assert [b.tolist() for b in io.simulated_batches(n, size, seed)] == [b.tolist() for b in batches]


# ---- reading shards ---------------------------------------------------------------------------------
def _run(tmp_path) -> tuple[RunDir, list[str]]:
    run = RunDir(tmp_path / "run", create=True)
    ids = write_synthetic_samples(
        run,
        0,
        [
            {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
            {"input_ids": [4, 5], "loss_mask": [0, 1]},
        ],
    )
    return run, ids


def test_read_shard_aligns_signals_by_sample_id(tmp_path):
    run, ids = _run(tmp_path)
    # written in reverse order on purpose
    write_signals(run, "current", 0, ids[::-1], {"logprob": [[None, -0.5], [None, None, -2.0]]})
    shard = io.read_shard(run, 0, {"current": ["logprob"]})
    got = shard.signals[("current", "logprob")]
    assert np.array_equal(got, [[np.nan, np.nan, -2.0], [np.nan, -0.5, np.nan]], equal_nan=True)
    assert shard.loss_mask.tolist() == [[False, True, True], [False, True, False]]
    assert shard.valid(("current", "logprob")).tolist() == [[False, False, True], [False, True, False]]
    assert shard.supervised_without_signal(("current", "logprob")) == 1


def test_read_shard_rejects_other_tokenization(tmp_path):
    run, ids = _run(tmp_path)
    write_signals(run, "current", 0, ids, {"logprob": [[None, -1.0], [None, -0.5]]})
    with pytest.raises(UserError, match="another tokenization"):
        io.read_shard(run, 0, {"current": ["logprob"]})


def test_read_shard_rejects_missing_samples(tmp_path):
    run, ids = _run(tmp_path)
    write_signals(run, "current", 0, ids[:1], {"logprob": [[None, -1.0, -1.0]]})
    with pytest.raises(UserError, match="lacks 1 samples"):
        io.read_shard(run, 0, {"current": ["logprob"]})


def test_require_signals_names_the_command(tmp_path):
    run, ids = _run(tmp_path)
    with pytest.raises(UserError, match=r"--alias reference --signals entropy,logprob"):
        io.require_signals(run, "reference", ["logprob", "entropy"], [0])
    write_signals(run, "reference", 0, ids, {"logprob": [[None, -1.0, -1.0], [None, -1.0]]})
    with pytest.raises(UserError, match=r"no column\(s\) \['entropy'\]"):
        io.require_signals(run, "reference", ["logprob", "entropy"], [0])
    write_synthetic_samples(run, 1, [{"input_ids": [1, 2], "loss_mask": [0, 1]}])
    with pytest.raises(UserError, match="lacks 1 of the 2 samples shards"):
        io.require_signals(run, "reference", ["logprob"], [0, 1])


def test_freshness_helpers(tmp_path):
    run, ids = _run(tmp_path)
    write_signals(run, "current", 0, ids, {"logprob": [[None, -1.0, -1.0], [None, -1.0]]})
    out = run.table("scores/x")
    inputs = io.part_inputs(run, ["samples", "signals/current"], 0)
    assert set(inputs) == {"samples/part-00000", "signals/current/part-00000"}
    from winnow.pipeline.shards import ShardLoop

    ShardLoop([out], "fp1", 1).commit(0, pa.table({"sample_id": ids, "reason": ["a", "b"]}), inputs=inputs)
    assert io.is_fresh(out, 0, "fp1", inputs)
    assert not io.is_fresh(out, 0, "fp2", inputs)
    write_signals(run, "current", 0, ids, {"logprob": [[None, -2.0, -1.0], [None, -1.0]]})
    assert not io.is_fresh(out, 0, "fp1", io.part_inputs(run, ["samples", "signals/current"], 0))
    assert io.reason_counts(out) == {"a": 1, "b": 1}
    io.drop_orphans(out, [1])
    assert not out.exists()


def test_stale_signals_are_refused(tmp_path):
    run, ids = _run(tmp_path)
    write_signals(run, "current", 0, ids, {"logprob": [[None, -1.0, -1.0], [None, -1.0]]})
    write_synthetic_samples(run, 0, [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 0]}])  # re-ingested
    with pytest.raises(UserError, match="is stale"):
        io.require_signals(run, "current", ["logprob"], [0])


def test_every_stage_runs_from_a_recipe(tmp_path):
    from winnow.pipeline.recipe import run_recipe

    run = RunDir(tmp_path / "run", create=True)
    rows = [
        {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "meta_ok": True},
        {"input_ids": [4, 5], "loss_mask": [0, 1], "meta_ok": False},
    ]
    ids = write_synthetic_samples(run, 0, rows)
    lp = {"logprob": [[None, -1.0, -0.5], [None, -2.0]]}
    full = {
        **lp,
        "entropy": [[None, 1.0, 2.0], [None, 0.5]],
        "attn_importance": [[None, 0.2, 0.4], [None, 0.3]],
    }
    write_signals(run, "current", 0, ids, full, model_fingerprint="warm")
    write_signals(
        run, "reference", 0, ids, {"logprob": [[None, -0.5, -0.5], [None, -1.0]]}, model_fingerprint="ref"
    )
    base = {"logprob": [[None, -1.5, -0.25], [None, -2.5]]}  # the history model: other likelihoods
    write_signals(run, "base", 0, ids, base, model_fingerprint="base")
    write_signals(run, "contrast", 0, ids, {"p_ce": [[None, 0.5, 0.25], [None, 0.75]]})
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[steps]]\nstep = "eu_plane"\nr_sample = 0.5\nneighbour_fill = "omit"\n\n'
        '[[steps]]\nstep = "excess_loss"\nk_ratio = 0.5\nbatch_size = 1\n\n'
        '[[steps]]\nstep = "sstoken"\nhistory = "base"\nrho = 0.5\n\n'
        '[[steps]]\nstep = "critical_tokens"\nlabel = "meta_ok"\n'
    )
    results = run_recipe(recipe, str(run.root))
    assert set(results) == {"stage:eu_plane", "stage:excess_loss", "stage:sstoken", "stage:critical_tokens"}
    assert all(r["shards"]["computed"] == 1 for r in results.values())
    assert run.stale_tables() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_online_functions_give_the_same_selection_on_cuda():
    from winnow.stages.critical_tokens import critical_token_scores
    from winnow.stages.eu_plane import eu_plane_select
    from winnow.stages.excess_loss import excess_loss_select
    from winnow.stages.sstoken import sstoken_select

    rng = np.random.default_rng(5)
    a, b, c = (torch.from_numpy(rng.uniform(0.01, 4, size=(16, 64))) for _ in range(3))
    mask = torch.from_numpy(rng.random((16, 64)) < 0.7)
    labels = torch.from_numpy(rng.random(16) < 0.5)
    runs = {
        "eu": lambda d: eu_plane_select(a.to(d), b.to(d), mask.to(d), 0.25, 0.5),
        "rho": lambda d: excess_loss_select(a.to(d), b.to(d), mask.to(d), 0.6),
        "ss": lambda d: sstoken_select(a.to(d), b.to(d), c.to(d) / 4, mask.to(d)),
        "cdpo": lambda d: critical_token_scores(c.to(d) / 4, mask.to(d), labels.to(d)),
    }
    for name, fn in runs.items():
        for x, y in zip(fn("cpu"), fn("cuda"), strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.allclose(x, y.cpu(), rtol=1e-6, equal_nan=True), name
            else:
                assert x == pytest.approx(y), name
