"""Random LM heads and their float64 full logits: the reference the chunked head and its kernels are tested against."""

from __future__ import annotations

import torch

from winnow.kernels.chunked_head import LMHead


def random_head(V, d, seed, scale=1.0, softcap=None, bias=False, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d, generator=g) * spread / d**0.5
    b = torch.randn(V, generator=g) if bias else None
    return LMHead(w, b, scale, softcap)


def logits64(head, h):
    z = h.double() @ head.weight.double().T
    if head.bias is not None:
        z = z + head.bias.double()
    z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z
