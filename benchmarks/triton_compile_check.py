"""Compile the Triton kernels natively for a GPU architecture without having the GPU.

The interpreter (CPU tests) checks the maths but not what only the compiler sees: unsupported
constructs, register pressure and spills, shared memory, whether the K loop is software-pipelined.
``triton.compile`` with a ``GPUTarget`` runs the whole pipeline to a cubin (triton ships ptxas), and
``cuobjdump --dump-resource-usage`` reads registers and stack (spill) bytes from it.

Pointers and integer sizes are compiled as 16-divisible, as a real launch specialises them for
D = 2048, V = 128k and aligned tensors (without that hint Triton does not pipeline the loads).

Run: ``python benchmarks/triton_compile_check.py [--arch 90] [--sweep]`` (exit 1 if any kernel fails to
compile). ``--sweep`` compiles a few other block configurations for comparison.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from winnow.kernels import triton_linear_cross_entropy as tk

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INTS_FWD = ["n_rows", "vocab", "dim", "dim2", "stride_h", "stride_w", "stride_h2", "stride_w2", "v_per_split"]
FLOATS_FWD = ["scale", "softcap", "scale2", "softcap2", "beta"]
INTS_GRAD = ["n_rows", "vocab", "dim", "stride_h", "stride_w", "stride_g"]


def _types(fn, dt: str) -> dict[str, str]:
    ints = INTS_FWD if fn is tk._lse_fwd_kernel else INTS_GRAD
    t = {n: "i32" for n in ints}
    t.update({n: "fp32" for n in FLOATS_FWD + ["softcap"]})
    t.update({n: f"*{dt}" for n in ["h_ptr", "w_ptr", "b_ptr", "h2_ptr", "w2_ptr", "b2_ptr", "g_ptr"]})
    t.update({"y_ptr": "*i64", "out_ptr": "*fp32", "lse_ptr": "*fp32", "coef_ptr": "*fp32"})
    return t


def compile_kernel(fn, dt: str, consts: dict, warps: int, stages: int, arch: int):
    types = _types(fn, dt)
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cx[(i,)] = "constexpr", consts[name]
            continue
        sig[name] = types[name]
        if sig[name].startswith("*") or (sig[name] == "i32" and name != "n_rows"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def usage(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return {"regs": int(reg.group(1)) if reg else None, "spill_stack_bytes": int(stack.group(1)) if stack else None,
            "smem_bytes": kernel.metadata.shared, "cp_async": "cp.async" in kernel.asm["ptx"]}


def variants(blk: tk.Blocks | None):
    """(name, kernel, dtype, constexprs, blocks); ``blk`` None: the module's own choice per variant."""
    for dt, contrast, post in itertools.product(("bf16", "fp32"), (False, True), (False, True)):
        blocks = blk or tk._blocks(2048, contrast=contrast)
        b = {"BLOCK_M": blocks.m, "BLOCK_V": blocks.v, "BLOCK_D": blocks.d}
        flags = {"IEEE": dt == "fp32", "UPCAST": False, "HAS_BIAS": post, "HAS_CAP": post}
        fwd = {**flags, "HAS_BIAS2": post, "HAS_CAP2": post, "CONTRAST": contrast, **b}
        yield f"fwd {dt}{' contrast' if contrast else ''}{' bias+cap' if post else ''}", tk._lse_fwd_kernel, dt, fwd, blocks
        if not contrast:
            yield f"grad {dt}{' bias+cap' if post else ''}", tk._grad_logits_kernel, dt, {**flags, **b}, blocks


def check(blk: tk.Blocks | None, arch: int) -> bool:
    ok = True
    for name, fn, dt, consts, blocks in variants(blk):
        try:
            u = usage(compile_kernel(fn, dt, consts, blocks.warps, blocks.stages, arch))
            print(f"{name:<28} {blocks}: {u}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
            ok = False
            print(f"{name:<28} {blocks}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    configs: list[tk.Blocks | None] = [None]  # the module's choices
    if a.sweep:
        configs += [tk.Blocks(64, 64, 64, 4, 3), tk.Blocks(128, 64, 64, 8, 3), tk.Blocks(64, 128, 32, 4, 4)]
    ok = all([check(blk, a.arch) for blk in configs])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
