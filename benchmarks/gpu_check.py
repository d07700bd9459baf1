"""The GPU check's driver (run by ``benchmarks/gpu_check.sh``): preflight, then one process per section.

A first GPU run must give numbers even if a kernel faults, so:

* **each section runs in its own process** (``gpu_check.py OUTDIR --section NAME``): a sticky CUDA
  fault (illegal address, device assert) or a hang ends that process only; the driver gives each one
  a timeout within the overall ``--budget`` and goes on with the next;
* **each path** of a section (``reference``, ``materialized``, ``triton``, ...) runs under its own
  ``try``; the reference and materialized paths run before the Triton ones, and each result is
  written into ``OUTDIR/gpu_check.json`` (atomically) as soon as it exists; before a path starts its
  name is written as the section's ``running`` entry, so a process that dies leaves the name of the
  path that killed it (recorded as a failed path by the driver);
* every timed path compares its loss / log-probs / gradients with the section's reference within a
  stated tolerance (``checks``: difference, tolerance) and is ``ok: false`` when outside it;
* ``WINNOW_KERNELS`` is set per path and restored afterwards (an operator's ``reference`` stays).

Output: ``{"meta": {...}, "sections": {NAME: {"ok": bool, "result": [{"path": ..., "ok": bool,
"triton": bool, ...}, ...], "seconds": s}}}``; ``triton: true`` marks paths that run Triton code (our
kernels, and FlexAttention, which inductor compiles to Triton); ``optional: true`` marks third-party
contenders (Liger, CCE, CuPy). Exit status 0 when every failed path is a Triton or optional one (the
references still stand), 1 otherwise.

``--cpu-smoke`` runs everything at toy sizes on the CPU (Triton under the interpreter).
``--preflight`` writes the environment report (``env.txt``; <= 10 s). ``WINNOW_GPU_CHECK_FAULT=triton``
makes every Triton launch raise, in the preflight and in every section (the fault-injection run; the
CI test ``tests/benchmarks/test_gpu_check.py`` does the same in-process); ``=triton-abort`` makes the
section's process die at its first Triton launch instead (a sticky CUDA fault). Imports no polars, duckdb or
datasets; every child inherits this process's environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # bench_kernels, gpu_sections (benchmarks/ is a folder of scripts)

FAULT_ENV = "WINNOW_GPU_CHECK_FAULT"
# section -> (timeout cap in seconds on the GPU); order = run order
SECTIONS = {
    "self_check": 45,
    "loss_step": 40,
    "head": 25,
    "model_pass": 35,
    "train_step": 45,
    "trainer_step": 75,
    "packer": 20,
    "lora": 45,
    "lemo": 40,
}
FULL = dict(
    n=16384,
    d=2048,
    vocabs=[32768, 131072],
    head_n=16384,
    head_v=131072,
    layers=16,
    hidden=2048,
    inter=8192,
    heads=32,
    kv=8,
    vocab=128256,
    batch=2,
    seq=4096,
    reps=3,
    pass_samples=64,
    pass_len=1024,
    pack_samples=64,
    pack_len=2048,
    check_shape=[200, 4099, 136],
)
SMOKE = dict(
    n=64,
    d=32,
    vocabs=[300],
    head_n=50,
    head_v=300,
    layers=2,
    hidden=64,
    inter=128,
    heads=4,
    kv=2,
    vocab=300,
    batch=2,
    seq=64,
    reps=1,
    pass_samples=6,
    pass_len=40,
    pack_samples=8,
    pack_len=50,
    check_shape=[40, 517, 24],
)


def sizes_line(c: dict) -> str:
    return (
        f"loss_step N={c['n']} D={c['d']} V={c['vocabs']}; head N={c['head_n']} V={c['head_v']}; llama "
        f"{c['layers']}x{c['hidden']} (MLP {c['inter']}, heads {c['heads']}/{c['kv']}, V={c['vocab']}) at "
        f"{c['batch']}x{c['seq']} tokens; pass {c['pass_samples']}x<={c['pass_len']}; pack "
        f"{c['pack_samples']}x<={c['pack_len']}; self-check N,V,D={c['check_shape']}"
    )


class Recorder:
    """``gpu_check.json``, re-read and rewritten atomically on every change (one writer at a time)."""

    def __init__(self, out: Path):
        self.path = out / "gpu_check.json"

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"meta": {}, "sections": {}}

    def save(self, data: dict) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.path)

    def update(self, fn) -> None:
        data = self.load()
        fn(data)
        self.save(data)

    def begin(self, name: str) -> None:
        self.update(lambda d: d["sections"].__setitem__(name, {"ok": False, "result": [], "running": None}))

    def running(self, name: str, path: dict | None) -> None:
        self.update(lambda d: d["sections"][name].__setitem__("running", path))

    def add(self, name: str, entry: dict) -> None:
        def put(d):
            d["sections"][name]["result"].append(entry)
            d["sections"][name]["running"] = None

        self.update(put)

    def end(self, name: str, seconds: float, error: str | None = None) -> None:
        def close(d):
            s = d["sections"].setdefault(name, {"result": []})
            died = s.pop("running", None)
            if died:  # the process ended inside this path: the path failed, and the error is its
                s["result"].append({**died, "ok": False, "error": error or "process ended inside this path"})
                s["died_in"] = died
            if error:
                s["error"] = error
            s["ok"] = not error and all(e["ok"] for e in s["result"])
            s["seconds"] = round(seconds, 1)
            s["done"] = True

        self.update(close)


def exit_status(data: dict) -> int:
    """0 when every failure is a Triton (or optional) path's; a section error outside a path counts."""
    tolerated = lambda e: bool(e.get("triton") or e.get("optional"))  # noqa: E731
    for s in data["sections"].values():
        if any(not e["ok"] and not tolerated(e) for e in s.get("result", [])):
            return 1
        if s.get("error") and not tolerated(s.get("died_in") or {}):
            return 1
    return 0


def inject_triton_fault(patch=setattr, abort: bool = False) -> None:
    """Every Triton launch raises (compiled or interpreted): ``patch(cls, "run", raiser)``; with
    ``abort`` the process dies on the spot instead, as after a sticky CUDA fault."""
    from triton.runtime import interpreter, jit

    def raiser(self, *a, **k):
        if abort:
            os.abort()
        raise RuntimeError(
            f"injected fault ({FAULT_ENV}): Triton launch of {getattr(self, '__name__', self)}"
        )

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        patch(cls, "run", raiser)


@contextlib.contextmanager
def kernels(value: str | None):
    """``WINNOW_KERNELS=value`` inside (None: leave it), the previous value (or its absence) after."""
    saved = os.environ.get("WINNOW_KERNELS")
    if value is not None:
        os.environ["WINNOW_KERNELS"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WINNOW_KERNELS", None)
        else:
            os.environ["WINNOW_KERNELS"] = saved


def run_section(out: Path, name: str, smoke: bool) -> None:
    """One section in this process; every outcome ends up in the JSON."""
    import gpu_sections
    import torch

    fault = os.environ.get(FAULT_ENV)
    if fault in ("triton", "triton-abort") and gpu_sections.has_triton():
        inject_triton_fault(abort=fault == "triton-abort")
    rec = Recorder(out)
    rec.begin(name)
    t0 = time.time()
    dev = "cpu" if smoke else "cuda"
    ctx = gpu_sections.Section(rec, name, dev, SMOKE if smoke else FULL)
    error = None
    try:
        with kernels(None):
            gpu_sections.SECTIONS[name](ctx)
    except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
        traceback.print_exc()
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()
    rec.end(name, time.time() - t0, error)


def drive(
    out: Path, smoke: bool, budget: float, in_process: bool = False, only: list[str] | None = None
) -> int:
    """Every section (or those in ``only``), each in a child process (or here, for the in-process
    test), within ``budget`` seconds."""
    c = SMOKE if smoke else FULL
    rec = Recorder(out)
    meta = {
        "device": "cpu (smoke)" if smoke else _device_name(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "config": c,
        "fault": os.environ.get(FAULT_ENV),
        "WINNOW_KERNELS": os.environ.get("WINNOW_KERNELS"),
    }
    rec.save({"meta": meta, "sections": {}})
    print("sizes:", sizes_line(c), flush=True)
    t_end = time.time() + budget
    names = [n for n in SECTIONS if only is None or n in only]
    for i, name in enumerate(names):
        left = t_end - time.time() - 3 * (len(names) - i - 1)  # a few seconds kept for each later one
        if left < 5:
            rec.end(name, 0.0, f"not run: the check's budget of {budget:.0f}s was spent")
            continue
        t0 = time.time()
        print(f"== {name}", flush=True)
        if in_process:
            run_section(out, name, smoke)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--section", name] + (
            ["--cpu-smoke"] * smoke
        )
        try:  # the child inherits this environment (PYTHONPATH included)
            rc = subprocess.run(cmd, timeout=min(left, SECTIONS[name] * (3 if smoke else 1))).returncode
            why = None if rc == 0 else f"section process exited with rc={rc}"
        except subprocess.TimeoutExpired:
            why = "section process timed out and was killed"
        if why or not rec.load()["sections"].get(name, {}).get("done"):
            rec.end(name, time.time() - t0, why or "section process ended without closing the section")
    data = rec.load()
    for name, s in data["sections"].items():
        paths = ", ".join(f"{e['path']}:{'ok' if e['ok'] else 'FAILED'}" for e in s.get("result", []))
        print(f"{name:>13} ok={s.get('ok')} {s.get('seconds')}s  {paths}  {s.get('error', '')}", flush=True)
    return exit_status(data)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--section", choices=list(SECTIONS))
    ap.add_argument("--preflight", action="store_true")
    ap.add_argument("--budget", type=float, default=190.0, help="seconds for every section together")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    if a.preflight:
        import gpu_preflight

        return gpu_preflight.main(a.outdir, a.cpu_smoke)
    if a.section:
        run_section(a.outdir, a.section, a.cpu_smoke)
        return 0
    return drive(a.outdir, a.cpu_smoke, a.budget)


if __name__ == "__main__":
    sys.exit(main())
