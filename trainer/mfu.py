"""The one MFU convention, shared by the trainer's per-step record and ``benchmarks/gpu_check.py``.

Model FLOPs of one optimizer step (useful work only, whatever the implementation spends):

* every weight matrix of the body (every >= 2-D parameter but the input embedding, a lookup) costs
  ``2·n`` FLOPs per token forward and ``2·n`` for the activation gradient; the weight gradient (another
  ``2·n``) is counted only when the parameter is trained (``requires_grad``): full fine-tuning is the
  usual ``6·n`` per token, a frozen LoRA base ``4·n`` with ``6·n`` for its adapters;
* the LM head (``V·D``) runs only on weighted rows (the trainer's head skips weight-0 positions):
  ``2·V·D`` per weighted row forward and as much for the activation gradient, plus the weight gradient
  when the head (the tied embedding, if tied) is trained;
* attention scores and values: ``2·2·d_attn·len²`` per layer and sample forward for a full square,
  halved for the causal mask (``len²/2`` pairs), and twice that backward (``dQ, dK`` and ``dP, dV``: no
  weights, always needed): ``6·layers·d_attn·Σ len²`` in all, with ``d_attn = heads·head_dim``.

Norms, biases, rotary and softmax are left out (well under 1% at 1B). MFU = FLOPs / seconds /
(peak per device x devices); the peak defaults to 989 TFLOP/s (H100/H200 SXM bf16 dense, datasheet),
``WINNOW_PEAK_TFLOPS`` overrides it (~780 measured for a bf16 8192³ matmul on the lent H200).
"""

from __future__ import annotations

import os
from typing import Any

import torch

DATASHEET_PEAK_TFLOPS = 989.0


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def step_flops(model: torch.nn.Module, tokens: float, weighted_rows: float, len_sq: float) -> float:
    """Model FLOPs of ``tokens`` positions through the body, ``weighted_rows`` through the head, and
    causal attention over samples whose squared lengths sum to ``len_sq`` (forward + backward)."""
    lm = _unwrap(model)
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    every = trained = 0
    for p in {id(p): p for p in lm.parameters()}.values():  # a tied weight counts once
        if p is emb or p is head or p.dim() < 2:
            continue
        every += p.numel()
        trained += p.numel() if p.requires_grad else 0
    flops = 2.0 * tokens * (2 * every + trained)
    flops += 2.0 * weighted_rows * head.numel() * (3 if head.requires_grad else 2)
    cfg = lm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    flops += 6.0 * cfg.num_hidden_layers * heads * head_dim * len_sq
    return flops


def peak_flops(devices: int = 1) -> float:
    return float(os.environ.get("WINNOW_PEAK_TFLOPS", DATASHEET_PEAK_TFLOPS)) * 1e12 * devices


def mfu(flops: float, seconds: float, devices: int = 1, peak_tflops: float | None = None) -> float:
    peak = peak_tflops * 1e12 * devices if peak_tflops else peak_flops(devices)
    return flops / seconds / peak
