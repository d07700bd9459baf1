"""One LeMo decoder layer's forward (:mod:`winnow.trainer.lemo` says what and why): documents of a row,
the kept tokens of each, attention on them at their original RoPE positions, the residual add, the MLP."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from winnow.trainer.lemo_math import keep_blocks, pruned_mlp


def documents(position_ids: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per row, its documents as ``(start, end)``: a document starts where ``position_ids`` is 0 (a padded
    row is one document with its padding; a packed row restarts per sample)."""
    out = []
    width = position_ids.shape[1]
    for row in position_ids:
        starts = np.flatnonzero(row == 0).tolist()
        starts = starts if starts and starts[0] == 0 else [0, *starts]
        out.append(list(zip(starts, [*starts[1:], width], strict=True)))
    return out


@torch.no_grad()
def select_row(
    pred: Any, x: torch.Tensor, docs: list[tuple[int, int]], keep: float, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept token indices of one row ``x`` ``[W, D]`` (ascending), their position within the kept tokens of
    their document (restarting at 0) and their document number. Blocks start at each document's start."""
    idx, seg, doc = [], [], []
    offsets = torch.arange(block, device=x.device)
    for d, (s, e) in enumerate(docs):
        n = e - s
        nb = -(-n // block)
        xd = torch.nn.functional.pad(x[s:e].float(), (0, 0, 0, nb * block - n))  # the short tail block
        kept = keep_blocks(pred(xd[None])[0], keep)
        t = (kept[:, None] * block + offsets).flatten()
        t = t[t < n]
        idx.append(t + s)
        seg.append(torch.arange(len(t), device=x.device))
        doc.append(torch.full((len(t),), d, device=x.device))
    return torch.cat(idx), torch.cat(seg), torch.cat(doc)


def _mask(doc: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Causal and same-document among the kept tokens, as the attention implementation wants it."""
    one_doc = bool((doc == doc[0]).all())
    if impl.startswith("flash") or (impl == "sdpa" and one_doc):
        return None  # flash: the restarting position_ids; sdpa: is_causal
    n = len(doc)
    allowed = (doc[:, None] == doc[None]) & torch.ones(n, n, dtype=torch.bool, device=doc.device).tril()
    if impl == "sdpa":
        return allowed[None, None]
    return torch.zeros(n, n, dtype=dtype, device=doc.device).masked_fill(~allowed, torch.finfo(dtype).min)[
        None, None
    ]


def gathered_attention(
    attn: Any, x: torch.Tensor, idx: torch.Tensor, seg: torch.Tensor, doc: torch.Tensor, cos_sin: tuple
) -> torch.Tensor:
    """The layer's attention module on the tokens ``idx`` of one row ``x`` ``[W, D]``, RoPE at their original
    positions (rows of the model's ``cos``/``sin`` ``[1 or B, W, d]``, here already this row's ``[W, d]``)."""
    cos, sin = cos_sin
    impl = str(getattr(attn.config, "_attn_implementation", "sdpa") or "sdpa")
    out, _ = attn(
        hidden_states=x.index_select(0, idx)[None],
        position_embeddings=(cos.index_select(0, idx)[None], sin.index_select(0, idx)[None]),
        attention_mask=_mask(doc, impl, x.dtype),
        position_ids=seg[None],
    )
    return out[0]


def lemo_forward(
    state: Any,
    i: int,
    layer: Any,
    pred: Any,
    docs: list,
    hidden_states: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """The decoder layer's forward with LeMo's sparse attention and MLP (pre-norm Llama order)."""
    cos, sin = kwargs["position_embeddings"]
    p = state.p
    residual = hidden_states
    x = layer.input_layernorm(hidden_states)
    sel = state.cache.get(i)
    if sel is None:  # first forward of this micro-batch (a checkpointed recomputation reuses it)
        sel = state.cache[i] = [select_row(pred, x[r], docs[r], p.keep, p.block) for r in range(x.shape[0])]
        state.kept += sum(len(s[0]) for s in sel)
        state.seen += x.shape[0] * x.shape[1]
    width, dim = x.shape[1], x.shape[2]
    outs, flat = [], []
    for r, (idx, seg, doc) in enumerate(sel):
        c = min(r, cos.shape[0] - 1)
        outs.append(gathered_attention(layer.self_attn, x[r], idx, seg, doc, (cos[c], sin[c])))
        flat.append(idx + r * width)
    h = residual.reshape(-1, dim).index_add(0, torch.cat(flat), torch.cat(outs).to(residual.dtype))
    h = h.view_as(residual)
    y = layer.post_attention_layernorm(h)
    return h + (pruned_mlp(layer.mlp, y, p.mlp_keep) if p.mlp_keep < 1.0 else layer.mlp(y))
