"""The update of one optimizer step: AdamW, warmup then cosine, fp16 gradient scaling, normalisation.

AdamW (fused on CUDA), warmup then cosine to ``lr·min_lr_ratio``. Each micro-batch backpropagates its
unnormalised ``Σ w·ℓ``; at the end of the step the gradients, already averaged over ranks by DDP/FSDP2,
are scaled by ``world / Σ w`` (``Σ w`` all-reduced by the loop: an online policy may change weights)
before clipping, so the update is that of ``Σ w·ℓ / Σ w`` over the whole step. fp16 autocast (GPUs
without bf16) runs with a gradient scaler.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Optim:
    """AdamW over ``params`` with its schedule; ``total_steps()`` is read whenever the schedule is."""

    def __init__(
        self, p, params: list[torch.nn.Parameter], total_steps, cuda: bool, fp16: bool, start: int = 0
    ):
        self.p, self.params, self.total_steps = p, params, total_steps
        self.opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, fused=cuda or None)
        fn = lambda s: lr_factor(s, p.warmup_steps, self.total_steps(), p.min_lr_ratio)  # noqa: E731
        if start:  # rebuilt mid-run (a re-selection of the trainable parameters): the schedule goes on
            for g in self.opt.param_groups:
                g["initial_lr"] = p.lr
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, fn, last_epoch=start - 1)
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
