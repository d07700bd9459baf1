"""Benchmark: the GOT-D optimal-transport solve (winnow.kernels.sinkhorn) at 10^5 and 10^6 candidates.

Data (synthetic, deterministic, float32, 384-d like all-MiniLM-L6-v2 sentence embeddings): 64 cluster
centres drawn uniformly on the unit sphere, cluster weights ∝ 1/sqrt(rank); a point is
``normalize(centre + sigma · z / sqrt(d))`` with ``z`` standard normal, sigma 1.0 (two points of one
cluster have cosine ≈ 0.5, like texts on one topic; different clusters ≈ 0). Candidates come from all
clusters, the ``--targets`` target points from 4 of them.

Per candidate count, in a fresh subprocess (so the peak RSS is that run's own):

* wall time of ``ot_select`` (solve + calibrated gradient + ranking, budget 10%) with default
  settings (eps = 0.05 × mean cost, tol 1e-3 on the L1 marginal error, float32, all cores), the median
  of ``--repeats`` runs, and min/max;
* peak memory beyond the embeddings: the process's peak RSS during the solve (``VmHWM``, reset
  through ``/proc/self/clear_refs`` before each run, cross-checked by a thread sampling ``VmRSS``
  every 10 ms) minus its RSS just before the run, once the embeddings exist, torch is loaded and freed
  heap has been handed back to the OS (``malloc_trim``; without it, pages kept from generating the data
  or from the previous run were reused and hid the solver's own memory);
* passes, final marginal error, ε, over-relaxation factor, rescanned chunks, and the 1-minute load
  average after each run (on a shared machine other processes inflate wall times: compare runs made
  side by side only).

Ranking stability (``--spearman-size`` candidates, default 20k): Spearman correlation between the
candidate ranking at the default stopping rule and at tight convergence (float64, tol 1e-7), and the
overlap of the two top-10% selections; the same after a single pass, to show how much the stopping
rule matters at all.

Run: ``python benchmarks/bench_sinkhorn.py [--sizes 100000 1000000] [--repeats 3]``; the table is
printed and the JSON written to ``benchmarks/out/bench_sinkhorn.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

OUT_DEFAULT = Path(__file__).resolve().parent / "out" / "bench_sinkhorn.json"


def make_embeddings(
    n_targets: int, n_cand: int, dim: int, seed: int = 0, k: int = 64, sigma: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (see module docstring), generated in blocks straight into float32."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1)
    weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 0.5
    target_w = torch.zeros(k, dtype=torch.float64)
    target_w[[3, 10, 17, 40]] = 1.0

    def draw(m: int, w: torch.Tensor) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        view = torch.from_numpy(out)
        for s in range(0, m, 65536):
            e = min(s + 65536, m)
            lab = torch.multinomial(w, e - s, replacement=True, generator=gen)
            z = centres[lab] + sigma * torch.randn(e - s, dim, generator=gen) / dim**0.5
            view[s:e] = torch.nn.functional.normalize(z, dim=1)
        return out

    return draw(n_targets, target_w), draw(n_cand, weights)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class RssSampler:
    """Max VmRSS seen by a background thread (sampling every 10 ms) between start() and stop()."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the RSS baseline excludes earlier garbage."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child_size(a: argparse.Namespace) -> dict:
    """One candidate count, in this (fresh) process."""
    import torch

    from winnow.kernels.sinkhorn import ot_select

    t0 = time.perf_counter()
    targets, cands = make_embeddings(a.targets, a.size, a.dim, seed=a.seed)
    gen_s = time.perf_counter() - t0
    emb_mb = (targets.nbytes + cands.nbytes) / 2**20
    runs = []
    for _ in range(a.repeats):
        _trim_heap()
        base_kb = _status_kb("VmRSS")
        hwm_ok = _reset_hwm()
        with RssSampler() as sampler:
            t = time.perf_counter()
            idx, res = ot_select(cands, targets, budget=a.size // 10, eps_rel=a.eps_rel, tol=a.tol)
            wall = time.perf_counter() - t
        hwm_kb = _status_kb("VmHWM") if hwm_ok else sampler.peak_kb
        runs.append(
            {
                "wall_s": wall,
                "peak_extra_mb": (max(hwm_kb, sampler.peak_kb) - base_kb) / 1024,
                "sampled_peak_extra_mb": (sampler.peak_kb - base_kb) / 1024,
                "hwm_reset": hwm_ok,
                "loadavg_1min_after": os.getloadavg()[0],  # other processes on the machine skew wall time
                **res.summary(),
            }
        )
        del idx, res
    walls = [r["wall_s"] for r in runs]
    return {
        "candidates": a.size,
        "targets": a.targets,
        "dim": a.dim,
        "embeddings_mb": emb_mb,
        "generate_s": gen_s,
        "torch_threads": torch.get_num_threads(),
        "wall_median_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "peak_extra_mb": max(r["peak_extra_mb"] for r in runs),
        "runs": runs,
    }


def spearman_check(a: argparse.Namespace) -> dict:
    import torch
    from scipy.stats import spearmanr

    from winnow.kernels.sinkhorn import sinkhorn_potentials

    targets, cands = make_embeddings(a.targets, a.spearman_size, a.dim, seed=a.seed + 1)
    budget = a.spearman_size // 10
    tight = sinkhorn_potentials(
        targets, cands, eps_rel=a.eps_rel, tol=1e-7, max_iter=5000, dtype=torch.float64
    )
    default = sinkhorn_potentials(targets, cands, eps_rel=a.eps_rel, tol=a.tol)
    one_pass = sinkhorn_potentials(targets, cands, eps_rel=a.eps_rel, tol=a.tol, max_iter=1)
    ref = tight.g.numpy()
    top_ref = set(np.argsort(ref, kind="stable")[:budget].tolist())

    def compare(res) -> dict:
        g = res.g.double().numpy()
        top = set(np.argsort(g, kind="stable")[:budget].tolist())
        return {
            "iterations": res.iterations,
            "marginal_error": res.marginal_error,
            "spearman_vs_tight": float(spearmanr(g, ref).statistic),
            "top10pct_overlap_vs_tight": len(top & top_ref) / budget,
            "seconds": res.seconds,
        }

    return {
        "candidates": a.spearman_size,
        "targets": a.targets,
        "tight": {
            "dtype": "float64",
            "tol": 1e-7,
            "iterations": tight.iterations,
            "converged": tight.converged,
            "marginal_error": tight.marginal_error,
            "seconds": tight.seconds,
        },  # fmt: skip
        "default_rule": compare(default),
        "single_pass": compare(one_pass),
    }


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mem_total_gb": _status_meminfo_gb(),
        "loadavg_at_start": os.getloadavg()[0],
    }


def _status_meminfo_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            return round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="candidate counts")
    p.add_argument("--targets", type=int, default=2000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eps-rel", type=float, default=0.05)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--spearman-size", type=int, default=20_000, help="0 skips the ranking check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT_DEFAULT)
    p.add_argument("--_child", dest="size", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.size is not None:  # child: one size, JSON on the last stdout line
        print(json.dumps(child_size(a)))
        return

    record: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                    "settings": {"eps_rel": a.eps_rel, "tol": a.tol, "dtype": "float32", "repeats": a.repeats},
                    "sizes": [], "ranking": None}  # fmt: skip
    for size in a.sizes:
        cmd = [sys.executable, __file__, "--_child", str(size), "--targets", str(a.targets), "--dim", str(a.dim),
               "--repeats", str(a.repeats), "--eps-rel", str(a.eps_rel), "--tol", str(a.tol), "--seed", str(a.seed)]  # fmt: skip
        print(f"[bench_sinkhorn] {size:,} candidates x {a.repeats} ...", flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        record["sizes"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if a.spearman_size:
        print(f"[bench_sinkhorn] ranking check at {a.spearman_size:,} candidates ...", flush=True)
        record["ranking"] = spearman_check(a)

    print(
        f"\nGOT-D Sinkhorn, {a.targets} targets, {a.dim}-d float32, eps = {a.eps_rel} x mean cost, tol {a.tol}"
    )
    print(
        f"machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, torch {record['machine']['torch']}\n"
    )
    hdr = f"{'candidates':>11} {'wall s (median)':>16} {'min-max':>13} {'peak extra MB':>14} {'emb MB':>8} {'passes':>7} {'marg. err':>10} {'eps':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in record["sizes"]:
        last = r["runs"][-1]
        print(
            f"{r['candidates']:>11,} {r['wall_median_s']:>16.1f} {r['wall_min_s']:>6.1f}-{r['wall_max_s']:<6.1f} "
            f"{r['peak_extra_mb']:>14.0f} {r['embeddings_mb']:>8.0f} {last['iterations']:>7d} "
            f"{last['marginal_error']:>10.2e} {last['eps']:>8.4f}"
        )
    if record["ranking"]:
        rk = record["ranking"]
        print(f"\nranking at {rk['candidates']:,} candidates vs tight convergence (float64, tol 1e-7, "
              f"{rk['tight']['iterations']} passes):")  # fmt: skip
        for name in ("default_rule", "single_pass"):
            v = rk[name]
            print(f"  {name:<13} passes {v['iterations']:>3}  marg. err {v['marginal_error']:.2e}  "
                  f"Spearman {v['spearman_vs_tight']:.6f}  top-10% overlap {v['top10pct_overlap_vs_tight']:.4f}")  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
