"""Token-weighted linear cross-entropy without ``[N, V]`` logits: the PyTorch reference.

For hidden states ``h`` (N, D), an LM head ``W`` (V, D) with optional bias ``b`` (V,), an optional
final-logit soft-cap ``c``, targets ``y`` (N,) and token weights ``w`` (N,)::

    z_i   = W h_i + b                         raw logits (fp32)
    s_i   = c * tanh(z_i / c)                 (or s_i = z_i without a cap)
    l_i   = logsumexp(s_i) - s_i[y_i]         cross-entropy of row i
    loss  = sum_i w_i * l_i                   unnormalised: the trainer divides by sum w per optimizer step

Gradients, with ``p_i = softmax(s_i)`` and ``g_i = w_i * (p_i - onehot(y_i)) * ds/dz`` where
``ds/dz = 1 - (s_i / c)^2`` under a cap (1 otherwise)::

    dL/dh_i = g_i W        dL/dW = sum_i g_i^T h_i        dL/db = sum_i g_i

The reference runs the head on ``chunk`` rows at a time and computes these gradients *during the
forward* (as Liger's fused linear cross-entropy does), so only one ``(chunk, V)`` fp32 block exists at
a time and backward just scales the stored gradients by the incoming scalar. Rows whose weight is 0
are dropped before the head: they cost nothing. ``grad W`` accumulates in fp32 and is cast to W's
dtype at the end. When no input needs a gradient (evaluation) the gradient work is skipped.

The Triton kernel (:func:`winnow.kernels.triton_linear_cross_entropy.linear_cross_entropy_triton`) has
the same signature (less ``chunk``); :mod:`winnow.kernels.switch` picks one. Measured on this CPU
(``benchmarks/bench_kernels.py``, see ``benchmarks/RESULTS.md``) against materialised logits.
"""

from __future__ import annotations

import torch

from winnow.kernels.chunked_head import auto_chunk


def _softcapped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return z
    return z.div_(softcap).tanh_().mul_(softcap)


def _chunk_loss_and_grad(
    h: torch.Tensor,  # (n, D) in the compute dtype (fp32, or fp64 for checks)
    w32: torch.Tensor,  # (V, D)
    b32: torch.Tensor | None,
    y: torch.Tensor,  # (n,)
    wt: torch.Tensor,  # (n,) fp32
    softcap: float | None,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ w·ℓ over one chunk and, when asked, dL/dlogits (n, V) (chain rule through the cap included)."""
    z = h @ w32.T  # (n, V)
    if b32 is not None:
        z.add_(b32)
    s = _softcapped(z, softcap)
    lse = torch.logsumexp(s, dim=-1)  # (n,)
    target = s.gather(-1, y[:, None]).squeeze(-1)
    loss = (wt * (lse - target)).sum()
    if not need_grad:
        return loss, None
    g = s.sub(lse[:, None]).exp_()  # softmax, (n, V)
    g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
    if softcap is not None:
        g.mul_(1.0 - (s / softcap).square_())
    g.mul_(wt[:, None])
    return loss, g


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weight, softcap, chunk, need_grad):
        with torch.autocast(hidden.device.type, enabled=False):  # the fp32 math stays fp32 under autocast
            args = (hidden, weight, bias, targets, token_weight, softcap, chunk, need_grad)
            return _ChunkedLinearCE._forward(ctx, *args)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, token_weight, softcap, chunk, need_grad):
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # fp32 math (fp64 stays fp64 for checks)
        w32 = weight.to(cdt)
        b32 = None if bias is None else bias.to(cdt)
        loss = torch.zeros((), dtype=cdt, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(w32) if need_grad else None
        grad_b = torch.zeros_like(b32) if (need_grad and b32 is not None) else None
        rows = torch.nonzero(token_weight != 0).squeeze(-1)  # weight-0 rows never reach the head
        step = auto_chunk(weight.shape[0], chunk)
        for a in range(0, rows.numel(), step):
            idx = rows[a : a + step]
            h = hidden.index_select(0, idx).to(cdt)
            part, g = _chunk_loss_and_grad(
                h, w32, b32, targets.index_select(0, idx), token_weight.index_select(0, idx).to(cdt),
                softcap, need_grad,
            )
            loss += part
            if g is not None:
                grad_h.index_copy_(0, idx, (g @ w32).to(hidden.dtype))
                grad_w.addmm_(g.T, h)
                if grad_b is not None:
                    grad_b += g.sum(0)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gb = None if grad_b is None else grad_b * grad_out
        return grad_h * grad_out, grad_w * grad_out, gb, None, None, None, None, None


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Σ_i w_i · CE(softcap(W h_i + b), y_i) as a 0-d fp32 (fp64 for fp64 inputs) tensor, differentiable
    in h, W and b.

    ``hidden`` (N, D); ``weight`` (V, D); ``targets`` (N,) int; ``token_weight`` (N,), >= 0 (0 rows
    are skipped). ``chunk`` rows per head block (0: about 32 MiB of fp32 logits).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N, D), (V, D)")
    if targets.shape != hidden.shape[:1] or token_weight.shape != hidden.shape[:1]:
        raise ValueError("targets and token_weight must be (N,) like hidden's rows")
    need_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _ChunkedLinearCE.apply(hidden, weight, bias, targets, token_weight, softcap, chunk, need_grad)
