"""GreenTrainer (Huang et al., ICLR 2024, arXiv 2309.13192): train the parameter tensors that buy the most
loss reduction within a backward-FLOPs budget ``ρ`` (``--set greentrainer.rho=0.5``; 0 = off).

Spec: ALGORITHMS_TRAINING.md §6 (the authors' code ``pittisl/GreenTrainer`` @ 7b7a9fe). Every
``greentrainer.interval`` epochs, before the epoch's first step:

* **FLOPs** (:func:`tensor_flops`, analytic, per parameter tensor, for the step's ``T`` tokens): a linear
  ``in×out`` weight costs ``t_dw = t_dy = T·in·out``; a norm weight ``T·d`` each; a bias ``t_dw = T·out``,
  ``t_dy = 0``; the embedding ``t_dy = 0``, ``t_dw = T·D·V + D·V``; the attention core (``4·Σ len²·d``)
  is added to ``t_dy`` of ``v_proj`` (the authors put it on OPT's v bias) and the LM head's ``T·D·V`` to
  ``t_dy`` of the output-most tensor. A tied embedding is one tensor, placed input-most. Forward cost
  ``t_fp = Σ t_dy`` (each op's forward costs its input gradient's), so
  ``ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp`` (0.05 if ≤ 0). Times are quantised to ``Q = 1000`` units of the
  full backward (floor), the budget is ``⌊ρ_bp · Σ units⌋``.
* **Importance**: one real AdamW update on the step's micro-batches with every tensor trainable (a fresh
  AdamW at the step's learning rate, gradients summed over ranks first), ``Δw = w₁ − w₀``, the gradient
  ``g₁`` at ``w₁``, ``I_k = −Σ g₁⊙Δw / max|Σ g₁⊙Δw|``. Then weights (in place), gradients and RNG are
  restored exactly; the loop's optimizer and scheduler are never touched (the authors' code leaves its
  Adam state advanced twice: not here) and the batches are re-read, not consumed.
* **Selection** (:func:`select_dp`, exact): tensors ordered output→input; maximise ``Σ I_k m_k`` subject to
  ``Σ m_k t_dw[k] + Σ_{j ≤ k_max(m)} t_dy[j] ≤ budget``. The authors' DP never selects the input-most
  tensor (``N_limit`` off by one); ``greentrainer.code_dp=true`` reproduces it.

The chosen tensors keep ``requires_grad``; the loop rebuilds its wrapper and a fresh AdamW (the schedule
goes on). Every rank computes the same importance (all-reduced gradients), so the same selection, without
a broadcast. The selection, its FLOPs and the budget go into ``metrics.jsonl`` on the selecting step and
into each checkpoint (a resumed run continues with it). Not with an online policy (its batch source is
stateful), LoRA, prompt tuning, HFT or FSDP2 (refused in :mod:`winnow.trainer.config`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winnow.trainer.method import TrainingMethod

Q_UNITS = 1000  # the authors' Tq
STATE_FILE = "greentrainer.json"


@dataclass(kw_only=True)
class GreenTrainerParams(TrainingMethod):
    """``greentrainer.*``: ``rho > 0`` turns it on."""

    rho: float = 0.0  # fraction of full fine-tuning's training FLOPs to spend (the paper's 0.5 / 0.7)
    interval: int = 2  # re-select every this many epochs (the authors' default)
    code_dp: bool = False  # the authors' DP, which never selects the input-most tensor

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"greentrainer.rho={self.rho} must be in [0, 1] (0 turns GreenTrainer off)")
        if self.interval < 1:
            raise ValueError(f"greentrainer.interval={self.interval} must be >= 1")
        self.loop: Any = None
        self.selected_at = -1
        self.selected: list[str] = []
        self.resumed = False
        self.pending: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:  # type: ignore[override]
        return self.rho > 0

    def attach(self, loop: Any) -> None:
        self.loop = loop

    def reselect(self, step: int, model: Any) -> bool:
        if self.resumed:  # resume: the checkpoint's selection (load) before its optimizer state
            self.resumed = False
            return True
        epoch, within = divmod(step, self.loop.steps_per_epoch)
        if within or epoch % self.interval or self.selected_at == step:
            return False
        self._select(step)
        return True

    def metrics(self) -> dict[str, Any]:
        out, self.pending = self.pending, {}
        return out

    def save(self, folder: Path) -> None:
        (Path(folder) / STATE_FILE).write_text(json.dumps({"at": self.selected_at, "trained": self.selected}))

    def load(self, folder: Path) -> None:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        self.selected_at, self.selected = state["at"], state["trained"]
        names = set(self.selected)
        for name, q in self.loop.loss_mod.model.named_parameters():
            q.requires_grad_(name in names)
        self.resumed = True

    def _select(self, step: int) -> None:
        loop = self.loop
        model = loop.loss_mod.model
        named = list(model.named_parameters())
        for _, q in named:
            q.requires_grad_(True)
        mbs = loop.micro_batches(step)
        imp = importance(loop, step, mbs, [q for _, q in named])
        from winnow.trainer.distributed import all_reduce_sum

        tokens, len_sq = all_reduce_sum(
            [float(sum(b.real_tokens for b in mbs)), float(sum(b.len_sq for b in mbs))], loop.env.device
        )
        dw, dy = tensor_flops(model, named, tokens, len_sq)
        order = list(range(len(named)))[::-1]  # output -> input
        udw, udy, limit, rho_bp = budget(dw[order], dy[order], self.rho)
        _, mask = select_dp(udy, udw, imp[order], limit, self.code_dp)
        chosen = {order[i] for i in np.flatnonzero(mask)}
        if not chosen:
            from winnow.core.errors import UserError

            raise UserError(
                f"greentrainer.rho={self.rho}: the backward budget ({limit} of {int(udw.sum() + udy.sum())} units) "
                f"fits no tensor (the output-most one, {named[order[0]][0]}, costs {int(udw[0] + udy[0])}); raise rho"
            )
        for i, (_, q) in enumerate(named):
            q.requires_grad_(i in chosen)
        self.selected = [named[i][0] for i in sorted(chosen)]
        self.selected_at = step
        picked = np.array(sorted(chosen), dtype=np.int64)
        full = float(dw.sum() + dy.sum())
        deepest = max((order.index(i) for i in chosen), default=-1)
        spent = float(dw[picked].sum()) + float(dy[order][: deepest + 1].sum())
        self.pending = {
            "greentrainer_trained": self.selected,
            "greentrainer_tensors": f"{len(chosen)}/{len(named)}",
            "greentrainer_bp_flops": spent,
            "greentrainer_bp_flops_full": full,
            "greentrainer_bp_ratio": spent / full,
            "greentrainer_rho_bp": rho_bp,
        }


# ------------------------------------------------------------------------------------- importance
def importance(loop: Any, step: int, mbs: list, params: list[torch.nn.Parameter]) -> np.ndarray:
    """``I_k`` of every tensor (float64, max |I| = 1), with weights, gradients and RNG restored."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    w0 = [q.detach().clone() for q in params]
    try:
        _grads(loop, mbs, params)
        lr = loop.opt.param_groups[0]["lr"]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=loop.p.weight_decay)
        opt.step()
        delta = [q.detach() - w for q, w in zip(params, w0, strict=True)]
        _grads(loop, mbs, params)
        raw = np.array(
            [
                float((q.grad * d).double().sum()) if q.grad is not None else 0.0
                for q, d in zip(params, delta, strict=True)
            ]
        )
    finally:
        with torch.no_grad():
            for q, w in zip(params, w0, strict=True):
                q.copy_(w)
                q.grad = None
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    top = float(np.abs(raw).max())
    return -raw / top if top > 0 else -raw


def _grads(loop: Any, mbs: list, params: list[torch.nn.Parameter]) -> None:
    """The step's normalised gradient ``Σ w·∇ℓ / Σ w`` over every rank into ``q.grad``."""
    from winnow.trainer.distributed import all_reduce_sum, no_sync

    for q in params:
        q.grad = None
    for b in mbs:  # through the wrapper without its all-reduce (the one below covers every tensor)
        with no_sync(loop.wrapped, last=False), loop._changed(b):
            loop._forward(loop.wrapped, b).backward()
    wsum = all_reduce_sum([sum(b.weight_sum for b in mbs)], loop.env.device)[0]
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
        if loop.d.world > 1:
            torch.distributed.all_reduce(q.grad)
        q.grad.div_(wsum)


# ------------------------------------------------------------------------------------- FLOPs and budget
def tensor_flops(model: Any, named: list, tokens: float, len_sq: float) -> tuple[np.ndarray, np.ndarray]:
    """``(t_dw, t_dy)`` per tensor of ``named`` (forward order), in multiply-adds."""
    owner = {id(q): m for m in model.modules() for q in m.parameters(recurse=False)}
    cfg = model.config
    d_attn = getattr(cfg, "num_attention_heads", 1) * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    dw, dy = np.zeros(len(named)), np.zeros(len(named))
    for i, (name, q) in enumerate(named):
        mod = owner[id(q)]
        if isinstance(mod, torch.nn.Embedding):
            dw[i] = tokens * q.numel() + q.numel()
        elif name.endswith("bias"):
            dw[i] = tokens * q.numel()
        elif q.dim() == 2:  # a linear weight (out, in)
            dw[i] = dy[i] = tokens * q.numel()
        else:  # norms and other vectors
            dw[i] = dy[i] = tokens * q.numel()
        if name.endswith("v_proj.weight"):
            dy[i] += 4.0 * len_sq * d_attn
    head = model.get_output_embeddings().weight
    if head is named[0][1] or all(q is not head for _, q in named):  # tied (OPT's case): not its own tensor
        dy[len(named) - 1] += tokens * head.numel()  # the LM head's input gradient, on the output-most tensor
    return dw, dy


def budget(dw: np.ndarray, dy: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Quantised ``(t_dw, t_dy)``, the integer budget, and ``ρ_bp``."""
    t_bp = float(dw.sum() + dy.sum())
    t_fp = float(dy.sum())
    rho_bp = rho * (1 + t_fp / t_bp) - t_fp / t_bp
    if rho_bp <= 0:
        rho_bp = 0.05
    scale = Q_UNITS / t_bp
    udw, udy = np.floor(dw * scale).astype(np.int64), np.floor(dy * scale).astype(np.int64)
    return udw, udy, int(math.floor(rho_bp * float(udw.sum() + udy.sum()))), rho_bp


def select_dp(
    t_dy: np.ndarray, t_dw: np.ndarray, imp: np.ndarray, limit: int, code_dp: bool = False
) -> tuple[float, np.ndarray]:
    """Exact ``max Σ I_k m_k`` s.t. ``Σ m_k t_dw[k] + Σ_{j ≤ k_max} t_dy[j] ≤ limit`` (index 0 output-most;
    the empty selection allowed). For each deepest tensor ``K``, a 0/1 knapsack over tensors ``< K`` with
    capacity ``limit − Σ_{j≤K} t_dy[j] − t_dw[K]``; O(N · limit). ``code_dp``: tensors from the authors'
    ``N_limit`` on are never selectable (the input-most one never is)."""
    n = len(imp)
    t_dy, t_dw = np.asarray(t_dy, np.int64), np.asarray(t_dw, np.int64)
    cum = np.cumsum(t_dy)
    n_max = n
    if code_dp:
        over = np.flatnonzero(cum > limit)
        n_max = int(over[0]) if over.size else n - 1
    best = np.zeros(limit + 1)  # knapsack over tensors seen so far: best value within capacity c
    take = np.zeros((n, limit + 1), dtype=bool)
    value, deepest, cap = 0.0, -1, 0
    for k in range(min(n_max, n)):
        room = limit - int(cum[k]) - int(t_dw[k])
        if room >= 0 and imp[k] + best[room] > value:
            value, deepest, cap = float(imp[k] + best[room]), k, room
        c = int(t_dw[k])
        if imp[k] > 0 and c <= limit:
            cand = best[: limit + 1 - c] + imp[k]
            better = cand > best[c:]
            take[k, c:] = better
            best[c:] = np.where(better, cand, best[c:])
    mask = np.zeros(n, dtype=bool)
    if deepest >= 0:
        mask[deepest] = True
        for k in range(deepest - 1, -1, -1):
            if take[k, cap]:
                mask[k] = True
                cap -= int(t_dw[k])
    return value, mask
