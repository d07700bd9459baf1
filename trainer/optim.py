"""The update of one optimizer step: AdamW, warmup then cosine, fp16 gradient scaling, normalisation.

AdamW (fused on CUDA), transformers' warmup then cosine to ``lr·min_lr_ratio`` (:class:`Optim`). Each micro-batch backpropagates its
unnormalised ``Σ w·ℓ``; at the end of the step the gradients, already averaged over ranks by DDP/FSDP2,
are scaled by ``world / Σ w`` (``Σ w`` all-reduced by the loop: an online policy may change weights)
before clipping, so the update is that of ``Σ w·ℓ / Σ w`` over the whole step. fp16 autocast (GPUs
without bf16) runs with a gradient scaler.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based), the formula of the schedule :class:`Optim`
    takes from transformers (``get_cosine_with_min_lr_schedule_with_warmup_lr_rate``, ``warmup_lr_rate``
    unset): linear warmup ``(step + 1) / warmup``, then cosine from 1 to ``min_ratio`` reached at the last
    step. Kept for readers of the schedule (tests, methods that rebuild the optimizer)."""
    if step < warmup:
        return (step + 1.0) / max(1.0, warmup)
    progress = (step - warmup + 1.0) / max(1.0, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - min_ratio) + min_ratio)


class Optim:
    """AdamW over ``params`` with transformers' warmup + cosine-to-``min_lr_ratio`` schedule.

    ``get_cosine_with_min_lr_schedule_with_warmup_lr_rate`` rather than
    ``get_cosine_with_min_lr_schedule_with_warmup``: the latter starts warmup at ``0 / warmup``, so the
    first optimizer step has lr 0 and moves no weight (``tests/trainer/test_schedule.py``); the ``lr_rate``
    one starts at ``1 / warmup`` as winnow's own schedule did. Its cosine is one step further along than
    winnow's was (step ``s`` at ``(s - warmup + 1) / (total - warmup)``, so the last step trains at
    exactly ``lr * min_lr_ratio``): numbers in docs/CHANGES.md."""

    def __init__(
        self, p, params: list[torch.nn.Parameter], total_steps, cuda: bool, fp16: bool, start: int = 0
    ):
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

        self.p, self.params, self.total_steps = p, params, total_steps
        self.opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, fused=cuda or None)
        if start:  # rebuilt mid-run (a re-selection of the trainable parameters): the schedule goes on
            for g in self.opt.param_groups:
                g["initial_lr"] = p.lr
        self.sched = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
            self.opt, p.warmup_steps, total_steps(), min_lr_rate=p.min_lr_ratio, last_epoch=start - 1
        )
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, world: int, wsum: float, step: int, loss_sum: float) -> tuple[float, float]:
        """Normalise, clip, step, schedule and zero; returns the step's ``lr`` and the gradient norm. A
        non-finite loss or norm stops training before the update (:func:`ckpt_integrity.clip_checked`)."""
        from winnow.trainer import ckpt_integrity

        if self.scaler:
            self.scaler.unscale_(self.opt)
        for q in self.params:
            if q.grad is not None:
                q.grad.mul_(world / wsum)
        norm = ckpt_integrity.clip_checked(
            self.params, self.p.max_grad_norm, step, loss_sum, bool(self.scaler)
        )
        lr = self.opt.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return lr, norm
