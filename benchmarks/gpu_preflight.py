"""The GPU check's preflight (``gpu_check.py OUTDIR --preflight``, <= 10 s): what this machine has.

Writes ``OUTDIR/env.txt``, one ``name: value`` line each, as it learns them: python, the packages'
versions (from their metadata: importing peft alone takes seconds), whether
``winnow`` imports (and from where), which ``kernels`` package ``import kernels`` finds (Hugging Face's
kernel hub, which transformers 5.25 imports; our checkout's ``kernels/`` folder shadows it when the
root is on sys.path), POT (``ot``: absent on the GPU machine; ``test_sinkhorn`` skips without it), a C
compiler and ``Python.h`` (Triton builds its launcher with them), the GPU, and one tiny Triton launch.
Always exits 0: every finding is a line of the report, not a reason to stop the check.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

# distribution names: versions are read from their metadata, nothing is imported (peft alone takes seconds)
PACKAGES = (
    "torch",
    "triton",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "transformers",
    "peft",
    "pyarrow",
    "kernels",
    "liger-kernel",
    "cut-cross-entropy",
    "POT",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _kernels_status() -> str:
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return "absent (transformers >= 5.25 needs it: pip install kernels)"
    origin = str(spec.origin or spec.submodule_search_locations)
    shadowed = "site-packages" not in origin and "dist-packages" not in origin
    return f"{origin}" + (" (SHADOWED by a checkout's kernels/: the root is on sys.path)" if shadowed else "")


def _tiny_triton_launch(smoke: bool) -> str:
    """One 16-element add through a freshly defined kernel (compiles and launches: ~1 s on a GPU)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    dev = "cpu" if smoke else "cuda"
    x = torch.arange(16, dtype=torch.float32, device=dev)
    t0 = time.perf_counter()
    _add_one[(1,)](x, 16, BLOCK=16)
    ok = torch.equal(x.cpu(), torch.arange(1, 17, dtype=torch.float32))
    return f"{'ok' if ok else 'WRONG RESULT'} in {time.perf_counter() - t0:.2f}s ({'interpreted' if smoke else 'compiled'})"


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"none (torch {torch.__version__}, cuda build {torch.version.cuda})"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {torch.cuda.device_count()} device(s), cuda {torch.version.cuda}"


def main(out: Path, smoke: bool) -> int:
    path = out / "env.txt"
    path.write_text(time.strftime("date: %Y-%m-%d %H:%M UTC\n", time.gmtime()))

    def line(name: str, fn) -> None:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001
            value = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        with open(path, "a") as f:
            f.write(f"{name}: {value}\n")

    line("python", lambda: f"{sys.version.split()[0]} ({sys.executable})")
    for name in PACKAGES:
        line(name, lambda name=name: _version(name))
    line("winnow", lambda: importlib.import_module("winnow").__file__)
    line("import kernels", _kernels_status)
    line(
        "import ot (POT)",
        lambda: "found" if importlib.util.find_spec("ot") else "absent (test_sinkhorn skips)",
    )
    line(
        "C compiler",
        lambda: next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), "none"),
    )
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    line("Python.h", lambda: f"{include} {'present' if include.exists() else 'ABSENT'}")
    line("gpu", _gpu)
    if os.environ.get("WINNOW_GPU_CHECK_FAULT") == "triton":
        from gpu_check import inject_triton_fault

        inject_triton_fault()
    line("triton launch", lambda: _tiny_triton_launch(smoke))
    return 0
