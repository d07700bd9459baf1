"""DV4LLM's Sinkhorn split over 2 gloo ranks (issue 29 item 3): the same potentials as one process.

One spawned group (tests/support/dist_sinkhorn_worker.py) solves every case of ``CASES`` with the
candidates split in two contiguous halves; here each is solved again in one process. The only
difference is the order of float sums (the per-target log-sums are reduced across ranks, the mean cost
too), so: float64 potentials agree to 1e-9 (measured ≤ 7e-15), float32 to 1e-4 of ε (measured ≤ 5e-6 of ε).
The selected half agrees except for candidates whose calibrated gradient lies within 10x that
difference of the cut (counted, at most 1% of them). The 2-rank float64 potentials also match POT's
``sinkhorn_log`` (the OT reference), centred, to 1e-6 of ε. Candidates read from an .npy by ``NpyRows``
(the stage's path) give bit for bit the potentials of the same rows held in RAM, at 2 ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from dist_sinkhorn_worker import CASES, problem, worker

from winnow.kernels.sinkhorn import calibrated_gradient, sinkhorn_potentials
from winnow.stages.dv4llm_embeddings import NpyRows, write_rows


def _cost(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def _centred(v: np.ndarray) -> np.ndarray:
    return v - v.mean()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(11)
    emb = np.concatenate([rng.normal(size=(6, 8)) + 0.5, rng.normal(size=(301, 8)) * 1.2]).astype(np.float32)
    np.save(tmp / "emb.npy", emb)
    mp.spawn(
        worker, args=(2, str(tmp / "init"), str(tmp / "out.npz"), str(tmp / "emb.npy")), nprocs=2, join=True
    )
    with np.load(tmp / "out.npz") as z:
        return {k: z[k] for k in z.files}, emb


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_give_one_process_potentials(two_ranks, case):
    got, _ = two_ranks
    name, n, big_n, d, seed, kw = case
    x, y = problem(n, big_n, d, seed)
    ref = sinkhorn_potentials(x, y, seed=seed, num_threads=1, **kw)
    f64 = kw.get("dtype") == torch.float64
    tol = 1e-9 if f64 else 1e-4 * ref.eps
    g_ref, f_ref = ref.g.double().numpy(), ref.f.double().numpy()
    assert np.abs(g_ref).max() > 0.1  # never compared on zeros
    np.testing.assert_allclose(got[f"{name}/g"], g_ref, rtol=0, atol=tol)
    np.testing.assert_allclose(got[f"{name}/f"], f_ref, rtol=0, atol=tol)
    assert got[f"{name}/iterations"][1] == ref.converged
    # the selected half: equal but for candidates within 10x the potentials' difference of the cut
    grad, grad_ref = (calibrated_gradient(torch.from_numpy(v)).numpy() for v in (got[f"{name}/g"], g_ref))
    k = big_n // 2
    sel, sel_ref = set(np.argsort(grad, kind="stable")[:k]), set(np.argsort(grad_ref, kind="stable")[:k])
    cut = np.sort(grad_ref)[k - 1 : k + 1].mean()
    near = np.abs(grad_ref - cut) <= 10 * max(np.abs(grad - grad_ref).max(), 1e-300)
    assert sel ^ sel_ref <= set(np.flatnonzero(near))
    assert near.sum() <= max(2, big_n // 100), f"{near.sum()} candidates within the tolerance of the cut"


def test_two_ranks_match_pot(two_ranks):
    ot = pytest.importorskip("ot", reason="POT (the OT reference) is not installed")
    got, _ = two_ranks
    name, n, big_n, d, seed, kw = CASES[1]
    x, y = problem(n, big_n, d, seed)
    eps = sinkhorn_potentials(x, y, seed=seed, num_threads=1, **kw).eps
    _, log = ot.sinkhorn(
        np.full(n, 1 / n), np.full(big_n, 1 / big_n), _cost(x, y), eps,
        method="sinkhorn_log", log=True, stopThr=1e-13, numItermax=100_000,
    )  # fmt: skip
    # POT's (u, v) scalings: f = ε log u + const, g = ε log v − const; compare centred
    np.testing.assert_allclose(
        _centred(got[f"{name}/g"]), _centred(eps * log["log_v"]), rtol=0, atol=1e-6 * eps
    )
    np.testing.assert_allclose(
        _centred(got[f"{name}/f"]), _centred(eps * log["log_u"]), rtol=0, atol=1e-6 * eps
    )


def test_rows_read_from_the_file_equal_rows_in_ram(two_ranks):
    got, emb = two_ranks
    np.testing.assert_array_equal(got["npy/g"], got["npy/ram_g"])  # 2 ranks: file vs RAM, bit for bit
    # against a float64 reference with the same stopping rule (the same passes): float32 rounding only
    ref = sinkhorn_potentials(emb[:6].astype(np.float64), emb[6:].astype(np.float64), dtype=torch.float64)
    assert np.abs(ref.g.numpy()).max() > 0.1
    np.testing.assert_allclose(got["npy/g"], ref.g.numpy(), rtol=0, atol=1e-4 * ref.eps)


@pytest.mark.parametrize("shape", [(1, 3), (57, 8), (300, 17)])
def test_npy_rows_read_what_numpy_wrote(tmp_path, shape):
    rng = np.random.default_rng(shape[0])
    a = rng.normal(size=shape).astype(np.float32) + 2.0
    np.save(tmp_path / "a.npy", np.zeros_like(a))
    write_rows(tmp_path / "a.npy", 0, a[: shape[0] // 2])
    write_rows(tmp_path / "a.npy", shape[0] // 2, a[shape[0] // 2 :])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)  # pwrite into a numpy file
    lo = shape[0] // 3
    rows = NpyRows(tmp_path / "a.npy", lo, shape[0])
    try:
        assert rows.shape == (shape[0] - lo, shape[1]) and rows.ndim == 2
        np.testing.assert_array_equal(rows[:], a[lo:])
        np.testing.assert_array_equal(rows[1:4], a[lo + 1 : lo + 4])
        idx = np.array([0, rows.shape[0] - 1])
        np.testing.assert_array_equal(rows[idx], a[lo + idx])
    finally:
        rows.close()


@pytest.mark.parametrize("n,big_n,d", [(3, 40, 2), (20, 500, 12)])
def test_solve_from_npy_rows_equals_in_ram(tmp_path, n, big_n, d):
    x, y = problem(n, big_n, d, seed=d)
    np.save(tmp_path / "y.npy", y.astype(np.float32))
    rows = NpyRows(tmp_path / "y.npy")
    try:
        a = sinkhorn_potentials(x, rows, chunk_size=16, warm_start=big_n // 4)
    finally:
        rows.close()
    b = sinkhorn_potentials(x, np.load(tmp_path / "y.npy"), chunk_size=16, warm_start=big_n // 4)
    np.testing.assert_array_equal(a.g.numpy(), b.g.numpy())
    ref = sinkhorn_potentials(x, y, dtype=torch.float64, chunk_size=16, warm_start=big_n // 4)
    assert np.abs(ref.g.numpy()).max() > 0.1
    np.testing.assert_allclose(a.g.double().numpy(), ref.g.numpy(), rtol=0, atol=1e-4 * ref.eps)


def test_collectives(two_ranks):
    got, _ = two_ranks
    np.testing.assert_array_equal(got["gather"], np.concatenate([np.arange(3), np.arange(7) * 2]))
    np.testing.assert_array_equal(got["bcast0"], np.arange(12, dtype=np.float32).reshape(3, 4) * 1.5)
    assert got["bcast0"].dtype == np.float32 and got["bcast1"].tolist() == [[True, False]]
    np.testing.assert_array_equal(got["bcast2"], np.arange(5) - 2)
    assert got["strings"].tolist() == ["naïve", "x", "数学"]
    assert got["max"].tolist() == [1.0, 0.0]
