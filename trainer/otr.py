"""One-token rollout (OTR, Ming et al., arXiv 2509.26313) and DFT (Dynamic Fine-Tuning; TRL's ``loss_type="dft"``):
per-token losses that replace the cross-entropy (``--set loss=otr|dft``), computed in the chunked head.

Per weighted position with logits ``z``, ground truth ``x`` and ``log π = log_softmax(z)`` (spec:
ALGORITHMS_TRAINING.md §4):

* **OTR**: ``K`` candidates ``a_k ~ softmax(z/τ)`` (no gradient through the draw), reward ``1`` for
  ``x`` and ``β`` otherwise, ``ℓ = −(1/K) Σ_k r(a_k) log π(a_k)``; ``otr.exact=true`` takes the
  expectation: ``ℓ = −[π′(x) log π(x) + β Σ_{a≠x} π′(a) log π(a)]`` with ``π′ = softmax(z/τ)``.
  The differentiated log-probability is at temperature 1 and the weights come from ``π′`` (reviewer 2's
  form; the paper text was not read). Defaults K = 256 (the paper's), τ = 1, β = −0.1: τ and β are
  placeholders (§4d).
* **DFT**: ``ℓ = −sg(π(x)) log π(x)``. At τ = 1 OTR's exact gradient is ``(1−β)`` times DFT's (tested).

Both are reduced with the selection's token weights like the cross-entropy (``Σ w·ℓ / Σ w`` per step),
chunk by chunk through :func:`winnow.trainer.loss.per_token_in_head` (no ``[N, V]`` array beyond a chunk of
:data:`CHUNK` positions; the chunk's logits are recomputed in the backward, and so are the draws, which
come from fixed uniforms).

**Draws.** Candidate ``k`` at a position is the inverse CDF of ``softmax(z/τ)`` at a uniform that is a
hash of (seed, step, the position's key, k). The key is a hash of the sample's tokens up to the target and
the target's position in the sample — the state ``s_t`` the paper rolls out from, which identifies
(sample, position) without carrying sample ids through every batch source (the online policies re-pack
samples). So one process, 2 ranks, another ``tokens_per_batch`` and a resumed run draw the same
candidates; two samples with the same prefix draw the same ones in the same step (they are the same
state). The loop passes the step through :meth:`OtrMethod.reselect` and the batch through
:meth:`OtrMethod.forward_change` (the seams of :mod:`winnow.trainer.method`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from winnow.trainer.loss import LossTerm, TermInput, per_token_in_head
from winnow.trainer.method import TrainingMethod

CHUNK = 512  # positions per head chunk: logits, q, cdf and w of 512 x V floats at once
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(kw_only=True)
class OtrParams:
    """``otr.*``: read when ``loss=otr``."""

    k: int = 256  # candidates drawn per position (the paper's K)
    tau: float = 1.0  # temperature of the sampling policy (placeholder, §4d)
    beta: float = -0.1  # reward of a wrong candidate (placeholder, §4d; the paper: "slightly negative")
    exact: bool = False  # the expectation over the whole distribution instead of K draws

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"otr.k={self.k} must be >= 1")
        if not self.tau > 0:
            raise ValueError(f"otr.tau={self.tau} must be > 0")
        if not self.beta < 1:
            raise ValueError(f"otr.beta={self.beta} must be < 1 (the ground truth's reward is 1)")


# ------------------------------------------------------------------------------------- per-token losses
def otr_weights(z: torch.Tensor, tgt: torch.Tensor, beta: float, tau: float, u: torch.Tensor | None):
    """``sg(w)`` of ``ℓ = −Σ_a w_a log π(a)``: ``π′`` (u None: exact) or the draws' counts / K, times the
    reward. ``u``: (n, K) uniforms in [0, 1)."""
    with torch.no_grad():
        q = torch.softmax(z / tau, -1)
        if u is None:
            w = q
        else:
            cdf = q.cumsum(-1)
            a = torch.searchsorted(cdf, (u * cdf[:, -1:]).to(cdf.dtype), right=True).clamp_(
                max=z.shape[-1] - 1
            )
            w = torch.zeros_like(q).scatter_add_(1, a, torch.full(a.shape, 1.0 / a.shape[1], dtype=q.dtype))
        r = torch.full_like(w, beta)
        r.scatter_(1, tgt[:, None], 1.0)
        return w * r


def otr_loss(z, tgt, beta: float = -0.1, tau: float = 1.0, u=None) -> torch.Tensor:
    """Per-position OTR loss ``(n,)`` of logits ``z`` (n, V): exact with ``u=None``."""
    return -(otr_weights(z, tgt, beta, tau, u) * torch.log_softmax(z, -1)).sum(-1)


def dft_loss(z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Per-position DFT loss: the cross-entropy scaled by the detached probability of the target."""
    logp = torch.log_softmax(z, -1).gather(-1, tgt[:, None]).squeeze(-1)
    return -logp.detach().exp() * logp


# ------------------------------------------------------------------------------------- draws
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def position_keys(input_ids: np.ndarray, position_ids: np.ndarray, gather: np.ndarray) -> np.ndarray:
    """(M,) uint64: for each gathered position, a hash of its sample's tokens up to the target and of the
    target's position in the sample. ``position_ids`` restart per sample (packed) or per row (padded)."""
    ids = input_ids.reshape(-1).astype(np.uint64)
    pos = position_ids.reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        each = _mix(ids * np.uint64(0x9E3779B97F4A7C15) + pos)
        run = np.cumsum(each, dtype=np.uint64)  # wraps mod 2^64
        start = np.flatnonzero(pos == 0)  # every sample (or row) starts at position 0
        seg = np.searchsorted(start, np.arange(ids.size), side="right") - 1
        before = np.concatenate([[np.uint64(0)], run])[start][seg]  # running sum before the sample
        prefix = run - before
        t = gather + 1  # the target's flat position
        return _mix(prefix[t] + _mix(pos[t] + np.uint64(1)))


def uniforms(keys: np.ndarray, seed: int, step: int, k: int) -> torch.Tensor:
    """(M, K) float32 uniforms in [0, 1), a function of (seed, step, key, k) only."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x100000001B3) + np.uint64(step))
        x = _mix(keys[:, None] ^ base) + np.arange(k, dtype=np.uint64)[None] * np.uint64(0x9E3779B97F4A7C15)
        bits = _mix(x) >> np.uint64(40)  # 24 bits: exact in float32, below 1
    return torch.from_numpy((bits.astype(np.float64) * 2.0**-24).astype(np.float32))


# ------------------------------------------------------------------------------------- the term
class RolloutTerm(LossTerm):
    """The OTR or DFT loss of the gathered positions, in place of the cross-entropy."""

    replaces_ce = True

    def __init__(self, kind: str, p: OtrParams):
        super().__init__()
        self.kind, self.p = kind, p
        self.u: torch.Tensor | None = None  # (M, K) uniforms of the current micro-batch (OTR, sampled)

    def forward(self, x: TermInput) -> torch.Tensor:
        if self.kind == "dft":
            return per_token_in_head(x, dft_loss, chunk=CHUNK)
        p = self.p
        if p.exact:
            return per_token_in_head(x, lambda z, t: otr_loss(z, t, p.beta, p.tau), chunk=CHUNK)
        if self.u is None or self.u.shape[0] != x.targets.shape[0]:
            raise RuntimeError("loss=otr: no draws for this micro-batch (forward_change did not run)")
        u = self.u.to(x.h.device)
        fn = lambda z, t, uu: otr_loss(z, t, p.beta, p.tau, uu)  # noqa: E731
        return per_token_in_head(x, fn, CHUNK, u)


class OtrMethod(TrainingMethod):
    """``loss=otr|dft``: the loss term, and the draws' keys of each training micro-batch."""

    def __init__(self, kind: str, p: OtrParams, seed: int):
        self.kind, self.p, self.seed = kind, p, seed
        self.term = RolloutTerm(kind, p)
        self.step = 0

    def loss_terms(self) -> list[LossTerm]:
        return [self.term]

    def reselect(self, step: int, model: Any) -> bool:
        self.step = step  # called first in every optimizer step: the draws' step
        return False

    @contextlib.contextmanager
    def forward_change(self, batch: Any, model: Any):
        if self.kind == "otr" and not self.p.exact:
            keys = position_keys(batch.input_ids, batch.position_ids, batch.gather)
            self.term.u = uniforms(keys, self.seed, self.step, self.p.k)
        try:
            yield
        finally:
            self.term.u = None
