"""The streamed whole-dataset top-k of excess_loss (issue 16) keeps exactly the tokens an in-memory
stable sort of every score keeps: random runs with many ties (scores on a coarse grid, ±0.0 among
them) spread over several shards, against numpy's stable argsort of the concatenated scores."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from winnow.core.store import RunDir
from winnow.stages import excess_loss as ex
from winnow.stages import stage_io as io

from stage_fixtures import write_signals, write_synthetic_samples


def _run(root, rng, grid: float) -> tuple[RunDir, list]:
    run = RunDir(root, create=True)
    order = []  # (sample_id, mask, excess) in (shard, row) order
    for part in range(4):
        rows, cur, ref = [], [], []
        for i in range(int(rng.integers(3, 30))):
            n = int(rng.integers(2, 40))
            mask = [0] + [int(x) for x in rng.random(n - 1) < 0.7]
            rows.append({"sample_id": f"p{part}-{i}", "input_ids": list(range(n)), "loss_mask": mask})
            c = [None] + [float(-np.round(rng.gamma(1.0) / grid) * grid) for _ in range(n - 1)]
            r = [None] + [float(-np.round(rng.gamma(1.0) / grid) * grid) for _ in range(n - 1)]
            if n > 3:
                c[2], r[2] = 0.0, -0.0  # excess = -0.0 - 0.0 = -0.0: must tie with +0.0
            cur.append(c)
            ref.append(r)
            exc = [(-np.float32(a)) - (-np.float32(b)) if m and a is not None else None
                   for a, b, m in zip(c, r, mask, strict=True)]  # fmt: skip
            order.append((rows[-1]["sample_id"], exc))
        ids = write_synthetic_samples(run, part, rows)
        write_signals(run, "current", part, ids, {"logprob": cur}, model_fingerprint="cur")
        write_signals(run, "reference", part, ids, {"logprob": ref}, model_fingerprint="ref")
    return run, order


@pytest.mark.parametrize(
    "seed,grid,k_ratio", [(0, 0.25, 0.6), (1, 0.5, 0.33), (2, 1e-3, 0.9), (3, 1.0, 0.05)]
)
def test_streamed_top_k_equals_in_memory_stable_sort(tmp_path, seed, grid, k_ratio):
    run, order = _run(tmp_path / "run", np.random.default_rng(seed), grid)
    ex.STEP.run(run, ex.ExcessLossParams(k_ratio=k_ratio, batch_size=0))
    flat = np.array([float(v) for _, exc in order for v in exc if v is not None], np.float64)
    k = io.floor_count(k_ratio, len(flat))
    ranked = np.argsort(-(flat + 0.0), kind="stable")  # descending; ties keep (shard, row, position) order
    want = np.zeros(len(flat), bool)
    want[ranked[:k]] = True
    got = pq.read_table(run.table("scores/excess_loss").paths()).to_pydict()
    by_id = dict(zip(got["sample_id"], got["token_keep"], strict=True))
    got_flat = [by_id[sid][i] for sid, exc in order for i, v in enumerate(exc) if v is not None]
    assert len(np.unique(flat)) < len(flat) / 2 or grid < 0.01  # ties are the point on coarse grids
    np.testing.assert_array_equal(np.array(got_flat, bool), want)
    assert sum(got["n_token_keep"]) == k


def test_order_keys_sort_like_the_floats():
    rng = np.random.default_rng(5)
    for x in (
        rng.normal(0, 1e3, 5000),
        np.array([-np.inf, -1e308, -1.0, -5e-324, -0.0, 0.0, 5e-324, 1.0, 1e308, np.inf]),
        np.round(rng.normal(0, 2, 3000)) * rng.choice([1.0, -1.0], 3000),
    ):
        keys = ex.order_keys(x)
        np.testing.assert_array_equal(np.argsort(keys, kind="stable"), np.argsort(x + 0.0, kind="stable"))
    assert ex.order_keys(np.array([-0.0]))[0] == ex.order_keys(np.array([0.0]))[0]


@pytest.mark.parametrize(
    "seed,grid,k_ratio,batch_size", [(4, 0.25, 0.6, 8), (5, 0.5, 0.33, 3), (6, 1e-3, 0.9, 5)]
)
def test_streamed_minibatches_equal_in_memory_batches(tmp_path, seed, grid, k_ratio, batch_size):
    """The default path (simulated mini-batches drawn across shards, only per-sample cutoffs held) keeps
    what a stable sort of each batch's concatenated scores keeps (rows in batch order, then position)."""
    run, order = _run(tmp_path / "run", np.random.default_rng(seed), grid)
    ex.STEP.run(run, ex.ExcessLossParams(k_ratio=k_ratio, batch_size=batch_size, seed=seed))
    scores = [np.array([float(v) for v in exc if v is not None], np.float64) for _, exc in order]
    scored = [i for i, s in enumerate(scores) if len(s)]
    want_keep = [np.zeros(len(s), bool) for s in scores]
    want_batch = np.full(len(order), -1)
    perm = np.random.default_rng(seed).permutation(len(scored))  # the trainer's mini-batch definition
    n_batches = 0
    for b, i in enumerate(range(0, len(scored), batch_size)):
        rows = [scored[j] for j in perm[i : i + batch_size]]
        cat = np.concatenate([scores[r] for r in rows]) + 0.0
        top = np.argsort(-cat, kind="stable")[: io.floor_count(k_ratio, len(cat))]
        keep = np.zeros(len(cat), bool)
        keep[top] = True
        for r, part in zip(rows, np.split(keep, np.cumsum([len(scores[r]) for r in rows])[:-1]), strict=True):
            want_keep[r], want_batch[r] = part, b
        n_batches += 1
    assert n_batches > 2
    got = pq.read_table(run.table("scores/excess_loss").paths()).to_pydict()
    by_id = {sid: (b, k) for sid, b, k in zip(got["sample_id"], got["batch"], got["token_keep"], strict=True)}
    for (sid, exc), keep, b in zip(order, want_keep, want_batch, strict=True):
        got_b, got_k = by_id[sid]
        assert got_b == b, sid
        np.testing.assert_array_equal(
            np.array([got_k[i] for i, v in enumerate(exc) if v is not None], bool), keep
        )


def test_two_ranks_keep_the_tokens_one_process_keeps(tmp_path):
    """Under torchrun (2 gloo ranks) the radix select's histograms and each shard's ties are summed
    across ranks and the simulated batches read the other rank's spill (issue 29): the same tables, with
    the ties of a coarse grid split across both ranks' shards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "WINNOW_PROGRESS": "0"}
    for batch_size in (0, 4):
        one, _ = _run(tmp_path / f"one{batch_size}", np.random.default_rng(5), 0.25)
        two, _ = _run(tmp_path / f"two{batch_size}", np.random.default_rng(5), 0.25)
        ex.STEP.run(one, ex.ExcessLossParams(k_ratio=0.4, batch_size=batch_size))
        cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", "--"]
        cmd += [str(bin_dir / "winnow"), "score", str(two.root), "excess_loss"]
        cmd += ["--set", "k_ratio=0.4", "--set", f"batch_size={batch_size}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for part in range(4):
            a = pq.read_table(one.table("scores/excess_loss").part_path(part))
            b = pq.read_table(two.table("scores/excess_loss").part_path(part))
            assert a.equals(b), (batch_size, part)
        entry = two.manifest()["steps"]["stage:excess_loss"]
        assert entry["shards"]["by_rank"] == [2, 2]
        assert entry["counts"] == one.manifest()["steps"]["stage:excess_loss"]["counts"]
        assert not (two.root / ex.SPILL_DIR).exists()
