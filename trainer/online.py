"""Online selection: the papers' per-mini-batch policies, on the current model, inside training.

Q-Tuning (Algorithm 1) recomputes the EU plane on every mini-batch with the model being trained; Rho-1
scores every batch against a reference model; ssToken compares the current model with a history model
(the model training started from, or an EMA of the weights). Offline stages approximate them with fixed
models; here the trainer calls the *same array functions* as the offline stages
(:func:`winnow.stages.eu_plane_math.eu_plane_select`, :func:`winnow.stages.excess_loss_math.excess_loss_select`,
:func:`winnow.stages.sstoken_math.sstoken_select`) on one mini-batch, so each formula exists once.

Each policy is one ``kw_only`` object in its own module (:mod:`winnow.trainer.online_policy`: its
parameters, its mini-batch size, the signals it ``needs``, its ``decide(scored) -> Decision`` and its
stats): a :class:`Scored` mini-batch (padded ``(B, T)`` arrays at the table convention: index ``i`` is
token ``i`` as a target) in, which samples to train on and each token's weight out. The online batch
source draws the mini-batch (the policy's ``batch_size`` samples per rank, 8 by default, the paper's
per-device batch, in its seeded order, before packing), fills the signals the policy needs, applies the
decision and then trims and packs the kept samples as usual.
``always_keep`` (``--set always_keep="<|im_end|>,####"``, any policy) then puts those tokens back where
the policy dropped them (:func:`always_keep`; why: :mod:`winnow.pipeline.always_keep`).

Masked Thought (ALGORITHMS.md §7.1) is input-side noise, not a selection: :func:`masked_thought_inputs`
replaces response *input* tokens with probability ``p`` (ramped as the authors' trainer does) in the
training forward only; the scoring forwards see the unmasked inputs and the labels never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from winnow.trainer.online_params import (  # noqa: F401  (re-exported)
    POLICY_NAMES,
    MaskedThoughtParams,
    OnlineParams,
    QTuningOnline,
    Rho1Online,
    SSTokenOnline,
)


# ---- the mini-batch a policy sees and what it returns ---------------------------------------------------
@dataclass
class Scored:
    """One mini-batch, right-padded to ``(B, T)``; every per-token array follows the table convention."""

    mask: torch.Tensor  # (B, T) bool: supervised targets that carry weight before the policy
    weight: torch.Tensor  # (B, T) float: the selection's token weights (0 off the mask)
    nll: torch.Tensor  # (B, T) -log p(x_i | x_<i) under the current model, NaN off the mask
    entropy: torch.Tensor | None = None  # (B, T) full-vocabulary predictive entropy (q_tuning)
    nll_ref: torch.Tensor | None = None  # (B, T) under the reference model (rho1)
    nll_his: torch.Tensor | None = None  # (B, T) under the history model (sstoken, gamma > 0)
    attn: torch.Tensor | None = None  # (B, T) attention of query i to the prompt (sstoken, gamma < 1)
    ids: torch.Tensor | None = None  # (B, T) input ids, on the CPU (only for an always_keep floor)


@dataclass
class Decision:
    keep: torch.Tensor  # (B,) bool: samples trained on
    weight: torch.Tensor  # (B, T) float: token weights used (0 in dropped samples)
    stats: dict[str, int]  # logged to metrics.jsonl
    reason: list[str] | None = None  # per sample, recorded by record_weights; None: kept / no_token_kept


def decision(
    keep_tokens: torch.Tensor, s: Scored, extra: dict[str, int] | None = None, reason: list[str] | None = None
) -> Decision:
    """A policy's :class:`Decision` from the tokens it keeps: the selection's weights there, 0 elsewhere;
    a sample trains when any of its tokens does."""
    weight = torch.where(keep_tokens, s.weight, torch.zeros_like(s.weight))
    keep = weight.ne(0).any(1)
    stats = {"kept_samples": int(keep.sum()), "kept_tokens": int(weight.ne(0).sum())}
    return Decision(keep, weight, {**stats, **(extra or {})}, reason)


def needs(params: OnlineParams) -> set[str]:
    """Which signals the trainer must compute for the chosen policy."""
    return params.chosen.needs() if params.selects else set()


def apply_policy(s: Scored, params: OnlineParams) -> Decision:
    """The policy's decision on this mini-batch, then the ``always_keep`` floor (before trimming/packing)."""
    if not params.selects:
        return decision(s.mask, s)
    d = params.chosen.decide(s)
    return always_keep(d, s, params.always_keep_ids) if params.always_keep_ids else d


def always_keep(d: Decision, s: Scored, ids: tuple[int, ...]) -> Decision:
    """Supervised tokens whose id is in ``ids`` train with the selection's weight (as if the policy had kept
    them) in every sample the decision trains on; a dropped sample stays dropped (the offline floor's rule,
    :mod:`winnow.pipeline.always_keep`)."""
    if s.ids is None:
        raise ValueError("always_keep needs the mini-batch's input ids (Scored.ids)")
    hit = torch.isin(s.ids, torch.as_tensor(ids, dtype=s.ids.dtype))
    force = hit & s.mask & d.keep[:, None]
    weight = torch.where(force, torch.maximum(d.weight, s.weight), d.weight)
    return Decision(d.keep, weight, {**d.stats, "kept_tokens": int(weight.ne(0).sum())}, d.reason)


# ---- Masked Thought ------------------------------------------------------------------------------------
def masked_thought_rate(p: MaskedThoughtParams, step: int, max_steps: int) -> float:
    """The authors' ramp: ``min(p, p * step / (max_steps * warmup + 1))`` (0 -> p over warmup)."""
    if p.p == 0.0:
        return 0.0
    if p.warmup == 0.0:
        return p.p
    return min(p.p, p.p * step / (max_steps * p.warmup + 1))


def masked_thought_inputs(
    input_ids: torch.Tensor,
    response: torch.Tensor,
    rate: float,
    mask_id: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``input_ids`` with each response input token replaced by ``mask_id`` with probability ``rate``.

    ``response``: bool, same shape, True where the token belongs to a response (its ``loss_mask``).
    Labels are untouched by design: the model still predicts the original next token.
    """
    if rate <= 0.0:
        return input_ids
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    return torch.where(response & (draw < rate), torch.full_like(input_ids, mask_id), input_ids)


def mask_token_id(tokenizer) -> int:
    """The id Masked Thought writes: the tokenizer's pad token, else unk, else eos (as the authors allow)."""
    for attr in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("masked_thought needs a pad, unk or eos token in the tokenizer")


# ---- EMA history (ssToken Eq. 4) -----------------------------------------------------------------------
@torch.no_grad()
def ema_update(history: torch.nn.Module, current: torch.nn.Module, decay: float) -> None:
    """``θ_his <- decay·θ_his + (1 - decay)·θ`` over every floating parameter and buffer."""
    cur = dict(current.named_parameters())
    for name, t in history.named_parameters():
        src = cur[name].detach()
        src = src.full_tensor() if hasattr(src, "full_tensor") else src  # FSDP2: every rank gathers
        if t.dtype.is_floating_point:
            t.lerp_(src.to(t.dtype), 1.0 - decay)


def padded_rows(rows: list[torch.Tensor], fill: float, dtype: torch.dtype) -> torch.Tensor:
    """Right-pad 1-d tensors to ``(B, max_len)`` with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.to(dtype)
    return out
