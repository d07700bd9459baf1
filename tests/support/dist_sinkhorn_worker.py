"""Spawned by test_dv4llm_dist: one rank of a gloo group solving its share of Sinkhorn problems.

Each case's candidates are split into contiguous ranges (``collective.split``); the rank solves with
``group=WORLD`` and all-gathers ``g``. It also runs one case from an .npy file read by ``NpyRows`` (the
stage's path) and the collectives themselves; everything goes to ``out`` as a .npz (no pickle).
"""

from __future__ import annotations

import os

import numpy as np
import torch

# (name, targets, candidates, dim, seed, solver options): several shapes, both precisions, plain and
# over-relaxed iterations (eps_rel 0.02 to 1e-10 engages omega), a warm start and uneven chunks
CASES = [
    ("f32_default", 40, 2000, 16, 0, {}),
    ("f64_relaxed", 7, 301, 5, 1, {"dtype": torch.float64, "eps_rel": 0.02, "tol": 1e-10, "max_iter": 3000}),
    ("f64_warm", 12, 999, 3, 2, {"dtype": torch.float64, "tol": 1e-9, "warm_start": 200, "max_iter": 2000}),
    ("f32_chunks", 5, 77, 4, 3, {"chunk_size": 10}),
]


def problem(n: int, big_n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered random clouds (float64), candidates around 3 centres shifted off the targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 1.0
    centres = rng.normal(size=(3, d)) * 2.0
    y = centres[rng.integers(0, 3, big_n)] + rng.normal(scale=0.7, size=(big_n, d))
    return x, y


def worker(rank: int, world: int, init_file: str, out: str, npy: str) -> None:
    import torch.distributed as dist

    from winnow.core import collective
    from winnow.kernels.sinkhorn import sinkhorn_potentials
    from winnow.stages.dv4llm_embeddings import NpyRows

    torch.set_num_threads(1)
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    got: dict[str, np.ndarray] = {}
    try:
        for name, n, big_n, d, seed, kw in CASES:
            x, y = problem(n, big_n, d, seed)
            lo, hi = collective.split(big_n, world, rank)
            res = sinkhorn_potentials(x, y[lo:hi], group=dist.group.WORLD, seed=seed, **kw)
            got[f"{name}/f"] = res.f.double().numpy()
            got[f"{name}/g"] = collective.all_gather_rows(res.g.cpu()).double().numpy()
            got[f"{name}/iterations"] = np.array([res.iterations, res.converged])
        big_n = int(np.load(npy, mmap_mode="r").shape[0])
        lo, hi = collective.split(big_n - 6, world, rank)
        head, rows = NpyRows(npy, 0, 6), NpyRows(npy, 6 + lo, 6 + hi)  # 6 targets first, as the stage
        res = sinkhorn_potentials(head[:], rows, group=dist.group.WORLD)
        got["npy/g"] = collective.all_gather_rows(res.g.cpu()).double().numpy()
        got["npy/ram_g"] = (
            collective.all_gather_rows(
                sinkhorn_potentials(head[:], np.load(npy)[6 + lo : 6 + hi], group=dist.group.WORLD).g
            )
            .double()
            .numpy()
        )
        head.close()
        rows.close()
        _collectives(rank, got)
        if rank == 0:
            np.savez(out, **got)
    finally:
        dist.destroy_process_group()


def _collectives(rank: int, got: dict[str, np.ndarray]) -> None:
    """Uneven all-gather, broadcasts of several dtypes and of strings, an all-reduce MAX."""
    from winnow.core import collective

    got["gather"] = collective.all_gather_rows(
        torch.arange(3 + 4 * rank, dtype=torch.int64) * (rank + 1)
    ).numpy()
    src = [np.arange(12, dtype=np.float32).reshape(3, 4) * 1.5, np.array([[True, False]]), np.arange(5) - 2]
    for i, a in enumerate(src):
        got[f"bcast{i}"] = collective.broadcast_array(a if rank == 0 else None)
    words = collective.broadcast_strings(["naïve", "x", "数学"] if rank == 0 else None)
    got["strings"] = np.array(words)
    got["max"] = collective.all_reduce(torch.tensor([float(rank), -float(rank)]), "max").numpy()
