"""Triton kernels for the LM head without ``[N, V]`` logits: weighted linear cross-entropy (forward and
backward), per-token log-prob and entropy, and the cDPO contrast score.

Same maths and signatures as the references (:mod:`.linear_cross_entropy`, :mod:`.chunked_head`);
:mod:`.switch` picks one. Design decisions:

* **Forward = one fused online-log-sum-exp kernel.** A program owns ``BLOCK_M`` rows and one slice of
  the vocabulary; it walks its slice in ``BLOCK_V`` tiles, each tile a ``tl.dot`` over D in ``BLOCK_D``
  steps (inputs in the weight's dtype, fp32 accumulation; fp32 inputs use IEEE fp32, not TF32), applies
  bias, logit scale and the tanh soft-cap, and folds the tile into a running ``(max, sum exp, sum exp *
  (s - max))`` per row plus the target logit. Logits never leave registers. The vocabulary is split
  across ``S`` programs per row block so a small batch still fills the GPU (a 4096-row batch is only 64
  row blocks for 132 SMs); the ``S`` partial states (``4 * S * N`` floats) are merged in PyTorch. The entropy term
  is kept relative to the running max and rebased exactly when the max moves, so ``H = log l - t / l``
  has no cancellation against large logits.
* **Backward recomputes the logits** (nothing ``[N, V]`` is saved): rows are processed in chunks of
  ``C`` with ``C * V`` bounded by a fixed budget (64 Mi elements by default, 128 MiB in bf16), so
  memory beyond W and its gradient does not grow with V. A Triton kernel recomputes each
  ``(BLOCK_M, BLOCK_V)`` logit tile and writes ``dL/dz = c_i * (softmax - onehot) * ds/dz`` in the
  weight's dtype into the chunk buffer; ``grad h = G W`` and ``grad W += G^T h`` are then two cuBLAS
  GEMMs (``grad W`` accumulates in fp32 via ``out_dtype`` where the backend supports it). Cost: one
  extra logit GEMM versus a materialised-logits backward (4 N V D multiply-adds instead of 3).
* **Rows of weight 0 are compacted away** before any kernel runs (``nonzero`` + ``index_select``).
* ``@triton.jit`` functions are created when this module is imported, and triton 3.x decides there
  whether they are interpreted (``TRITON_INTERPRET=1``): import this module only through the switch.
  Under the interpreter one config and big blocks (cost is per program instance, ~ms each).

Nothing here has run on a GPU yet: ``tests/kernels`` check the maths under the interpreter (float64
references), ``benchmarks/triton_compile_check.py`` compiles every variant for sm_90 without a GPU
(no spills, pipelined K loop), and ``benchmarks/gpu_check.sh`` runs the tests and timings natively.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# elements of the backward's per-chunk dL/dz buffer (C rows * V): 128 MiB in bf16, 256 MiB in fp32
GRAD_CHUNK_ELEMENTS = 64 * 1024 * 1024
# vocabulary slices per row block when set (the self-check, kernels/self_check.py, runs 1 and 3 as well as
# the launcher's own choice: the merge of split states is where a wrong state would show)
FORCE_SPLITS: int | None = None


@dataclass(frozen=True)
class Blocks:
    m: int
    v: int
    d: int
    warps: int
    stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(d: int, contrast: bool = False) -> Blocks:
    """Block sizes. Compiled for sm_90 without a GPU (``benchmarks/triton_compile_check.py``, triton 3.9,
    16-divisible sizes): 64x128x64, 8 warps, 3 stages pipelines the K loop (cp.async, 72 KiB shared in
    bf16) with 148-206 registers and no spills; the contrast variant (three online states) spilled
    656 bytes in fp32 at that size and none at 64x64x32 (184 registers). Not yet timed on a GPU."""
    if _interpreting():  # few, big programs: the interpreter pays per program instance
        return Blocks(m=128, v=256, d=min(128, max(16, triton.next_power_of_2(d))), warps=4, stages=1)
    if contrast:
        return Blocks(m=64, v=64, d=32, warps=8, stages=3)
    return Blocks(m=64, v=128, d=64, warps=8, stages=3)


def _dot_flags(w: torch.Tensor) -> dict:
    """IEEE: exact fp32 dot (fp32 weights, or operands upcast for the interpreter). UPCAST: under the
    triton 3.9 interpreter a bf16 ``tl.dot`` returned ~1e10 for O(10) logits, so bf16/fp16 tiles are
    converted to fp32 first there (exact: products of bf16 or fp16 values fit fp32's mantissa)."""
    return {"IEEE": w.dtype == torch.float32 or _interpreting(), "UPCAST": _interpreting()}


def _splits(rows: int, vocab: int, blk: Blocks, device: torch.device) -> int:
    """Vocabulary slices per row block: enough programs for the GPU, one under the interpreter."""
    tiles = triton.cdiv(vocab, blk.v)
    if FORCE_SPLITS:
        return max(1, min(tiles, FORCE_SPLITS))
    if _interpreting() or rows == 0 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, triton.cdiv(rows, blk.m))
    return max(1, min(tiles, want))


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, dim, stride_h, stride_w,
                scale, softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, IEEE: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 post-processed logits s and dz->ds factor (1 without a cap)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h  # int64: V * D passes 2^31 for big heads
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_rows + ks[None, :], mask=(rows[:, None] < n_rows) & (ks[None, :] < dim), other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=(cols[:, None] < vocab) & (ks[None, :] < dim), other=0.0)
        if UPCAST:  # interpreter only: see _dot_flags
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # fp32 operands (or upcast ones): exact fp32 products, never TF32
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    dsdz = tl.full((BLOCK_M, BLOCK_V), 1.0, tl.float32)
    if HAS_CAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both tails (exp -> inf gives 1, exp -> 0 gives -1)
        th = 1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0)
        acc = softcap * th
        dsdz = 1.0 - th * th
    return acc, dsdz * scale


@triton.jit
def _online(m, tot, t, s, colmask):
    """Fold a tile into the running (max, sum e^(s-m), sum e^(s-m) * (s-m)) of each row."""
    s = tl.where(colmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(s - m_new[:, None])
    d = tl.where(colmask[None, :], s - m_new[:, None], 0.0)
    t = alpha * (t + (m - m_new) * tot) + tl.sum(e * d, axis=1)
    tot = alpha * tot + tl.sum(e, axis=1)
    return m_new, tot, t


@triton.jit
def _store_state(out_ptr, split, n_rows, rows, m, tot, t, zy):
    base = out_ptr + split * 4 * n_rows
    ok = rows < n_rows
    tl.store(base + rows, m, mask=ok)
    tl.store(base + n_rows + rows, tot, mask=ok)
    tl.store(base + 2 * n_rows + rows, t, mask=ok)
    tl.store(base + 3 * n_rows + rows, zy, mask=ok)


@triton.jit
def _lse_fwd_kernel(
    h_ptr, w_ptr, b_ptr, h2_ptr, w2_ptr, b2_ptr, y_ptr, out_ptr,
    n_rows, vocab, dim, dim2, stride_h, stride_w, stride_h2, stride_w2, v_per_split,
    scale, softcap, scale2, softcap2, beta,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_CAP2: tl.constexpr,
    CONTRAST: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (row block, vocabulary slice): online states of head 1 (and, for CONTRAST, of head 2 and
    of (1+beta) s1 - beta s2). out: (streams, splits, 4, n_rows) = max, sum, entropy term, target."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    y = tl.load(y_ptr + rows, mask=rows < n_rows, other=0)
    m1 = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # finite "-inf": (m - m_new) * 0 stays 0, never NaN
    l1 = tl.zeros((BLOCK_M,), tl.float32)
    t1 = tl.zeros((BLOCK_M,), tl.float32)
    zy1 = tl.zeros((BLOCK_M,), tl.float32)
    m2, l2, t2, zy2 = m1, l1, t1, zy1
    m3, l3, t3, zy3 = m1, l1, t1, zy1
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, vocab)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        colmask = cols < v_hi
        hit = (cols[None, :] == y[:, None]) & colmask[None, :]
        s1, _ = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, dim, stride_h, stride_w,
                            scale, softcap, HAS_BIAS, HAS_CAP, IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_D)
        m1, l1, t1 = _online(m1, l1, t1, s1, colmask)
        zy1 += tl.sum(tl.where(hit, s1, 0.0), axis=1)
        if CONTRAST:
            s2, _ = _logit_tile(h2_ptr, w2_ptr, b2_ptr, rows, cols, n_rows, vocab, dim2, stride_h2,
                                stride_w2, scale2, softcap2, HAS_BIAS2, HAS_CAP2, IEEE, UPCAST,
                                BLOCK_M, BLOCK_V, BLOCK_D)
            m2, l2, t2 = _online(m2, l2, t2, s2, colmask)
            zy2 += tl.sum(tl.where(hit, s2, 0.0), axis=1)
            s3 = (1.0 + beta) * s1 - beta * s2
            m3, l3, t3 = _online(m3, l3, t3, s3, colmask)
            zy3 += tl.sum(tl.where(hit, s3, 0.0), axis=1)
    _store_state(out_ptr, split, n_rows, rows, m1, l1, t1, zy1)
    if CONTRAST:
        _store_state(out_ptr + n_splits * 4 * n_rows, split, n_rows, rows, m2, l2, t2, zy2)
        _store_state(out_ptr + 2 * n_splits * 4 * n_rows, split, n_rows, rows, m3, l3, t3, zy3)


@triton.jit
def _grad_logits_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, g_ptr,
    n_rows, vocab, dim, stride_h, stride_w, stride_g, softcap,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g[i, v] = coef_i * (softmax(s_i)[v] - [v == y_i]) * ds/dz, one recomputed tile per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < n_rows
    s, dsdz = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, dim, stride_h, stride_w,
                          1.0, softcap, HAS_BIAS, HAS_CAP, IEEE, UPCAST, BLOCK_M, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    p = tl.exp(s - lse[:, None])
    p = tl.where(cols[None, :] == y[:, None], p - 1.0, p)
    g = p * dsdz * coef[:, None]
    ok = rmask[:, None] & (cols[None, :] < vocab)
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


def _merge(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(splits, 4, n) partial states -> lse (n,), entropy (n,), target logit (n,), all fp32."""
    m, tot, t, zy = state.unbind(1)
    big = m.amax(0)
    a = torch.exp(m - big)
    total = (a * tot).sum(0)
    ent_num = (a * (t + (m - big) * tot)).sum(0)  # sum e^(s - big) * (s - big), rebased per split
    log_total = torch.log(total)
    return big + log_total, log_total - ent_num / total, zy.sum(0)


def _prep(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_targets(y: torch.Tensor, vocab: int) -> None:
    """The kernels pick the target logit by comparison, so an id outside [0, V) would silently give
    logit 0 (the reference's gather raises): check once (one host sync)."""
    if y.numel():
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"target ids must lie in [0, {vocab}); got min {lo}, max {hi}")


def _run_lse(h, w, b, y, scale, softcap, second=None, beta: float = 0.0) -> torch.Tensor:
    """Launch the forward kernel; returns the raw (streams, splits, 4, n) state."""
    n, d = h.shape
    vocab = w.shape[0]
    _check_targets(y, vocab)
    blk = _blocks(max(d, second[0].shape[1]) if second else d, contrast=second is not None)
    splits = _splits(n, vocab, blk, h.device)
    v_per = triton.cdiv(triton.cdiv(vocab, splits), blk.v) * blk.v
    splits = triton.cdiv(vocab, v_per)  # no empty slice
    streams = 3 if second else 1
    out = torch.empty((streams, splits, 4, n), dtype=torch.float32, device=h.device)
    if n == 0:  # every row had weight 0: nothing to launch
        return out
    h2, w2, b2, scale2, cap2 = second if second else (h, w, b, scale, softcap)
    grid = (triton.cdiv(n, blk.m), splits)
    _lse_fwd_kernel[grid](
        h, w, b if b is not None else w, h2, w2, b2 if b2 is not None else w2, y, out,
        n, vocab, d, h2.shape[1], h.stride(0), w.stride(0), h2.stride(0), w2.stride(0), v_per,
        float(scale), float(softcap or 1.0), float(scale2), float(cap2 or 1.0), float(beta),
        HAS_BIAS=b is not None, HAS_CAP=softcap is not None, HAS_BIAS2=b2 is not None,
        HAS_CAP2=cap2 is not None, CONTRAST=second is not None, **_dot_flags(w),
        BLOCK_M=blk.m, BLOCK_V=blk.v, BLOCK_D=blk.d, num_warps=blk.warps, num_stages=blk.stages,
    )
    return out


def _grad_logits(h, w, b, y, lse, coef, softcap) -> torch.Tensor:
    n, d = h.shape
    vocab = w.shape[0]
    blk = _blocks(d)
    g = torch.empty((n, vocab), dtype=w.dtype, device=h.device)
    if n == 0:
        return g
    grid = (triton.cdiv(n, blk.m), triton.cdiv(vocab, blk.v))
    _grad_logits_kernel[grid](
        h, w, b if b is not None else w, y, lse, coef, g, n, vocab, d, h.stride(0), w.stride(0),
        g.stride(0), float(softcap or 1.0), HAS_BIAS=b is not None, HAS_CAP=softcap is not None,
        **_dot_flags(w), BLOCK_M=blk.m, BLOCK_V=blk.v, BLOCK_D=blk.d,
        num_warps=blk.warps, num_stages=blk.stages,
    )
    return g


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 output when the backend has it (CUDA ``out_dtype``); otherwise the
    product is rounded to a/b's dtype once per chunk before the fp32 sum."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    except (RuntimeError, TypeError, NotImplementedError):
        acc.add_(a @ b)


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weight, softcap):
        rows = torch.nonzero(token_weight != 0).squeeze(-1)  # weight-0 rows never reach a kernel
        h = _prep(hidden.index_select(0, rows).to(weight.dtype))
        y = targets.index_select(0, rows).contiguous()
        wt = token_weight.index_select(0, rows).to(torch.float32)
        w = _prep(weight)
        b = None if bias is None else bias.contiguous()
        lse, _, zy = _merge(_run_lse(h, w, b, y, 1.0, softcap)[0])
        ctx.save_for_backward(h, rows, y, wt, lse, w, b)
        ctx.softcap = softcap
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        return (wt * (lse - zy)).sum()

    @staticmethod
    def backward(ctx, grad_out):
        h, rows, y, wt, lse, w, b = ctx.saved_tensors
        shape, dtype = ctx.hidden_meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        coef = wt * grad_out.to(torch.float32)
        step = max(1, GRAD_CHUNK_ELEMENTS // w.shape[0])
        for a in range(0, h.shape[0], step):
            hc = h[a : a + step]
            g = _grad_logits(hc, w, b, y[a : a + step], lse[a : a + step], coef[a : a + step], ctx.softcap)
            if grad_h is not None:
                grad_h.index_copy_(0, rows[a : a + step], (g @ w).to(dtype))
            if grad_w is not None:
                _accumulate_fp32(grad_w, g.T, hc)
            if grad_b is not None:
                grad_b += g.sum(0, dtype=torch.float32)
        grad_w = None if grad_w is None else grad_w.to(w.dtype)
        grad_b = None if grad_b is None else grad_b.to(b.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Σ_i w_i · CE(softcap(W h_i + b), y_i) as a 0-d fp32 tensor, differentiable in h, W and b.
    Same contract as :func:`winnow.kernels.linear_cross_entropy.linear_cross_entropy_reference`;
    ``hidden`` is cast to ``weight``'s dtype for the matmuls."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N, D), (V, D)")
    if targets.shape != hidden.shape[:1] or token_weight.shape != hidden.shape[:1]:
        raise ValueError("targets and token_weight must be (N,) like hidden's rows")
    return _TritonLinearCE.apply(hidden, weight, bias, targets, token_weight, softcap)


def _head_args(head, hidden: torch.Tensor):
    w = _prep(head.weight)
    b = None if head.bias is None else head.bias.to(w.dtype).contiguous()
    return _prep(hidden.to(w.dtype)), w, b, head.scale, head.softcap


@torch.no_grad()
def logprob_entropy_triton(head, hidden: torch.Tensor, targets: torch.Tensor, entropy: bool = True):
    """Same contract as :func:`winnow.kernels.chunked_head.logprob_entropy` (two (N,) fp32)."""
    h, w, b, scale, cap = _head_args(head, hidden)
    lse, ent, zy = _merge(_run_lse(h, w, b, targets.contiguous(), scale, cap)[0])
    return zy - lse, (ent if entropy else None)


@torch.no_grad()
def contrast_scores_triton(head_pos, hidden_pos, head_neg, hidden_neg, targets, beta: float = 1.0):
    """Same contract as :func:`winnow.kernels.chunked_head.contrast_scores`: p_CE, lp_pos, lp_neg."""
    if head_pos.vocab_size != head_neg.vocab_size:
        raise ValueError(f"vocab sizes differ: {head_pos.vocab_size} vs {head_neg.vocab_size}")
    h1, w1, b1, s1, c1 = _head_args(head_pos, hidden_pos)
    h2, w2, b2, s2, c2 = _head_args(head_neg, hidden_neg)
    if h2.dtype != h1.dtype:
        h2, w2 = h2.to(h1.dtype), w2.to(h1.dtype)
        b2 = None if b2 is None else b2.to(h1.dtype)
    state = _run_lse(h1, w1, b1, targets.contiguous(), s1, c1, second=(h2, w2, b2, s2, c2), beta=beta)
    (lse1, _, zy1), (lse2, _, zy2), (lse3, _, zy3) = (_merge(s) for s in state)
    return torch.exp(zy3 - lse3), zy1 - lse1, zy2 - lse2
