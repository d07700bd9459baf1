"""A training method: one object, in one module, that changes *how* the trainer learns from kept tokens.

The loop knows three seams, and a method fills any of them (the defaults do nothing):

* **Trainable parameters** — :meth:`TrainingMethod.trainable` wraps or freezes the model once, before the
  loop is built (LoRA and prompt tuning wrap it in peft; HFT would freeze a drawn half). The loop trains
  exactly the parameters with ``requires_grad`` (frozen ones get no gradient and no optimizer state).
  :meth:`TrainingMethod.reselect` is asked before every optimizer step; ``True`` (the method changed
  ``requires_grad`` itself, e.g. GreenTrainer every ``interval`` epochs) makes the loop rebuild its
  optimizer (fresh AdamW state, the schedule continuing at the step) and its DDP/FSDP2 wrapper.
* **Loss terms** — :meth:`TrainingMethod.loss_terms` returns :class:`winnow.trainer.loss.LossTerm` modules;
  they live inside the one wrapped loss module (so DDP/FSDP2 sync any parameters they own, e.g. extra
  heads) and add to the micro-batch's unnormalised ``Σ w·ℓ``; a term may replace the cross-entropy.
  :func:`winnow.trainer.loss.per_token_in_head` computes a per-token term over the gathered positions
  chunk by chunk, so no ``[N, V]`` logits exist beyond a chunk.
* **Forward change** — :meth:`TrainingMethod.forward_change` returns a context manager entered around the
  forward *and backward* of every training micro-batch (not around evaluation or an online policy's
  scoring forward), e.g. patching chosen decoder layers' ``forward`` for that batch. It spans the backward
  because activation checkpointing recomputes the forward there.

``save(folder)``/``load(folder)`` keep a method's state with each checkpoint; on resume the loop loads it
before the optimizer state and asks :meth:`reselect` for the resumed step, so the optimizer is rebuilt
over the parameters the checkpoint's optimizer state belongs to. How to add one: docs/CONTRACTS.md,
"Training methods". A method with parameters is their ``kw_only`` dataclass (``--set name.key=value``)
and a field of :class:`winnow.trainer.config.TrainParams`; :meth:`TrainParams.methods` lists the enabled
ones in field order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from winnow.trainer.loss import LossTerm
    from winnow.trainer.packing import MicroBatch


@dataclass(kw_only=True)
class MethodContext:
    """What :meth:`TrainingMethod.trainable` may need besides the model."""

    device: Any  # torch.device of this rank
    model_dir: Path | None = None  # the resolved base model directory (its tokenizer, config)
    seed: int = 0
    rank: int = 0
    world: int = 1


class TrainingMethod:
    """The seams' defaults: the plain weighted cross-entropy on every parameter, dense forward."""

    @property
    def enabled(self) -> bool:
        return True

    def trainable(self, model: torch.nn.Module, ctx: MethodContext) -> torch.nn.Module:
        """The model to train (wrapped, or with ``requires_grad`` chosen); called once, before the loop."""
        return model

    def reselect(self, step: int, model: torch.nn.Module) -> bool:
        """Before optimizer step ``step``: True after changing which parameters train."""
        return False

    def loss_terms(self) -> list[LossTerm]:
        return []

    def forward_change(self, batch: MicroBatch, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Entered around the forward and backward of one training micro-batch."""
        return contextlib.nullcontext()

    def save(self, folder: Path) -> None:
        pass

    def load(self, folder: Path) -> None:
        pass


def apply_trainable(methods: list[TrainingMethod], model: Any, ctx: MethodContext) -> Any:
    """Each method's trainable-parameter choice, in order (the trainer calls it right after loading the
    model, where the random initialisation of adapters draws from the seeded RNG)."""
    for m in methods:
        model = m.trainable(model, ctx)
    return model
