"""Benchmark: DV4LLM's Sinkhorn solve split over torchrun ranks, candidates read from an .npy on disk.

What ``winnow score RUN dv4llm`` does after embedding, on synthetic embeddings: each rank reads its
contiguous share of the candidates from the file (``NpyRows``, pread, or ``--reader mmap``), solves with
``group=WORLD`` (per-target log-sums all-reduced), all-gathers ``g`` and ranks every candidate by its
calibrated gradient (argsort), as the stage's scan does. One rank is the same code with world size 1.

Data: ``--targets`` target rows then N candidate rows, float32, ``--dim`` wide (256: the stage's TF-IDF
default), clustered unit vectors like bench_sinkhorn.py (64 centres, weights ∝ 1/sqrt(rank), targets
from 4 clusters), generated block by block straight to ``WORK/emb-N-d.npy`` (never whole in RAM; kept
for reuse; N·dim·4 bytes of disk: 10.2 GB at 10M × 256).

Per (N, ranks): wall time of the solve + gather + ranking on each rank, its passes, and each rank's
peak RSS (``VmHWM``, absolute, and beyond its RSS just before the solve). ``--max-iter`` caps the passes
(for 10M on a small machine: the per-pass time is then extrapolated, stated as such).

Run: ``python benchmarks/bench_dv4llm_ranks.py --sizes 100000 1000000 --ranks 1 2 --work DIR``; one JSON
line per (N, ranks) appended to ``--results`` and a table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_embeddings(path: Path, n_targets: int, n_cand: int, dim: int, seed: int = 0) -> None:
    """The synthetic file, block by block (pwrite), unless it is there already."""
    if path.exists():
        return
    import torch

    from winnow.stages.dv4llm_embeddings import write_rows

    gen = torch.Generator().manual_seed(seed)
    k = 64
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1)
    weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 0.5
    target_w = torch.zeros(k, dtype=torch.float64)
    target_w[[3, 10, 17, 40]] = 1.0
    tmp = path.with_name(path.name + ".partial")
    created = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_targets + n_cand, dim))
    del created
    start = 0
    for m, w in ((n_targets, target_w), (n_cand, weights)):
        for s in range(0, m, 262_144):
            e = min(s + 262_144, m)
            lab = torch.multinomial(w, e - s, replacement=True, generator=gen)
            z = centres[lab] + torch.randn(e - s, dim, generator=gen) / dim**0.5
            write_rows(tmp, start + s, torch.nn.functional.normalize(z, dim=1).numpy())
        start += m
    os.replace(tmp, path)


def _kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def child(a: argparse.Namespace) -> None:
    """One rank (torchrun sets RANK / WORLD_SIZE): solve its share, write ``FILE.rankR.json``."""
    import ctypes
    import gc

    from winnow.core import collective
    from winnow.kernels import sinkhorn as sk
    from winnow.kernels.sinkhorn import calibrated_gradient, sinkhorn_potentials
    from winnow.stages.dv4llm_embeddings import NpyRows

    pass_s: list[float] = []
    sweep = sk._sweep

    def timed_sweep(*args, **kw):  # instrumentation: the time of each pass, for extrapolating capped runs
        t0 = time.perf_counter()
        out = sweep(*args, **kw)
        pass_s.append(time.perf_counter() - t0)
        return out

    sk._sweep = timed_sweep

    with collective.joined() as (rank, world):
        n_cand = NpyRows(a.file).shape[0] - a.targets
        lo, hi = collective.split(n_cand, world, rank)
        x = NpyRows(a.file, 0, a.targets)[:]
        rows = NpyRows(a.file, a.targets + lo, a.targets + hi)
        if a.reader == "mmap":
            rows = np.load(a.file, mmap_mode="r")[a.targets + lo : a.targets + hi]
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        collective.barrier()
        t = time.perf_counter()
        res = sinkhorn_potentials(
            x, rows, max_iter=a.max_iter, num_threads=a.threads, group=collective.group()
        )
        solve_s = time.perf_counter() - t
        g = collective.all_gather_rows(res.g.cpu())
        grad = calibrated_gradient(g.double()).numpy()
        order = np.argsort(grad, kind="stable")
        wall = time.perf_counter() - t
        out = {"rank": rank, "world": world, "candidates": n_cand, "lo": lo, "hi": hi, "wall_s": wall,
               "solve_s": solve_s, "pass_s": pass_s, "iterations": res.iterations, "marginal_error": res.marginal_error,
               "threads": a.threads or max(1, len(os.sched_getaffinity(0)) // world), "peak_rss_mb": _kb("VmHWM") / 1024,
               "base_rss_mb": base / 1024, "top": int(order[0]), "reader": a.reader}  # fmt: skip
        out["peak_extra_mb"] = out["peak_rss_mb"] - out["base_rss_mb"]
        Path(f"{a.file}.rank{rank}.json").write_text(json.dumps(out))  # stdout lines of ranks interleave


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--targets", type=int, default=2000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--reader", choices=["pread", "mmap"], default="pread")
    p.add_argument(
        "--threads", type=int, default=None, help="solver threads per rank (default: cores / ranks)"
    )
    p.add_argument("--work", type=Path, required=True, help="folder for the synthetic .npy files")
    p.add_argument(
        "--results", type=Path, default=Path(__file__).resolve().parent / "out" / "dv4llm_ranks.jsonl"
    )
    p.add_argument("--_file", dest="file", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.file is not None:
        return child(a)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    for n in a.sizes:
        path = a.work / f"emb-{n}-{a.dim}.npy"
        t = time.perf_counter()
        write_embeddings(path, a.targets, n, a.dim)
        print(
            f"[bench] {path} ({path.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        for w in a.ranks:
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(w), "--no-python",
                   sys.executable, "-P", __file__, "--_file", str(path), "--targets", str(a.targets),
                   "--max-iter", str(a.max_iter), "--reader", a.reader, "--work", str(a.work),
                   *(["--threads", str(a.threads)] if a.threads else [])]  # fmt: skip
            load = os.getloadavg()[0]
            for old in path.parent.glob(f"{path.name}.rank*.json"):
                old.unlink()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            ranks = [json.loads(f.read_text()) for f in sorted(path.parent.glob(f"{path.name}.rank*.json"))]
            if proc.returncode or len(ranks) != w:
                sys.exit(f"rank run failed ({proc.returncode}): {proc.stderr[-3000:]}")
            row = {"candidates": n, "ranks": w, "threads": ranks[0]["threads"], "reader": a.reader, "targets": a.targets, "dim": a.dim, "max_iter": a.max_iter,
                   "load_before": load, "load_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "wall_s": max(r["wall_s"] for r in ranks), "per_rank": sorted(ranks, key=lambda r: r["rank"])}  # fmt: skip
            with a.results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            peaks = "/".join(f"{r['peak_rss_mb']:.0f}" for r in row["per_rank"])
            extra = "/".join(f"{r['peak_extra_mb']:.0f}" for r in row["per_rank"])
            print(f"{n:>11,} ranks {w} x {row['threads']} threads: {row['wall_s']:.1f} s, {ranks[0]['iterations']} passes, peak RSS MB {peaks} "
                  f"(beyond start {extra}), load {load:.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
