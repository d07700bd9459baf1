"""LeMo / JENGA's arrays (Wang et al., USENIX ATC'25, arXiv 2501.09767): ground-truth block scores, the
block predictor, the block selection and the MLP's partial backward. Spec: ALGORITHMS_TRAINING.md §7,
read from the authors' code (``Pairshoe/Jenga-AE``); where paper and code disagree this follows the code.

* **Ground truth** (:func:`block_scores`): ``GT[m, n] = max_{i ∈ block m, j ∈ block n} Σ_h ReLU(Q_h[i]·K_h[j])
  / 16`` with pre-RoPE Q, K (the code's Triton ``block_attn_pool``: no 1/√d, no causal mask, a fixed 16,
  not the head count). Computed a chunk of query rows at a time (``[H, rows, L]`` scores, never
  ``[L, L]``). Grouped-query attention: each query head meets the key head it attends with.
* **Predictor** (:class:`BlockPredictor`, the code's ``PrunableAttnPredictor`` before pruning): the layer's
  normed hidden state ``[L, H·d]`` viewed per head ``[H, L, d]`` and cut into blocks of 64 tokens whose
  64 slices are concatenated (``64·d`` features, token-major), then per side (q̂, k̂) three bias-free
  linear layers ``64d → h1 → h2 → d`` with ReLU between; ``Î = Σ_h q̂_h k̂_hᵀ``. The code's defaults
  h1 = 128, h2 = 64·d. Its elastic pruning of always-zero neurons is not implemented (the authors' logs
  show it shrinks the predictor to ≈0.84×).
* **Selection** (:func:`keep_blocks`): column sums ``s_n = Σ_m Î[m, n]`` over every query block (no
  causal mask, as the code), the top ``max(1, ⌊nb·keep⌋)`` blocks in position order. The ``max(1, ·)``
  is winnow's: the code's ``⌊nb·keep⌋`` is 0 for a one-block document and would leave nothing.
* **MLP** (:class:`PrunedSwiGLU`): the forward is dense; the backward runs through the top
  ``⌈mlp_keep·I⌉`` intermediate neurons ranked by ``‖SiLU(gate)‖₂ + ‖up‖₂`` over the batch's tokens, and
  only their activations are saved (the code's ``PrunedLlamaMLPFunction``). No weight gradients: the
  MLP must be frozen (the paper trains LoRA on q, k, v, o).
"""

from __future__ import annotations

import math

import torch

GT_DIVISOR = 16.0  # the code's fixed divisor (block_attn_pool), whatever the head count
SCORE_ELEMENTS = 1 << 22  # a chunk's [H, rows, L] scores hold at most this many floats (16 MiB fp32)


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``[nb, nb]`` ground truth of one sequence from pre-RoPE ``q`` ``[H, L, d]`` and ``k`` ``[Hkv, L, d]``
    (``L`` a multiple of ``block``); rows are query blocks, columns key blocks."""
    h, n, _ = q.shape
    if n % block:
        raise ValueError(f"block_scores: length {n} is not a multiple of block {block}")
    if k.shape[0] != h:  # grouped-query attention: query head i attends with key head i // group
        k = k.repeat_interleave(h // k.shape[0], dim=0)
    nb = n // block
    rows = max(block, (SCORE_ELEMENTS // max(1, h * n)) // block * block)
    out = q.new_empty(nb, nb)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        s = torch.einsum("hid,hjd->hij", q[:, lo:hi], k).clamp_min_(0).sum(0)  # [rows, L]
        out[lo // block : hi // block] = s.view(-1, block, nb, block).amax(dim=(1, 3))
    return out / GT_DIVISOR


class BlockPredictor(torch.nn.Module):
    """One layer's predictor: hidden states ``[B, L, H·d]`` (``L`` a multiple of ``block``) -> ``Î`` ``[B, nb, nb]``."""

    def __init__(self, n_heads: int, head_dim: int, block: int = 64, h1: int = 128, h2: int = 0):
        super().__init__()
        self.n_heads, self.head_dim, self.block = n_heads, head_dim, block
        h2 = h2 or block * head_dim  # the code's 64·d
        lin = lambda a, b: torch.nn.Linear(a, b, bias=False)  # noqa: E731
        self.q = torch.nn.Sequential(lin(block * head_dim, h1), torch.nn.ReLU(), lin(h1, h2), torch.nn.ReLU(), lin(h2, head_dim))  # fmt: skip
        self.k = torch.nn.Sequential(lin(block * head_dim, h1), torch.nn.ReLU(), lin(h1, h2), torch.nn.ReLU(), lin(h2, head_dim))  # fmt: skip

    @property
    def sizes(self) -> tuple[int, int]:
        return self.q[0].out_features, self.q[2].out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H·d]`` -> ``[B, H, nb, block·d]``: each block's per-head slices, concatenated."""
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, -1).transpose(1, 2).reshape(b, self.n_heads, n // self.block, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return (self.q(f) @ self.k(f).transpose(-1, -2)).sum(1)


def n_keep(nb: int, keep: float) -> int:
    return min(nb, max(1, math.floor(nb * keep)))


def keep_blocks(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The kept block indices (ascending) of one ``[nb, nb]`` score matrix: top column sums."""
    s = scores.sum(0)
    return torch.topk(s, n_keep(s.shape[0], keep)).indices.sort().values


def recall(pred: torch.Tensor, truth: torch.Tensor, keep: float) -> float:
    """Share of the true top blocks (by ground-truth column sums) the predictor's selection keeps."""
    p, t = keep_blocks(pred, keep).tolist(), keep_blocks(truth, keep).tolist()
    return len(set(p) & set(t)) / len(t)


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


class PrunedSwiGLU(torch.autograd.Function):
    """``down(SiLU(gate x) ⊙ up x)`` dense forward; backward through the top ``n`` neurons only (saved:
    ``x`` and the kept neurons' gate and up activations). Biases (``mlp_bias``) are added when given."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, wg, wu, wd, n, bg=None, bu=None, bd=None):  # noqa: ANN001
        g = torch.nn.functional.linear(x, wg, bg)
        u = torch.nn.functional.linear(x, wu, bu)
        a = torch.nn.functional.silu(g)
        out = torch.nn.functional.linear(a * u, wd, bd)
        flat = lambda t: t.reshape(-1, t.shape[-1]).float()  # noqa: E731
        idx = torch.topk(flat(a).norm(dim=0) + flat(u).norm(dim=0), n).indices
        ctx.save_for_backward(g.index_select(-1, idx), u.index_select(-1, idx), idx, wg, wu, wd)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):  # noqa: ANN001
        g, u, idx, wg, wu, wd = ctx.saved_tensors
        gc = grad @ wd.index_select(1, idx).to(grad.dtype)  # d out / d c, kept neurons only
        dg = gc * u * _silu_grad(g)
        du = gc * torch.nn.functional.silu(g)
        dx = dg @ wg.index_select(0, idx).to(dg.dtype) + du @ wu.index_select(0, idx).to(du.dtype)
        return dx, None, None, None, None, None, None, None


def _base(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "base_layer", m)  # a peft-wrapped Linear keeps the frozen one here


def pruned_mlp(mlp: torch.nn.Module, x: torch.Tensor, mlp_keep: float) -> torch.Tensor:
    """A Llama-style MLP (gate/up/down, SiLU) with LeMo's partial backward."""
    g, u, d = (_base(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    n = max(1, math.ceil(mlp_keep * g.out_features))
    return PrunedSwiGLU.apply(x, g.weight, u.weight, d.weight, n, g.bias, u.bias, d.bias)
