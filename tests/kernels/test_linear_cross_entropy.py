"""Weighted linear cross-entropy: the Triton kernel (interpreted on CPU) and the chunked reference,
both against a float64 full-logit computation written here with plain autograd.

Tolerances, as max |error| / max |expected| over a tensor: fp32 inputs 2e-5 (fp32 accumulation over
D <= 96 and V ~ 1000 terms); bf16 inputs 2e-2 on gradients (they are returned in bf16, whose spacing
is 2^-8 = 3.9e-3 relative, and dL/dz is rounded to bf16 before the gradient GEMMs; fp16, 8x finer:
4e-3) and 1e-4 on the loss
(fp32 accumulation of exact products of bf16 values). The float64 expectation is computed from the
very (bf16-rounded) values the kernel sees, so only the kernel's arithmetic is measured.
"""

from __future__ import annotations

import math

import pytest
import torch

from winnow.kernels import switch
from winnow.kernels.linear_cross_entropy import linear_cross_entropy_reference

# the kernel tests run natively where there is a GPU (the GPU check runs this file), interpreted elsewhere
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-4, 2e-2), torch.float16: (1e-4, 4e-3)}  # (loss, grads)


def _triton():
    from winnow.kernels import triton_linear_cross_entropy as tk

    return tk


def _inputs(n, v, d, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 2.0 / math.sqrt(d)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    wt = torch.rand(n, generator=g) * 2.0  # fractional, some > 1
    wt[torch.rand(n, generator=g) < 0.3] = 0.0  # ~30% rows of weight 0
    wt[0] = 0.75  # never all zero
    return h, w, b, y, wt


def _full_float64(h, w, b, y, wt, softcap):
    """Σ w·CE over materialised float64 logits, and the gradients by autograd."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    z = h64 @ w64.T + (0.0 if b64 is None else b64)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = (wt.double() * (torch.logsumexp(z, -1) - z[torch.arange(len(y)), y])).sum()
    loss.backward()
    return loss.detach(), h64.grad, w64.grad, (None if b64 is None else b64.grad)


def _run(fn, h, w, b, y, wt, softcap):
    """Loss and gradients of ``fn`` computed on DEV, returned on the CPU."""
    leaf = lambda t: t.detach().to(DEV, copy=True).requires_grad_()  # noqa: E731 - never the caller's tensor
    h, w = leaf(h), leaf(w)
    b = None if b is None else leaf(b)
    loss = fn(h, w, y.to(DEV), wt.to(DEV), bias=b, softcap=softcap)
    loss.backward()
    return tuple(None if t is None else t.detach().cpu() for t in (loss, h.grad, w.grad, None if b is None else b.grad))


def _rel(got, want):
    want = want.cpu()
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check(got, want, dtype):
    tol_loss, tol_grad = TOL[dtype]
    assert _rel(got[0], want[0]) < tol_loss, (got[0], want[0])
    for name, a, e in zip(("grad h", "grad W", "grad b"), got[1:], want[1:], strict=True):
        if e is None:
            assert a is None
            continue
        assert a.dtype == dtype, name
        assert _rel(a, e) < tol_grad, (name, _rel(a, e))


# (N, V, D): the awkward shape, fewer rows than a block, more rows than one block
SHAPES = [(123, 1007, 96), (7, 300, 40), (200, 513, 24)]
POSTS = [(False, None), (True, None), (False, 4.0), (True, 2.5)]  # (bias, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,d", SHAPES)
def test_triton_matches_float64(n, v, d, dtype):
    h, w, b, y, wt = _inputs(n, v, d, dtype, seed=n + v)
    _check(_run(_triton().linear_cross_entropy_triton, h, w, b, y, wt, None), _full_float64(h, w, b, y, wt, None), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,softcap", POSTS[1:])
def test_triton_bias_softcap_match_float64(bias, softcap, dtype):
    h, w, b, y, wt = _inputs(123, 1007, 96, dtype, seed=7, bias=bias)
    want = _full_float64(h, w, b, y, wt, softcap)
    _check(_run(_triton().linear_cross_entropy_triton, h, w, b, y, wt, softcap), want, dtype)


def test_triton_fp16_matches_float64():
    h, w, b, y, wt = _inputs(123, 1007, 96, torch.float16, seed=17, bias=True)
    want = _full_float64(h, w, b, y, wt, 5.0)
    _check(_run(_triton().linear_cross_entropy_triton, h, w, b, y, wt, 5.0), want, torch.float16)


@pytest.mark.parametrize(
    "bias,softcap,chunk,dtype",
    [(b, c, k, torch.float32) for (b, c) in POSTS for k in (0, 16)] + [(True, 2.5, 1000, torch.float64)],
)
def test_reference_matches_float64(bias, softcap, chunk, dtype):
    h, w, b, y, wt = _inputs(123, 1007, 96, dtype, seed=11, bias=bias)
    got = _run(
        lambda *a, **k: linear_cross_entropy_reference(*a, **k, chunk=chunk), h, w, b, y, wt, softcap
    )
    want = _full_float64(h, w, b, y, wt, softcap)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    assert _rel(got[0], want[0]) < tol
    for a, e in zip(got[1:], want[1:], strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            assert _rel(a, e) < tol


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_weight_zero_rows_are_never_computed(impl):
    """Rows of weight 0 hold NaN: any arithmetic on them would poison the loss or the gradients."""
    fn = _triton().linear_cross_entropy_triton if impl == "triton" else linear_cross_entropy_reference
    h, w, b, y, wt = _inputs(123, 1007, 96, torch.float32, seed=3, bias=True)
    keep = wt != 0
    h_nan = h.clone()
    h_nan[~keep] = float("nan")
    got = _run(fn, h_nan, w, b, y, wt, 3.0)
    want = _full_float64(h[keep], w, b, y[keep], wt[keep], 3.0)
    assert torch.isfinite(got[0]) and _rel(got[0], want[0]) < 2e-5
    assert torch.all(got[1][~keep] == 0)
    assert _rel(got[1][keep], want[1]) < 2e-5
    assert _rel(got[2], want[2]) < 2e-5 and _rel(got[3], want[3]) < 2e-5


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_all_rows_weight_zero(impl):
    fn = _triton().linear_cross_entropy_triton if impl == "triton" else linear_cross_entropy_reference
    h, w, b, y, _ = _inputs(9, 300, 40, torch.float32, seed=5, bias=True)
    loss, gh, gw, gb = _run(fn, h, w, b, y, torch.zeros(9), None)
    assert loss.item() == 0.0 and not gh.any() and not gw.any() and not gb.any()


def test_out_of_range_target_is_an_error():
    h, w, _, y, wt = _inputs(20, 300, 40, torch.float32, seed=2)
    y[3], wt[3] = 300, 1.0
    y[4], wt[4] = -100, 0.0  # a weight-0 row's target is never read: an ignore index there is fine
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        _run(_triton().linear_cross_entropy_triton, h, w, None, y, wt, None)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_ignore_index_on_weight_zero_rows_is_fine(impl):
    fn = _triton().linear_cross_entropy_triton if impl == "triton" else linear_cross_entropy_reference
    h, w, _, y, wt = _inputs(20, 300, 40, torch.float32, seed=2)
    y[wt == 0] = -100
    got = _run(fn, h, w, None, y, wt, None)
    keep = wt != 0
    assert _rel(got[0], _full_float64(h[keep], w, None, y[keep], wt[keep], None)[0]) < 2e-5


def test_backward_scales_by_upstream_gradient():
    tk = _triton()
    h, w, _, y, wt = _inputs(50, 300, 40, torch.float32, seed=9)
    hh = h.to(DEV, copy=True).requires_grad_()
    (tk.linear_cross_entropy_triton(hh, w.to(DEV), y.to(DEV), wt.to(DEV)) * -2.5).backward()
    want = _full_float64(h, w, None, y, wt, None)[1]
    assert _rel(hh.grad.cpu(), -2.5 * want) < 2e-5


def test_backward_chunks_agree(monkeypatch):
    """Several backward chunks (a small GRAD_CHUNK_ELEMENTS) give the one-chunk answer."""
    tk = _triton()
    h, w, b, y, wt = _inputs(123, 300, 40, torch.float32, seed=13, bias=True)
    want = _full_float64(h, w, b, y, wt, None)
    monkeypatch.setattr(tk, "GRAD_CHUNK_ELEMENTS", 300 * 17)  # 17 rows per chunk
    _check(_run(tk.linear_cross_entropy_triton, h, w, b, y, wt, None), want, torch.float32)


# ------------------------------------------------------------------------------------- the switch
def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize(
    "mode,expect", [("triton", "triton"), ("reference", "reference"), ("auto", "reference")]  # auto: fp32 -> reference
)
def test_switch_routes(monkeypatch, mode, expect):
    import winnow.kernels.switch as sw

    tk = _triton()
    monkeypatch.setenv("WINNOW_KERNELS", mode)
    tri = _spy(monkeypatch, tk, "linear_cross_entropy_triton")
    ref = _spy(monkeypatch, sw, "linear_cross_entropy_reference")
    h, w, _, y, wt = (None if t is None else t.to(DEV) for t in _inputs(10, 64, 16, torch.float32, seed=1))
    sw.linear_cross_entropy(h, w, y, wt)
    assert (tri if expect == "triton" else ref) and not (ref if expect == "triton" else tri)


def test_switch_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("WINNOW_KERNELS", "fast")
    with pytest.raises(ValueError, match="WINNOW_KERNELS"):
        switch.backend("cpu")


def test_interpreter_is_active():
    """The conftest's TRITON_INTERPRET reached the kernels (else they would need a GPU)."""
    if torch.cuda.is_available():
        pytest.skip("native Triton on CUDA")
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_triton()._lse_fwd_kernel, InterpretedFunction)


# ------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("v", [32768, 131072])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_large_vocab_on_gpu(v, dtype):
    """The float64 expectation is computed on the GPU too (fp64 on CPU would take minutes here)."""
    h, w, b, y, wt = (None if t is None else t.cuda() for t in _inputs(1024, v, 512, dtype, seed=v, bias=True))
    want = _full_float64(h, w, b, y, wt, 30.0)
    _check(_run(_triton().linear_cross_entropy_triton, h, w, b, y, wt, 30.0), want, dtype)
