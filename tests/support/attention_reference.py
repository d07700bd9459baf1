"""Eager-attention reference for attention importance: what the capture must reproduce, one sample alone."""

from __future__ import annotations

import torch


def _eager_reference(model, ids, key_mask, layer=-1):
    """Sum over non-supervised keys of the head-mean eager attention of each query, one sample alone."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.as_tensor(ids, dtype=torch.long)[None],
                output_attentions=True,
                use_cache=False,
            )
    finally:
        model.set_attn_implementation(impl)
    att = out.attentions[layer][0].double().mean(0)  # (L, L)
    return (att * torch.as_tensor(key_mask == 0, dtype=torch.float64)[None, :]).sum(-1).numpy()
