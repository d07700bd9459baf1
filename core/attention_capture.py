"""Attention importance of a Hugging Face model without switching it to eager attention.

The numeric core and the definition are :mod:`winnow.kernels.attention_importance`; this module gets
its inputs out of a model. A forward pre-hook (``with_kwargs=True``) on the chosen layer's attention
module captures its input (hidden states after the input norm, and the rotary ``(cos, sin)``) during
the normal SDPA/Flash forward. Afterwards q and k are recomputed with the module's own projections,
its q/k norms when it has them (per head as Qwen3/Gemma3, or over all heads as OLMo2), and its own
modeling module's ``apply_rotary_pos_emb``; ``module.scaling``, the layer's sliding window and the
config's attention-logit softcapping are passed to the core.

:func:`check_attention` compares the recomputation with ``attn_implementation="eager"`` +
``output_attentions`` on a small input when a model is loaded and refuses an architecture it does
not reproduce (fused qkv projections, attention sinks, ...).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from winnow.core.errors import UserError
from winnow.kernels.attention_importance import importance_from_qk

if TYPE_CHECKING:
    import torch


def decoder_layers(body) -> Any:
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if layers is not None and hasattr(layers, "__len__"):
            return layers
    raise UserError(f"{type(body).__name__}: cannot find its decoder layers for attention importance")


def attention_module(body, layer: int):
    layers = decoder_layers(body)
    if not -len(layers) <= layer < len(layers):
        raise UserError(
            f"attention_layer={layer} but the model has {len(layers)} layers (use -1 for the last)"
        )
    blk = layers[layer]
    for name in ("self_attn", "attn", "attention"):
        mod = getattr(blk, name, None)
        if mod is not None and hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
            return mod
    raise UserError(
        f"{type(blk).__name__} has no attention module with separate q_proj/k_proj; attention importance "
        "cannot be recomputed for this architecture"
    )


class AttentionCapture:
    """``with AttentionCapture(body, layer) as cap: body(...)`` leaves the layer's attention inputs in
    ``cap.hidden`` (R, W, d) and ``cap.position_embeddings`` ((cos, sin))."""

    def __init__(self, body, layer: int = -1):
        self.module = attention_module(body, layer)
        self.hidden = None
        self.position_embeddings = None
        self._handle = None

    def _hook(self, module, args, kwargs):
        self.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.position_embeddings = kwargs.get("position_embeddings")
        if self.position_embeddings is None and len(args) > 1:
            self.position_embeddings = args[1]

    def __enter__(self) -> AttentionCapture:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def release(self) -> None:
        self.hidden = self.position_embeddings = None


def _project(module, hidden: torch.Tensor, proj: str, norm: str) -> torch.Tensor:
    """(R, W, d) -> (R, heads, W, head_dim) with the module's projection and optional norm."""
    head_dim = module.head_dim
    x = getattr(module, proj)(hidden)  # (R, W, heads * head_dim)
    nrm = getattr(module, norm, None)
    if nrm is not None and getattr(nrm, "weight", None) is not None and nrm.weight.numel() != head_dim:
        x = nrm(x)  # OLMo2: norm over all heads, before the head split
        nrm = None
    x = x.view(*hidden.shape[:-1], -1, head_dim)
    if nrm is not None:
        x = nrm(x)  # Qwen3/Gemma3: per-head norm
    return x.transpose(1, 2)


def query_key(module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q (R, H, W, D) and k (R, Hkv, W, D) exactly as ``module.forward`` builds them."""
    q = _project(module, hidden, "q_proj", "q_norm")
    k = _project(module, hidden, "k_proj", "k_norm")
    if position_embeddings is not None:
        apply_rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
        if apply_rotary is None:
            raise UserError(f"{type(module).__name__}: no apply_rotary_pos_emb in its modeling module")
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
    return q, k


def attention_importance(
    module,
    hidden: torch.Tensor,
    position_embeddings,
    segment: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~winnow.kernels.attention_importance.importance_from_qk` for a captured attention module:
    q and k as ``module.forward`` builds them, with its scale, sliding window and logit softcapping."""
    q, k = query_key(module, hidden, position_embeddings)
    return importance_from_qk(
        q,
        k,
        segment,
        key_mask,
        scale=float(getattr(module, "scaling", q.shape[-1] ** -0.5)),
        window=getattr(module, "sliding_window", None),
        softcap=getattr(getattr(module, "config", None), "attn_logit_softcapping", None),
        query_mask=query_mask,
    )


def check_attention(model, body, layer: int, *, device, dtype, seq: int = 16) -> None:
    """Refuse (UserError) a model whose recomputed attention differs from its own eager attention."""
    import torch

    layers = decoder_layers(body)
    idx = layer % len(layers)
    g = torch.Generator().manual_seed(1)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, seq), generator=g).to(device)
    key_mask = torch.zeros(2, seq, dtype=torch.bool, device=device)
    key_mask[0, : seq // 2] = True
    key_mask[1, : seq // 4] = True
    key_mask[1, seq // 2 : seq // 2 + 2] = True  # a second "turn"
    segment = torch.zeros(2, seq, dtype=torch.long, device=device)
    with AttentionCapture(body, layer) as cap:
        body(input_ids=ids, use_cache=False)
    ours = attention_importance(cap.module, cap.hidden, cap.position_embeddings, segment, key_mask)
    impl = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        att = model(input_ids=ids, use_cache=False, output_attentions=True).attentions[idx]  # (2, H, L, L)
    except (ValueError, NotImplementedError, TypeError) as e:
        raise UserError(
            f"{type(model).__name__}: cannot run eager attention to verify attention importance ({e})"
        ) from None
    finally:
        model.set_attn_implementation(impl)
    ref = (att.float().mean(dim=1) * key_mask[:, None, :].float()).sum(-1)  # (2, L)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    diff = float((ours - ref).abs().max())
    if not diff <= tol:
        raise UserError(
            f"{type(model).__name__}: recomputed layer-{idx} attention differs from the model's own eager attention "
            f"(max difference {diff:.3g} > {tol}); attention importance is not supported for this architecture"
        )
