"""Online selection: the papers' per-mini-batch policies, on the current model, inside training.

Q-Tuning (Algorithm 1) recomputes the EU plane on every mini-batch with the model being trained; Rho-1
scores every batch against a reference model; ssToken compares the current model with a history model
(the model training started from, or an EMA of the weights). Offline stages approximate them with fixed
models; here the trainer calls the *same array functions* as the offline stages
(:func:`winnow.stages.eu_plane_math.eu_plane_select`, :func:`winnow.stages.excess_loss_math.excess_loss_select`,
:func:`winnow.stages.sstoken_math.sstoken_select`) on one mini-batch, so each formula exists once.

The interface is one function per policy, ``policy(scored, params) -> Decision``: a :class:`Scored`
mini-batch (padded ``(B, T)`` arrays at the table convention: index ``i`` is token ``i`` as a target)
in, which samples to train on and each token's weight out. The trainer draws the mini-batch (by
default 8 samples per rank, the paper's per-device batch, in its seeded order, before packing),
fills the signals the policy ``needs`` (:data:`NEEDS`), applies the decision and then trims and packs
the kept samples as usual. A new method is one function and one line in :data:`POLICIES`.
``always_keep`` (``--set always_keep="<|im_end|>,####"``, any policy) then puts those tokens back where
the policy dropped them (:func:`always_keep`; why: :mod:`winnow.core.always_keep`).

Masked Thought (ALGORITHMS.md §7.1) is input-side noise, not a selection: :func:`masked_thought_inputs`
replaces response *input* tokens with probability ``p`` (ramped as the authors' trainer does) in the
training forward only; the scoring forwards see the unmasked inputs and the labels never change.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _decision(
    keep_tokens: torch.Tensor, s: Scored, extra: dict[str, int] | None = None, reason: list[str] | None = None
) -> Decision:
    weight = torch.where(keep_tokens, s.weight, torch.zeros_like(s.weight))
    keep = weight.ne(0).any(1)
    stats = {"kept_samples": int(keep.sum()), "kept_tokens": int(weight.ne(0).sum())}
    return Decision(keep, weight, {**stats, **(extra or {})}, reason)


def _eu_reason(quadrant: int, kept_by: int) -> str:
    """The offline eu_plane stage's reason vocabulary (kept_q2, topup_middle, dropped_q1, ...)."""
    from winnow.stages.eu_plane_math import BY_QUADRANT, DROPPED, QUADRANT_NAMES, UNSCORED

    if quadrant == UNSCORED:
        return "no_supervised_tokens"
    head = "kept" if kept_by == BY_QUADRANT else ("dropped" if kept_by == DROPPED else "topup")
    return f"{head}_{QUADRANT_NAMES[quadrant].lower()}"


def q_tuning(s: Scored, p: QTuningOnline) -> Decision:
    """Algorithm 1 of Q-Tuning on this mini-batch: EU-plane quadrants, then Q2 token pruning."""
    from winnow.stages.eu_plane_math import BY_QUADRANT, Q1, Q2, Q3, Q4, eu_plane_select

    if s.entropy is None:
        raise ValueError("q_tuning needs the current model's entropy")
    r = eu_plane_select(s.nll, s.entropy, s.mask, p.r_sample, p.r_token, p.lam)
    quads = {
        name: int((r.quadrant == q).sum()) for name, q in (("q1", Q1), ("q2", Q2), ("q3", Q3), ("q4", Q4))
    }
    topup = int((r.keep_sample & (r.kept_by != BY_QUADRANT)).sum())
    why = [_eu_reason(int(q), int(b)) for q, b in zip(r.quadrant.tolist(), r.kept_by.tolist(), strict=True)]
    return _decision(r.token_keep, s, {**quads, "topup": topup}, why)


def rho1(s: Scored, p: Rho1Online) -> Decision:
    """Rho-1's selective LM on this mini-batch: the top ``k_ratio`` excess losses across it."""
    from winnow.stages.excess_loss_math import excess_loss_select

    if s.nll_ref is None:
        raise ValueError("rho1 needs the reference model's losses")
    _, keep = excess_loss_select(s.nll, s.nll_ref, s.mask, p.k_ratio)
    return _decision(keep, s)


def sstoken(s: Scored, p: SSTokenOnline) -> Decision:
    """ssToken on this mini-batch: REL against the history model plus attention, top ``rho`` per sample."""
    from winnow.stages.sstoken_math import sstoken_select

    nll_his = s.nll_his if s.nll_his is not None else s.nll  # gamma == 0: REL unused
    if p.gamma > 0 and s.nll_his is None:
        raise ValueError("sstoken with gamma > 0 needs the history model's losses")
    r = sstoken_select(nll_his, s.nll, s.attn, s.mask, p.gamma, p.rho)
    return _decision(r.keep, s)


POLICIES: dict[str, Callable[[Scored, object], Decision]] = {
    "q_tuning": q_tuning,
    "rho1": rho1,
    "sstoken": sstoken,
}


def needs(params: OnlineParams) -> set[str]:
    """Which signals the trainer must compute for the chosen policy."""
    if params.online == "q_tuning":
        return {"nll", "entropy"}
    if params.online == "rho1":
        return {"nll", "reference"}
    if params.online == "sstoken":
        g = params.sstoken.gamma
        return {"nll"} | ({"history"} if g > 0 else set()) | ({"attention"} if g < 1 else set())
    return set()


def apply_policy(s: Scored, params: OnlineParams) -> Decision:
    """The policy's decision on this mini-batch, then the ``always_keep`` floor (before trimming/packing)."""
    if params.online in ("none", "all"):
        return _decision(s.mask, s)
    decision = POLICIES[params.online](s, getattr(params, params.online))
    return always_keep(decision, s, params.always_keep_ids) if params.always_keep_ids else decision


def always_keep(d: Decision, s: Scored, ids: tuple[int, ...]) -> Decision:
    """Supervised tokens whose id is in ``ids`` train with the selection's weight (as if the policy had kept
    them) in every sample the decision trains on; a dropped sample stays dropped (the offline floor's rule,
    :mod:`winnow.core.always_keep`)."""
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
