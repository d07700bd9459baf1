"""Benchmark: the weighted linear cross-entropy step (forward + backward) by every available path.

Contenders, same inputs (hidden ``(N, D)``, head ``(V, D)``, targets, token weights with ~25% zeros):

* ``materialized``: ``logits = h @ W.T`` for all N rows, ``F.cross_entropy(reduction="none")``, the
  weighted sum, autograd (what a plain Hugging Face loss does, plus weights);
* ``reference``: :func:`winnow.kernels.linear_cross_entropy.linear_cross_entropy_reference` (chunked,
  weight-0 rows skipped, gradients formed during the forward);
* ``triton``: :func:`winnow.kernels.triton_linear_cross_entropy.linear_cross_entropy_triton` (CUDA only:
  under the CPU interpreter it is a correctness tool, thousands of times slower);
* ``liger`` / ``cce``: Liger's fused linear CE and Apple's Cut Cross-Entropy, when importable (CUDA).

Time: median of ``--reps`` runs after one warm-up. Memory: peak bytes of one step beyond the inputs and
the two gradients every method must return (``N*D + V*D`` elements; an fp32 ``grad W`` accumulator for
bf16 weights counts as extra): on CUDA ``max_memory_allocated`` in this process; on CPU each
(contender, V) runs in a fresh subprocess (warmed up on a tiny problem) and reports its peak resident
set growth during one step (``VmHWM`` after resetting it, minus ``VmRSS`` before).

Run: ``python benchmarks/bench_kernels.py [--device cpu|cuda] [--vocab 8000,32000,64000] [--out F.json]``.
Imports nothing but torch (and the contenders): it also runs on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    wt = torch.rand(n, generator=g)
    wt[torch.rand(n, generator=g) < 0.25] = 0.0
    return h, w, y, wt.to(device)


def _materialized(h, w, y, wt):
    logits = (h @ w.T).float()
    return (wt * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum()


def contenders(device: str) -> dict:
    from winnow.kernels.linear_cross_entropy import linear_cross_entropy_reference

    out = {"materialized": _materialized, "reference": linear_cross_entropy_reference}
    if device != "cuda":
        return out
    from winnow.kernels.triton_linear_cross_entropy import linear_cross_entropy_triton

    out["triton"] = linear_cross_entropy_triton
    try:  # optional third-party baselines; absent on the GPU machine as read on 2026-11-30
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        def liger(h, w, y, wt):
            per = LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "none")[0]
            return (wt * per).sum()

        out["liger"] = liger
    except Exception:  # noqa: BLE001 - any import failure just drops the contender
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = lambda h, w, y, wt: (wt * cce(h, w, y, reduction="none")).sum()
    except Exception:  # noqa: BLE001
        pass
    return out


def step(fn, h, w, y, wt) -> float:
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(hh, ww, y, wt)
    loss.backward()
    return float(loss.detach())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(fn, inputs, device: str, reps: int) -> tuple[float, float]:
    """(median seconds per forward+backward, loss)."""
    loss = step(fn, *inputs)  # warm-up (and Triton compilation)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        step(fn, *inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def cuda_peak_extra(fn, inputs) -> int:
    """Peak CUDA bytes during one step beyond the inputs and their gradients (the unavoidable part)."""
    h, w = inputs[0], inputs[1]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, *inputs)
    torch.cuda.synchronize()
    unavoidable = h.numel() * h.element_size() + w.numel() * w.element_size()  # the returned gradients
    return torch.cuda.max_memory_allocated() - base - unavoidable


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_of(fn) -> int:
    """Peak resident bytes of ``fn()`` above the resident size before it (Linux: writing 5 to
    /proc/self/clear_refs resets the high-water mark VmHWM, so earlier peaks do not hide this one)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def cpu_peak_extra(name: str, n: int, v: int, d: int) -> int:
    """Peak resident growth of one step of ``name`` in a fresh process (bytes), less the gradients."""
    here, grads = str(Path(__file__).parent), 4 * (n * d + v * d)
    code = (
        f"import sys, torch; sys.path.insert(0, {here!r}); torch.set_num_threads(1)\n"
        "import bench_kernels as b\n"
        f"fn = b.contenders('cpu')[{name!r}]; b.step(fn, *b.make_inputs(64, 128, 16, torch.float32, 'cpu'))\n"
        f"inp = b.make_inputs({n}, {v}, {d}, torch.float32, 'cpu')\n"
        f"print(b.rss_peak_of(lambda: b.step(fn, *inp)) - {grads})\n"
    )
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def run(device: str, vocabs: list[int], n: int, d: int, dtype: torch.dtype, reps: int, memory: bool = True):
    rows = []
    for v in vocabs:
        inputs = make_inputs(n, v, d, dtype, device, seed=v)
        for name, fn in contenders(device).items():
            try:
                sec, loss = time_step(fn, inputs, device, reps)
                mem = None
                if memory:
                    mem = cuda_peak_extra(fn, inputs) if device == "cuda" else cpu_peak_extra(name, n, v, d)
            except Exception as e:  # noqa: BLE001 - an API drift in a third-party contender must not stop the rest
                rows.append({"contender": name, "V": v, "error": f"{type(e).__name__}: {e}"})
                print(f"{name:>13} V={v:>6}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append({"contender": name, "V": v, "N": n, "D": d, "dtype": str(dtype).split(".")[-1],
                         "ms": round(sec * 1e3, 3), "peak_extra_MiB": None if mem is None else round(mem / 2**20, 1),
                         "loss": loss})
            print(f"{name:>13} V={v:>6} N={n} D={d}: {sec * 1e3:9.1f} ms/step"
                  + ("" if mem is None else f"  peak beyond inputs+grads {mem / 2**20:8.1f} MiB"), flush=True)
        del inputs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vocab", default="8000,32000,64000")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(a.device, [int(x) for x in a.vocab.split(",")], a.rows, a.dim, getattr(torch, a.dtype), a.reps)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"device": a.device, "threads": a.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
