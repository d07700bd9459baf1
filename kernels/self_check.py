"""A one-time self-check of each Triton head kernel before ``WINNOW_KERNELS=auto`` trusts it.

The kernels were checked under the CPU interpreter and compiled for sm_90, but a GPU run can still
fault (a launch error, an illegal address) or return wrong numbers (a miscompiled tile). So the
switch's ``auto`` mode sends a call to Triton only after this module has run that kernel once, per
process, on a small ragged case for the same *key* (kernel, device, dtype, bias present, soft-cap
present), and compared it with the PyTorch reference:

* the case: N = 200 rows (about 30% of them weight 0 for the training loss), V = 4099 (no power of
  two: the last vocabulary tile is partial), D = 136 (not a multiple of the K block), logits spread
  over ~±10 so the soft-cap and the softmax tails matter; run with the launcher's own vocabulary split
  and with 1 and 3 forced splits (the split merge is where a wrong state would show);
* the comparison: the training loss and its three gradients (``h``, ``W``, ``b``) against the chunked
  reference in float64 on the same (dtype-rounded) inputs; log-prob, entropy and the contrast score
  against :mod:`winnow.kernels.chunked_head`. Tolerances (:data:`TOLERANCE`): values within
  ``tol·(1 + |ref|)``; gradients within ``tol`` times the reference's largest entry. The forward's
  products are exact in every dtype (bf16 x bf16 fits fp32; fp32 uses IEEE, never TF32) and sums are
  fp32, so values get 1e-4 (fp32) and 5e-4 (bf16/fp16); the bf16/fp16 backward writes ``dL/dz`` in the
  input dtype (relative rounding 2^-8) before two GEMMs, hence 3e-2 on its gradients.

On an exception or a result outside tolerance the check warns once (saying which kernel, key and
difference) and pins the reference for that key for the rest of the process. A key passes or fails
as a whole. Under ``torchrun`` a caller that reaches this at the same point on every rank (the
trainer, :mod:`winnow.trainer.kernel_agreement`) passes ``reduce`` so every rank pins the same backend;
a lazy check (first call of a pass) stays per rank, since ranks need not reach it together.

Cost: one small launch of each kernel variant (which compiles it: it would compile on first use
anyway) plus the float64 reference on 200 x 4099: well under a second on a GPU once compiled; a few
seconds under the CPU interpreter (the tests use it there).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from winnow.kernels import chunked_head
from winnow.kernels.linear_cross_entropy import linear_cross_entropy_reference

OPS = ("linear_ce", "logprob_entropy", "contrast")
SHAPE = (200, 4099, 136)  # N, V, D
FORCED_SPLITS = (None, 1, 3)  # None: the launcher's own choice
SOFTCAP = 5.0
# dtype -> (value atol/rtol, gradient tolerance relative to the reference's largest entry)
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-4, 3e-2), torch.float16: (5e-4, 3e-2)}

Key = tuple[str, str, str, bool, bool]
_verdicts: dict[Key, str | None] = {}  # key -> None (passed) or what failed


def key(op: str, device: torch.device | str, dtype: torch.dtype, bias: bool, softcap: bool) -> Key:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" means the current device: name it
        dev = torch.device("cuda", torch.cuda.current_device())
    return (op, str(dev), str(dtype).removeprefix("torch."), bool(bias), bool(softcap))


def report() -> dict[str, str | None]:
    """Every key checked in this process -> ``None`` (passed) or what failed."""
    return {"/".join(map(str, k)): v for k, v in _verdicts.items()}


def reset() -> None:
    _verdicts.clear()


def passes(
    op: str,
    device: torch.device | str,
    dtype: torch.dtype,
    bias: bool,
    softcap: bool,
    reduce: Callable[[bool], bool] | None = None,
) -> bool:
    """Whether the Triton ``op`` may run for this key; checks it the first time (and warns on failure).

    ``reduce`` (optional) maps this process's verdict to the one every rank agrees on."""
    k = key(op, device, dtype, bias, softcap)
    if k not in _verdicts:
        t0 = time.perf_counter()
        _verdicts[k] = run_check(op, torch.device(k[1]), dtype, bias, softcap)
        _warn(k, _verdicts[k], f"after {time.perf_counter() - t0:.1f}s")
    if reduce is not None:  # called on every rank, even when this one had checked the key before
        agreed = reduce(_verdicts[k] is None)
        if not agreed and _verdicts[k] is None:
            _verdicts[k] = "another rank's self-check failed (every rank pins the reference)"
            _warn(k, _verdicts[k], "on agreement")
    return _verdicts[k] is None


def _warn(k: Key, failure: str | None, when: str) -> None:
    if failure is not None:
        warnings.warn(
            f"WINNOW_KERNELS=auto: the Triton {k[0]} kernel failed its self-check on {k[1]} ({k[2]}, bias={k[3]}, "
            f"softcap={k[4]}) {when}: {failure}; this process uses the PyTorch reference for it "
            "(WINNOW_KERNELS=reference skips the check)",
            RuntimeWarning,
            stacklevel=4,
        )


def run_check(op: str, device: torch.device, dtype: torch.dtype, bias: bool, softcap: bool) -> str | None:
    """``None`` when the kernel matches the reference on the check's case, else what went wrong."""
    if op not in OPS:
        raise ValueError(f"unknown kernel {op!r}: one of {', '.join(OPS)}")
    # the first call may come from an evaluation (no_grad), a pass (inference_mode) or a forward under
    # autocast: none of them may change the check (autocast would turn the reference's fp32 into bf16)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        return _run_checks(op, device, dtype, bias, softcap)


def _run_checks(op: str, device: torch.device, dtype: torch.dtype, bias: bool, softcap: bool) -> str | None:
    try:
        from winnow.kernels import triton_linear_cross_entropy as tk

        for splits in FORCED_SPLITS:
            saved, tk.FORCE_SPLITS = tk.FORCE_SPLITS, splits
            try:
                failure = _CHECKS[op](tk, device, dtype, bias, softcap, grads=splits is None)
            finally:
                tk.FORCE_SPLITS = saved
            if failure is not None:
                return f"{failure} (vocabulary splits: {splits or 'auto'})"
    except Exception as e:  # noqa: BLE001 - any failure of an unproven kernel means: do not use it
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _case(device, dtype, bias: bool, seed: int = 0, d: int | None = None):
    n, v, dim = SHAPE
    dim = d or dim
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g) * 2
    w = torch.randn(v, dim, generator=g) * (2.0 / dim**0.5)  # logits ~ N(0, 16): spread, some capped
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    wt = torch.rand(n, generator=g) + 0.1
    wt[torch.rand(n, generator=g) < 0.3] = 0.0  # ragged: weight-0 rows are compacted away
    put = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return put(h), put(w), put(b), y.to(device), wt.to(device)


def _value_diff(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    got, want = got.detach().double(), want.detach().double()
    bad = (got - want).abs() - tol * (1 + want.abs())
    if not torch.isfinite(got).all() or bad.max() > 0:
        return f"{name}: max |diff| {float((got - want).abs().max()):.3g} > {tol:g}·(1+|ref|)"
    return None


def _grad_diff(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    got, want = got.double(), want.double()
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    if not torch.isfinite(got).all() or diff > tol * scale:
        return f"grad {name}: max |diff| {diff:.3g} > {tol:g} x max |ref| {scale:.3g}"
    return None


def _check_linear_ce(tk, device, dtype, bias, softcap, grads: bool) -> str | None:
    vtol, gtol = TOLERANCE[dtype]
    h, w, b, y, wt = _case(device, dtype, bias)
    cap = SOFTCAP if softcap else None
    leaves = [x.detach().clone().requires_grad_(grads) for x in (h, w) + ((b,) if bias else ())]
    got = tk.linear_cross_entropy_triton(leaves[0], leaves[1], y, wt, leaves[2] if bias else None, cap)
    ref_leaves = [x.detach().double().requires_grad_(grads) for x in leaves]
    want = linear_cross_entropy_reference(
        ref_leaves[0], ref_leaves[1], y, wt.double(), ref_leaves[2] if bias else None, cap
    )
    failure = _value_diff("loss", got, want, vtol)
    if failure is None and grads:
        (0.5 * got).backward()  # a non-unit incoming gradient: the backward must scale by it
        (0.5 * want).backward()
        for name, a, r in zip("hWb", leaves, ref_leaves, strict=False):
            failure = failure or _grad_diff(name, a.grad, r.grad, gtol)
    return failure


def _check_logprob_entropy(tk, device, dtype, bias, softcap, grads: bool) -> str | None:
    vtol = TOLERANCE[dtype][0]
    h, w, b, y, _ = _case(device, dtype, bias, seed=1)
    head = chunked_head.LMHead(w, b, 0.75, SOFTCAP if softcap else None)
    lp, ent = tk.logprob_entropy_triton(head, h, y)
    ref_lp, ref_ent = chunked_head.logprob_entropy(head, h, y)
    return _value_diff("log-prob", lp, ref_lp, vtol) or _value_diff("entropy", ent, ref_ent, vtol)


def _check_contrast(tk, device, dtype, bias, softcap, grads: bool) -> str | None:
    vtol = TOLERANCE[dtype][0]
    h, w, b, y, _ = _case(device, dtype, bias, seed=2)
    h2, w2, b2, _, _ = _case(device, dtype, bias, seed=3, d=72)  # the other model may be narrower
    cap = SOFTCAP if softcap else None
    pos, neg = chunked_head.LMHead(w, b, 1.0, cap), chunked_head.LMHead(w2, b2, 0.5, cap)
    got = tk.contrast_scores_triton(pos, h, neg, h2, y, beta=0.5)
    want = chunked_head.contrast_scores(pos, h, neg, h2, y, beta=0.5)
    for name, a, r in zip(("p_CE", "log-prob pos", "log-prob neg"), got, want, strict=True):
        failure = _value_diff(name, a, r, vtol)
        if failure:
            return failure
    return None


_CHECKS = {
    "linear_ce": _check_linear_ce,
    "logprob_entropy": _check_logprob_entropy,
    "contrast": _check_contrast,
}
