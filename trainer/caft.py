"""CAFT, concept-aware fine-tuning (Chen et al., arXiv 2506.07833): auxiliary heads predict tokens 2..K+1
ahead and their losses train the trunk (``--set caft.heads=4``; 0 = off).

Spec: ALGORITHMS_TRAINING.md §1 (the authors' code ``michaelchen-lab/caft-llm`` @ d10c79e). Head ``k``
(1..K) is one decoder layer of the model's own class (a new ``layer_idx``), without a final norm, sharing
the LM head; at position ``p`` it predicts the token at ``p+1+k``. Its loss is the cross-entropy at the
positions whose target ``p+1+k`` is a weighted target of the batch and lies in the same document (a
padded row, or a packed document by its restarting ``position_ids``), weighted by that target's token
weight: ``Σ w·CE_k``, divided like every loss by the step's ``Σ w`` (the authors' own per-head token mean
differs only in its denominator). Total: ``CE_0 + Σ_k β γ^k s(t) Σ w·CE_k`` with ``s`` the schedule
(``rsine`` = cos(πt/2T), ``sine``, ``linear``, ``constant``; t the step, T the run's steps).

The head layers run with exactly what the body gave its last decoder layer (attention mask, rotary
embeddings, ``position_ids``: a pre-hook on that layer records them per micro-batch), so packed documents
never attend across. ``caft.head_input``: ``final`` (the normed last hidden state, the code's CAFT stage)
or ``pre_last`` (the last layer's input, the code's head training). Only positions that reach a head's
loss go through the LM head (gathered, chunked).

Phases, as the authors' scripts: ``caft.phase=heads`` trains the heads alone (trunk and LM head frozen,
no ``CE_0``, weights ``γ^k`` with β = 1 and a constant schedule, as ``train_aux_heads.py``), heads
initialised from the second-to-last decoder layer; ``caft.phase=finetune`` (default) loads them from
``caft.heads_from=DIR`` (a heads-phase ``--out``; without it: heads copied from that layer, with a warning)
and trains the trunk with the auxiliary losses, heads frozen unless ``caft.train_heads=true``. Every run
writes its heads to ``--out/caft_heads.safetensors``; ``--out`` itself stays a plain model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from winnow.kernels.switch import linear_cross_entropy
from winnow.trainer.loss import LossTerm, TermInput, unwrap
from winnow.trainer.method import MethodContext, TrainingMethod

HEADS_FILE = "caft_heads.safetensors"


def schedule(kind: str, t: int, total: int) -> float:
    """``s(t)`` of the authors' ``add_caft_loss`` (1 when ``total`` is 0)."""
    if total <= 0 or kind == "constant":
        return 1.0
    x = t / total
    return {"linear": x, "sine": math.sin(math.pi * x / 2), "rsine": math.sin(math.pi * (1 - x) / 2)}[kind]


@dataclass(kw_only=True)
class CaftParams(TrainingMethod):
    """``caft.*``: ``heads > 0`` turns it on."""

    heads: int = 0  # K auxiliary heads (the authors' 4)
    beta: float = 0.01  # weight of the auxiliary losses (finetune phase)
    gamma: float = 0.8  # decay per head: head k weighs beta * gamma**k
    schedule: Literal["constant", "linear", "sine", "rsine"] = "rsine"  # s(t) on the auxiliary losses
    head_input: Literal["final", "pre_last"] = "final"  # normed last hidden state, or the last layer input
    phase: Literal["heads", "finetune"] = "finetune"  # heads: train the heads alone first
    heads_from: str = ""  # a heads-phase --out holding caft_heads.safetensors
    train_heads: bool = False  # finetune phase: train the heads with the trunk

    def __post_init__(self) -> None:
        if self.heads < 0:
            raise ValueError(f"caft.heads={self.heads} must be >= 0 (0 turns CAFT off)")
        if self.heads_from and self.phase == "heads":
            raise ValueError(
                "caft.heads_from is read by caft.phase=finetune; the heads phase starts its own heads"
            )
        self.term: CaftTerm | None = None
        self.loop: Any = None

    @property
    def enabled(self) -> bool:  # type: ignore[override]
        return self.heads > 0

    def trainable(self, model: Any, ctx: MethodContext) -> Any:
        lm = unwrap(model)
        layers = lm.base_model.layers
        if len(layers) < 2:
            raise ValueError(
                "caft.heads needs a model of at least 2 decoder layers (heads start from layer -2)"
            )
        heads = torch.nn.ModuleList()
        for k in range(self.heads):
            layer = copy.deepcopy(layers[-2])
            if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
                layer.self_attn.layer_idx = len(layers) + k
            heads.append(layer)
        if self.phase == "finetune":
            self._load_heads(heads)
        if self.phase == "heads":
            for q in model.parameters():
                q.requires_grad_(False)
        heads.requires_grad_(self.phase == "heads" or self.train_heads)
        self.term = CaftTerm(self, heads)
        return model

    def _load_heads(self, heads: torch.nn.ModuleList) -> None:
        if not self.heads_from:
            print(
                "warning: caft.phase=finetune without caft.heads_from: heads start as copies of decoder layer -2 "
                "(train them first with caft.phase=heads)",
                file=sys.stderr,
            )
            return
        from safetensors.torch import load_file

        from winnow.core.errors import UserError

        path = Path(self.heads_from).expanduser() / HEADS_FILE
        if not path.exists():
            raise UserError(
                f"caft.heads_from={self.heads_from}: no {HEADS_FILE} there; give a heads-phase --out"
            )
        state = load_file(str(path))
        try:
            heads.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(
                f"{path}: heads of another shape or count than caft.heads={self.heads} ({e})"
            ) from None

    def loss_terms(self) -> list[LossTerm]:
        return [self.term]

    def attach(self, loop: Any) -> None:
        self.loop = loop

    def reselect(self, step: int, model: Any) -> bool:
        self.term.step = step
        return False

    @contextlib.contextmanager
    def forward_change(self, batch: Any, model: Any):
        """Record what the body hands its last decoder layer (the heads' mask, rotary, positions, input)."""
        last = unwrap(model).base_model.layers[-1]

        def grab(module, args, kwargs):
            self.term.seen = (args[0] if args else kwargs["hidden_states"], kwargs)

        handle = last.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.term.seen = None

    def save(self, folder: Path) -> None:
        loop = self.loop
        if loop is None or self.term.step + 1 < loop.total_steps or not loop.d.main or loop.env.out is None:
            return
        from safetensors.torch import save_file

        state = {
            k: getattr(v, "full_tensor", lambda v=v: v)().detach().cpu().contiguous()
            for k, v in self.term.heads.state_dict().items()
        }
        save_file(state, str(Path(loop.env.out) / HEADS_FILE))


def head_positions(x: TermInput, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions ``p`` whose target ``p+1+k`` is a weighted target in the same document, that target
    and its weight. Targets ``t = gather + 1`` carry the weights; ``p = t − 1 − k``."""
    width = x.input_ids.shape[1]
    t = x.gather + 1
    p = t - 1 - k
    if x.position_ids is not None:  # packed: positions restart per document
        pos = x.position_ids.reshape(-1)
        ok = (p >= 0) & (pos[t] - pos[p.clamp(min=0)] == 1 + k)
    else:  # padded: one sample per row
        ok = (t % width) >= 1 + k
    return p[ok], x.input_ids.reshape(-1)[t[ok]], x.weights[ok]


class CaftTerm(LossTerm):
    """The auxiliary heads' weighted cross-entropies (replacing ``CE_0`` in the heads phase)."""

    def __init__(self, p: CaftParams, heads: torch.nn.ModuleList):
        super().__init__()
        self.p, self.heads = p, heads
        self.replaces_ce = p.phase == "heads"
        self.step = 0
        self.seen: tuple[torch.Tensor, dict] | None = None

    def coefficient(self, k: int) -> float:
        """Head ``k`` (1-based): ``β γ^k s(t)`` (the heads phase: ``γ^k``)."""
        if self.p.phase == "heads":
            return self.p.gamma**k
        total = self.p.loop.total_steps if self.p.loop is not None else 0
        return self.p.beta * self.p.gamma**k * schedule(self.p.schedule, self.step, total)

    def forward(self, x: TermInput) -> torch.Tensor:
        if self.seen is None:
            raise RuntimeError(
                "caft: the last decoder layer's inputs were not recorded (forward_change did not run)"
            )
        pre, kw = self.seen
        h_in = x.hidden if self.p.head_input == "final" else pre
        kw = {k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
        total = x.h.new_zeros((), dtype=torch.float32)
        for k, head in enumerate(self.heads, start=1):
            p, tgt, w = head_positions(x, k)
            out = head(h_in, **kw)
            out = out[0] if isinstance(out, tuple) else out
            h = out.reshape(-1, out.shape[-1]).index_select(0, p) * x.scale
            ce = linear_cross_entropy(h, x.head_weight, tgt, w, x.bias, x.softcap)
            total = total + self.coefficient(k) * ce
        return total
