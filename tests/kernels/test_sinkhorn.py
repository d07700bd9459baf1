"""The chunked log-domain Sinkhorn solver (kernels/sinkhorn.py) against POT and against itself.

Reference: POT ``ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", log=True)`` in float64, whose dual
potentials are ``reg·log_u`` and ``reg·log_v``. Potentials are defined up to ``f + c, g − c`` (and our
plan carries the ``a_i b_j`` factor POT folds into the scalings), so they are compared after centring.
Tolerances are relative to the mean cost (the scale of the potentials):
  float64 vs POT, both solved to a marginal error of 1e-11 .. 1e-12:   1e-8
  float32 (tol 1e-5) vs float64:                                       3e-4
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("CI", "").lower() == "true":
    import ot  # POT is a dev dependency CI installs: missing there means a broken environment, not a skip
else:  # the GPU machine (benchmarks/gpu_check.sh collects tests/kernels there) has no POT
    ot = pytest.importorskip("ot", reason="POT is not installed (pip install POT): the GPU machine lacks it")
import torch
from scipy.stats import spearmanr

from winnow.kernels.sinkhorn import (
    calibrated_gradient,
    mean_cost,
    ot_select,
    sinkhorn_potentials,
)

# (n targets, N candidates, dim, eps_rel)
CASES = [(50, 80, 5, 0.05), (200, 120, 16, 0.1), (30, 300, 3, 0.02), (64, 40, 32, 0.2)]


def _clouds(n: int, N: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # shifted and scaled apart, away from the origin, so centring and the cost scale both matter
    return rng.normal(size=(n, d)) + 3.0, rng.normal(size=(N, d)) * 1.3 + 3.4


def _cost(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def _pot_potentials(x: np.ndarray, y: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray]:
    n, N = len(x), len(y)
    _, log = ot.sinkhorn(
        np.full(n, 1 / n), np.full(N, 1 / N), _cost(x, y), reg,
        method="sinkhorn_log", log=True, stopThr=1e-12, numItermax=100_000,
    )  # fmt: skip
    return reg * log["log_u"], reg * log["log_v"]


def _centred(v: np.ndarray | torch.Tensor) -> np.ndarray:
    v = v.double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    return v - v.mean()


def _plan(x: np.ndarray, y: np.ndarray, res) -> np.ndarray:
    f, g = res.f.double().numpy(), res.g.double().numpy()
    n, N = len(x), len(y)
    return np.exp((f[:, None] + g[None, :] - _cost(x, y)) / res.eps) / (n * N)


@pytest.mark.parametrize("n,N,d,eps_rel", CASES)
@pytest.mark.parametrize("omega", [1.0, "auto"])
def test_potentials_match_pot(n: int, N: int, d: int, eps_rel: float, omega) -> None:
    x, y = _clouds(n, N, d, seed=n + N + d)
    res = sinkhorn_potentials(
        x, y, eps_rel=eps_rel, tol=1e-11, max_iter=20_000, omega=omega, chunk_size=17, dtype=torch.float64
    )
    assert res.converged and res.marginal_error <= 1e-11
    mc = _cost(x, y).mean()
    assert res.mean_cost == pytest.approx(mc, rel=1e-12)
    assert res.eps == pytest.approx(eps_rel * mc, rel=1e-12)
    f_ref, g_ref = _pot_potentials(x, y, res.eps)
    assert np.abs(_centred(res.f) - _centred(f_ref)).max() <= 1e-8 * mc
    assert np.abs(_centred(res.g) - _centred(g_ref)).max() <= 1e-8 * mc
    np.testing.assert_array_equal(np.argsort(res.g.numpy()), np.argsort(g_ref))


def test_marginals_hold_and_error_is_reported_exactly() -> None:
    x, y = _clouds(30, 300, 3, seed=7)
    res = sinkhorn_potentials(x, y, eps_rel=0.02, tol=1e-6, dtype=torch.float64, chunk_size=64)
    assert res.omega != 1.0, "over-relaxation did not engage: the test would not cover it"
    plan = _plan(x, y, res)
    # g is the c-transform of f: the candidate marginal is exact; the target error is the reported one
    np.testing.assert_allclose(plan.sum(0), 1 / 300, rtol=1e-10)
    tgt_err = np.abs(plan.sum(1) - 1 / 30).sum()
    assert tgt_err <= 1e-6
    assert tgt_err == pytest.approx(res.marginal_error, rel=1e-6)
    assert res.errors[-1] == res.marginal_error


def test_unconverged_result_is_the_measured_pair() -> None:
    x, y = _clouds(40, 90, 6, seed=3)
    res = sinkhorn_potentials(x, y, eps_rel=0.01, tol=1e-12, max_iter=3, dtype=torch.float64)
    assert not res.converged and res.iterations == 3 and len(res.errors) == 3
    plan = _plan(x, y, res)
    assert np.abs(plan.sum(1) - 1 / 40).sum() == pytest.approx(res.marginal_error, rel=1e-8)
    assert res.marginal_error > 1e-3  # non-trivial: three passes are far from converged


@pytest.mark.parametrize("omega", [1.0, "auto"])
def test_chunked_equals_unchunked(omega) -> None:
    x, y = _clouds(50, 203, 8, seed=11)
    kw = dict(eps_rel=0.03, tol=1e-10, omega=omega, dtype=torch.float64)
    whole = sinkhorn_potentials(x, y, chunk_size=203, **kw)
    parts = sinkhorn_potentials(x, y, chunk_size=7, **kw)
    assert whole.iterations == parts.iterations
    torch.testing.assert_close(parts.g, whole.g, rtol=0, atol=1e-12 * whole.mean_cost)
    torch.testing.assert_close(parts.f, whole.f, rtol=0, atol=1e-12 * whole.mean_cost)


@pytest.mark.parametrize("n,N,d,eps_rel", CASES)
def test_float32_agrees_with_float64(n: int, N: int, d: int, eps_rel: float) -> None:
    x, y = _clouds(n, N, d, seed=2 * n + N)
    ref = sinkhorn_potentials(x, y, eps_rel=eps_rel, tol=1e-11, max_iter=20_000, dtype=torch.float64)
    r32 = sinkhorn_potentials(x.astype(np.float32), y.astype(np.float32), eps_rel=eps_rel, tol=1e-5)
    assert r32.converged and r32.g.dtype == torch.float32
    assert np.abs(_centred(r32.g) - _centred(ref.g)).max() <= 3e-4 * ref.mean_cost
    assert spearmanr(r32.g.numpy(), ref.g.numpy()).statistic >= 0.999


def test_stale_shift_rescans_keep_the_result_right() -> None:
    # outlying targets get almost no mass at first, so f jumps by tens of ε and the float32 shift bound
    # underflows some rows: those chunks must be recomputed with the exact max
    x, y = _clouds(30, 300, 3, seed=5)
    x[:3] += 6.0
    ref = sinkhorn_potentials(x, y, eps_rel=0.02, tol=1e-10, dtype=torch.float64, chunk_size=64)
    r32 = sinkhorn_potentials(x, y, eps_rel=0.02, tol=1e-5, dtype=torch.float32, chunk_size=64)
    assert r32.rescans > 0, "the rescan path was not exercised"
    assert r32.converged
    assert np.abs(_centred(r32.g) - _centred(ref.g)).max() <= 3e-4 * ref.mean_cost


def test_planted_near_candidates_get_the_most_negative_gradients() -> None:
    rng = np.random.default_rng(0)
    d = 8
    targets = rng.normal(scale=0.3, size=(60, d)) + 1.0
    near = rng.normal(scale=0.3, size=(100, d)) + 1.0
    far = rng.normal(scale=0.3, size=(300, d)) + 3.5  # about 7 away from the target cloud
    pool = np.concatenate([near, far])
    perm = rng.permutation(len(pool))
    pool = pool[perm]
    is_near = perm < 100
    idx, res = ot_select(pool, targets, budget=100)
    assert set(idx.tolist()) == set(np.flatnonzero(is_near).tolist())
    grad = calibrated_gradient(res.g).numpy()
    assert grad[is_near].max() < grad[~is_near].min()
    assert grad[idx[0]] == grad.min()  # ordered most negative first


def test_calibrated_gradient_formula_and_order() -> None:
    g = torch.randn(57, dtype=torch.float64) * 3 + 1
    explicit = torch.stack([g[j] - (g.sum() - g[j]) / (len(g) - 1) for j in range(len(g))])
    torch.testing.assert_close(calibrated_gradient(g), explicit, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.argsort(calibrated_gradient(g)), torch.argsort(g))
    with pytest.raises(ValueError, match="at least 2"):
        calibrated_gradient(g[:1])


def test_mean_cost_is_exact() -> None:
    x, y = _clouds(37, 113, 9, seed=1)
    assert mean_cost(x, y, chunk_size=10) == pytest.approx(_cost(x, y).mean(), rel=1e-12)


def test_input_kinds_agree(tmp_path) -> None:
    x, y = _clouds(20, 70, 4, seed=9)
    kw = dict(eps_rel=0.05, tol=1e-9, dtype=torch.float64, chunk_size=16)
    base = sinkhorn_potentials(x, y, **kw)
    path = tmp_path / "cand.npy"
    np.save(path, y.astype(np.float32))
    mm = np.load(path, mmap_mode="r")  # read-only memmap, float32, read chunk by chunk
    from_mm = sinkhorn_potentials(x, mm, **kw)
    from_torch = sinkhorn_potentials(torch.from_numpy(x), torch.from_numpy(y), **kw)
    torch.testing.assert_close(from_torch.g, base.g, rtol=0, atol=1e-12)
    # the memmap holds float32-rounded candidates: agreement at float32 input precision
    assert np.abs(_centred(from_mm.g) - _centred(base.g)).max() <= 1e-5 * base.mean_cost


def test_warm_start_reaches_the_same_solution() -> None:
    x, y = _clouds(40, 400, 6, seed=4)
    kw = dict(eps_rel=0.02, tol=1e-10, dtype=torch.float64)
    cold = sinkhorn_potentials(x, y, **kw)
    warm = sinkhorn_potentials(x, y, warm_start=100, **kw)
    assert warm.warm_start_iterations > 0 and warm.converged
    assert np.abs(_centred(warm.g) - _centred(cold.g)).max() <= 1e-8 * cold.mean_cost
    again = sinkhorn_potentials(x, y, init_f=cold.f, **kw)
    assert again.iterations <= 2


def test_deterministic() -> None:
    x, y = _clouds(30, 150, 5, seed=6)
    a = sinkhorn_potentials(x.astype(np.float32), y.astype(np.float32), chunk_size=32)
    b = sinkhorn_potentials(x.astype(np.float32), y.astype(np.float32), chunk_size=32)
    assert torch.equal(a.g, b.g) and torch.equal(a.f, b.f) and a.errors == b.errors


def test_bad_inputs_raise_with_the_fix() -> None:
    x, y = _clouds(10, 20, 3, seed=0)
    with pytest.raises(ValueError, match="to match candidates"):
        sinkhorn_potentials(x[:, :2], y)
    with pytest.raises(ValueError, match="omega"):
        sinkhorn_potentials(x, y, omega=2.5)
    with pytest.raises(ValueError, match="budget"):
        ot_select(y, x, budget=21)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn_potentials(np.ones((3, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="dtype"):
        sinkhorn_potentials(x, y, dtype=torch.float16)
    bad = y.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_potentials(x, bad)
    with pytest.raises(ValueError, match="init_f"):
        sinkhorn_potentials(x, y, init_f=torch.zeros(11))


def test_global_torch_settings_are_restored() -> None:
    x, y = _clouds(10, 20, 3, seed=0)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what a training script may have set (TF32 on GPUs)
    try:
        sinkhorn_potentials(x, y, num_threads=1)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_num_threads() == threads
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x, y = _clouds(100, 3000, 32, seed=12)
    cpu = sinkhorn_potentials(x, y, tol=1e-9, dtype=torch.float64)
    gpu = sinkhorn_potentials(
        torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda(), tol=1e-9, dtype=torch.float64
    )
    assert gpu.g.is_cuda
    assert np.abs(_centred(gpu.g) - _centred(cpu.g)).max() <= 1e-9 * cpu.mean_cost
    g32 = sinkhorn_potentials(
        torch.from_numpy(x).float().cuda(), torch.from_numpy(y).float().cuda(), tol=1e-5
    )
    assert np.abs(_centred(g32.g) - _centred(cpu.g)).max() <= 3e-4 * cpu.mean_cost
