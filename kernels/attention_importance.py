"""ssToken's attention importance from one layer's rotated queries and keys: the numeric core.

Definition (ALGORITHMS.md §2, the authors' code): at layer ``L`` (default the last), with ``A^h`` the
attention probabilities of head ``h``, the importance of query position ``i`` is

    attn_importance[i] = sum over j <= i, j in the same sample, loss_mask[j] == 0 of  mean_h A^h[i, j]

i.e. how much the supervised token's *query* row attends to the non-supervised (prompt/template)
positions before it; for single-turn samples exactly the paper's ``attn[resp, :prompt_len].sum(-1)``.
The value is anchored at the **query** (row ``i``, whose hidden state predicts token ``i+1``), as the
authors align it; the column's field metadata says ``winnow.anchor = query``.

:func:`importance_from_qk` takes q (R, H, W, D) and k (R, Hkv, W, D) after rotary embedding, broadcasts
grouped-query heads, applies the scale, the sliding window and attention-logit softcapping, and builds
the per-sample causal mask from ``segment`` (same sample, causal, window) rather than decoding whatever
an attention backend was given (None under SDPA's is_causal path, cu_seqlens under FlashAttention).
Scores are computed in fp32 for a chunk of queries at a time, so the extra memory is
``rows * heads * chunk * width * 4`` bytes, bounded by :data:`CHUNK_ELEMS`. It imports torch only, so
the trainer and a future Triton kernel reuse it as the reference.

Getting q and k out of a Hugging Face model during its normal forward (a pre-hook on the layer's
attention module, its own projections, norms and rotary code) and checking the result against eager
attention is :mod:`winnow.core.attention_capture`.
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 8 * 1024 * 1024  # fp32 score elements per query chunk (32 MiB)


def importance_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    segment: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over allowed keys with ``key_mask`` of the head-mean attention of each query; (R, W) fp32.

    ``q`` (R, H, W, D) and ``k`` (R, Hkv, W, D): rotated queries and keys, H a multiple of Hkv.
    ``segment`` (R, W): sample number of each position (-1 on padding); attention is allowed within a
    segment, causally, inside the sliding ``window`` when given. ``key_mask`` (R, W) bool: the keys to
    sum over (non-supervised positions). ``query_mask`` (R, W) bool: queries whose value is needed
    (chunks with none are skipped; other queries get whatever was computed, callers read only the
    masked ones).
    """
    n_rows, n_heads, width, head_dim = q.shape
    n_kv = k.shape[1]
    rep = n_heads // n_kv
    qf = q.float().reshape(n_rows, n_kv, rep, width, head_dim)  # grouped-query: rep queries per kv head
    kf = k.float()[:, :, None]  # (R, Hkv, 1, W, D)
    keys = key_mask.to(torch.float32)
    pos = torch.arange(width, device=q.device)
    chunk = max(1, CHUNK_ELEMS // max(1, n_rows * n_heads * width))
    out = torch.zeros(n_rows, width, dtype=torch.float32, device=q.device)
    for a in range(0, width, chunk):
        b = min(width, a + chunk)
        if query_mask is not None and not bool(query_mask[:, a:b].any()):
            continue
        s = qf[:, :, :, a:b] @ kf[..., :b, :].transpose(-1, -2)  # (R, Hkv, rep, c, b): keys up to chunk end
        s.mul_(scale)
        if softcap:
            s.div_(softcap).tanh_().mul_(softcap)
        qp, kp = pos[a:b, None], pos[None, :b]
        allowed = (kp <= qp)[None] & (segment[:, a:b, None] == segment[:, None, :b])  # (R, c, b)
        if window:
            allowed &= (kp > qp - window)[None]
        s.masked_fill_(~allowed[:, None, None], float("-inf"))
        p = torch.softmax(s, dim=-1).mean(dim=(1, 2))  # (R, c, b), mean over all heads
        out[:, a:b] = (p @ keys[:, :b, None]).squeeze(-1)
    return out
