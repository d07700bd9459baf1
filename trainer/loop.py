"""The training loop: one optimizer step = ``grad_accum`` micro-batches on each of ``world`` ranks.

* **Which micro-batches.** The plan (:mod:`winnow.trainer.packing`) is global; in epoch ``e`` its
  micro-batches run in the order ``epoch_order(seed, e)``, and step ``s`` of the epoch gives rank ``r``
  positions ``s·world·g + r·g + m`` (m < g). So ``g`` on 2 ranks and ``2g`` in one process see the same
  micro-batches per step, and a rank without one at the end of an epoch runs an empty micro-batch
  (weight 0) so the all-reduce still happens.
* **Normalisation.** Each micro-batch backpropagates its unnormalised ``Σ w·ℓ``; at the end of the step
  ``Σ w`` is all-reduced (it would be known from the plan, but an online policy may change weights) and
  the gradients, already averaged over ranks by DDP/FSDP2, are scaled by ``world / Σ w`` before
  clipping: the update is that of ``Σ w·ℓ / Σ w`` over the whole step.
* **Numerics.** AdamW (fused on CUDA), warmup then cosine to ``lr·min_lr_ratio``; fp32 on CPU (bf16 is
  ~27x slower on this CPU), bf16 autocast on GPUs that have it, fp16 autocast with a gradient scaler
  otherwise. ``WINNOW_FAULT_KILL_AFTER_STEPS=k`` SIGKILLs the process right after its k-th optimizer
  step (the resume test uses it).
* **Online selection** (issue 13) plugs in at :meth:`Loop.micro_batches`: a policy will see each
  mini-batch of samples before it is laid out, with the current model, and return new weights.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winnow.trainer import checkpoint, ckpt_integrity
from winnow.trainer.config import TrainParams
from winnow.trainer.data import TrainData
from winnow.trainer.distributed import Dist, all_reduce_sum, no_sync, wrap
from winnow.trainer.loss import WeightedLMLoss
from winnow.trainer.packing import MicroBatch, empty_batch, layout_batch, plan, step_batches

FAULT_ENV = "WINNOW_FAULT_KILL_AFTER_STEPS"


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Env:
    device: torch.device
    dist: Dist
    out: Path
    pad_id: int = 0
    scale: float = 1.0
    softcap: float | None = None
    always_keep_ids: tuple[int, ...] = ()  # TrainParams.always_keep as token ids of the model's tokenizer


class Loop:
    def __init__(
        self, p: TrainParams, data: TrainData, model: torch.nn.Module, env: Env, reference: Any | None = None
    ):
        self.p, self.data, self.env, self.d = p, data, env, env.dist
        cuda = env.device.type == "cuda"
        # prompt tuning: padded rows only, each costing num_virtual_tokens more positions (prompt_tuning.py)
        packed_ok = cuda and not p.virtual_tokens
        self.layout = p.layout if p.layout != "auto" else ("packed" if packed_ok else "padded")
        self.plan = plan(data.train.lengths + p.virtual_tokens, p.tokens_per_batch, self.layout)
        self.eval_plan = (
            plan(data.eval.lengths + p.virtual_tokens, p.tokens_per_batch, self.layout) if data.eval.ids else []
        )
        self.per_step = self.d.world * p.grad_accum
        self.steps_per_epoch = math.ceil(len(self.plan) / self.per_step)
        total = p.epochs * self.steps_per_epoch
        self.total_steps = min(total, p.max_steps) if p.max_steps else total
        if p.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_cls = WeightedLMLoss
        if p.online not in ("none", "all") and p.scoring_mode == "reuse":  # scores from the training forward
            from winnow.trainer.online_reuse import ReuseLMLoss as loss_cls
        self.loss_mod = loss_cls(model.to(env.device), env.scale, env.softcap)
        self.wrapped = wrap(self.loss_mod, self.d, p.fsdp, env.device)
        self.params = [q for q in self.loss_mod.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay, fused=cuda or None)
        fn = lambda s: lr_factor(s, p.warmup_steps, self.total_steps, p.min_lr_ratio)  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, fn)
        self.amp = self._amp_dtype(p.dtype, env.device)
        from winnow.trainer.kernel_agreement import agree_on_head_backend

        head_bias = getattr(model.get_output_embeddings(), "bias", None) is not None
        agree_on_head_backend(env.device, self.amp, head_bias, env.softcap is not None, self.d)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.evals: dict[int, float] = {}
        self.kills_after = int(os.environ.get(FAULT_ENV, "0") or 0)
        self.steps_here = 0
        self.online = None
        if p.online != "none":
            from winnow.trainer.online_batches import OnlineBatches

            self.online = OnlineBatches(self, p.online_params(env.always_keep_ids), reference)
            self.steps_per_epoch = self.online.steps_per_epoch
            total = p.epochs * self.steps_per_epoch
            # the scheduler's lambda reads self.total_steps when called: no second scheduler needed
            self.total_steps = min(total, p.max_steps) if p.max_steps else total
        self.mask_id = env.pad_id

    @staticmethod
    def _amp_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
        if device.type != "cuda" or dtype == "float32":
            return None
        if dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    # ------------------------------------------------------------------------------- batches
    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's ``grad_accum`` micro-batches of optimizer step ``step``."""
        if self.online is not None:
            return self.online.micro_batches(step)
        tr, pad = self.data.train, self.env.pad_id
        out = []
        for b in step_batches(
            step, len(self.plan), self.p.seed, self.d.world, self.d.rank, self.p.grad_accum
        ):
            if b is None:
                out.append(empty_batch(pad))
                continue
            idx = self.plan[b]
            out.append(layout_batch([tr.ids[k] for k in idx], [tr.weights[k] for k in idx], self.layout, pad))
        return out

    def _forward(
        self, module: torch.nn.Module, b: MicroBatch, noise: float = 0.0, key: int = 0
    ) -> torch.Tensor:
        dev = self.env.device
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        pos = t(b.position_ids) if b.layout == "packed" else None
        ids = t(b.input_ids)
        if noise > 0.0:  # Masked Thought: response *inputs* (the weighted targets, as inputs) -> mask id
            from winnow.trainer.online import masked_thought_inputs

            flat = torch.zeros(ids.numel(), dtype=torch.bool)
            flat[torch.from_numpy(b.gather + 1)] = True
            # a function of (seed, step, rank, micro-batch): resumable; modulo 2^63, as a seed above ~3e7
            # overflowed the generator's 64-bit seed
            g = torch.Generator().manual_seed(key % (1 << 63))
            ids = masked_thought_inputs(ids, flat.view(ids.shape).to(dev), noise, self.mask_id, g)
        ctx = torch.autocast(dev.type, dtype=self.amp) if self.amp is not None else nullcontext()
        extra = {"select": b.select} if getattr(b, "select", None) is not None else {}  # online_reuse
        with ctx:
            return module(ids, t(b.gather), t(b.targets), t(b.weights), pos, **extra)

    # ------------------------------------------------------------------------------- steps
    def train_step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.wrapped.train()
        mbs = self.micro_batches(step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        from winnow.trainer.online import masked_thought_rate

        noise = masked_thought_rate(self.p.masked_thought, step, self.total_steps)
        for m, b in enumerate(mbs):
            with no_sync(self.wrapped, last=m == len(mbs) - 1):
                key = ((self.p.seed * 1_000_003 + step) * 4099 + self.d.rank) * 131 + m
                part = self._forward(self.wrapped, b, noise, key)
                (self.scaler.scale(part) if self.scaler else part).backward()
            loss_sum += part.detach().double()
        local = [
            sum(b.weight_sum for b in mbs),
            float(loss_sum),
            sum(b.real_tokens for b in mbs),
            float(sum(len(b.weights) for b in mbs)),
            float(sum(b.len_sq for b in mbs)),
        ]
        wsum, lsum, tokens, rows, len_sq = all_reduce_sum(local, self.env.device)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        for q in self.params:
            if q.grad is not None:
                q.grad.mul_(self.d.world / wsum)
        norm = ckpt_integrity.clip_checked(self.params, self.p.max_grad_norm, step, lsum, bool(self.scaler))
        lr = self.opt.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.online is not None:
            self.online.after_step()
        self._fault_hook()
        dt = time.perf_counter() - t0
        rec = {
            "step": step + 1,
            "loss": lsum / wsum,
            "weight_sum": wsum,
            "tokens": int(tokens),
            "weighted_tokens": int(rows),
            "tokens_per_s": tokens / dt,
            "weighted_tokens_per_s": rows / dt,
            "lr": lr,
            "grad_norm": float(norm),
            "step_s": dt,
        }
        if noise > 0.0:
            rec["masked_thought_p"] = noise
        if self.online is not None:
            rec |= {
                f"online_{k}" if k in ("kept_samples", "kept_tokens", "seen_samples") else k: v
                for k, v in self._online_stats().items()
            }
        return rec | self._memory() | self._mfu(tokens, rows, len_sq, dt)

    def _online_stats(self) -> dict[str, int]:
        keys = sorted(self.online.stats)
        summed = all_reduce_sum([float(self.online.stats[k]) for k in keys], self.env.device)
        return {k: int(v) for k, v in zip(keys, summed, strict=True)}

    def _fault_hook(self) -> None:
        self.steps_here += 1
        if self.kills_after and self.steps_here >= self.kills_after:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _memory(self) -> dict[str, float]:
        out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.env.device.type == "cuda":
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.env.device) / 2**20, 1)
        return out

    def _mfu(self, tokens: float, rows: float, len_sq: float, dt: float) -> dict[str, float]:
        """GPU only: the shared convention of :mod:`winnow.trainer.mfu` over every rank's work."""
        if self.env.device.type != "cuda":
            return {}
        from winnow.trainer.mfu import mfu, step_flops

        flops = step_flops(self.loss_mod.model, tokens, rows, len_sq)
        return {"mfu": round(mfu(flops, dt, self.d.world), 4)}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over every supervised token of the held-out samples (all ranks, same call count)."""
        if not self.eval_plan:
            return None
        self.loss_mod.eval()
        ev = self.data.eval
        n_calls = math.ceil(len(self.eval_plan) / self.d.world)
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        count = 0.0
        for c in range(n_calls):
            i = c * self.d.world + self.d.rank
            if i < len(self.eval_plan):
                idx = self.eval_plan[i]
                b = layout_batch(
                    [ev.ids[k] for k in idx], [ev.weights[k] for k in idx], self.layout, self.env.pad_id
                )
            else:
                b = empty_batch(self.env.pad_id)
            total += self._forward(self.loss_mod, b).double()
            count += b.weight_sum
        s, n = all_reduce_sum([float(total), count], self.env.device)
        return s / n

    # ------------------------------------------------------------------------------- driving
    def resume(self, ckpt_root: Path) -> int:
        steps = ckpt_integrity.good_steps(ckpt_root, self.d.main)  # damaged ones reported and skipped
        if not steps:
            return 0
        state = checkpoint.load(
            checkpoint.step_dir(ckpt_root, steps[-1]), self.loss_mod, self.opt, self.sched
        )
        self.evals = {int(k): v for k, v in state.get("evals", {}).items()}
        if self.d.main:  # a kill between a save and its prune left one checkpoint too many
            checkpoint.prune(ckpt_root, self.p.keep_checkpoints, ckpt_integrity.best_step(self.evals))
        if self.online is not None:
            self.online.load(checkpoint.step_dir(ckpt_root, steps[-1]))
        if state.get("world") != self.d.world and self.d.main:
            print(
                f"resuming step {state['step']} on {self.d.world} rank(s), checkpoint written by "
                f"{state.get('world')}: not bitwise as an uninterrupted run, and the data position is re-derived "
                "for the new world size (some micro-batches of the current epoch may repeat or be skipped)",
                file=sys.stderr,
            )
        return int(state["step"])

    def save(self, ckpt_root: Path, step: int) -> None:
        meta = {"world": self.d.world, "evals": self.evals, "total_steps": self.total_steps}
        extra = self.online.save if self.online is not None else None
        checkpoint.save(ckpt_root, step, self.loss_mod, self.opt, self.sched, meta, self.d.rank, extra)
        if self.d.main:
            scored = {k: v for k, v in self.evals.items() if v is not None}
            best = min(scored, key=scored.get) if scored else None
            checkpoint.prune(ckpt_root, self.p.keep_checkpoints, best)


class Metrics:
    """``metrics.jsonl``: appended by rank 0; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, main: bool):
        self.path, self.main = path, main

    def truncate_after(self, step: int) -> None:
        if not (self.main and self.path.exists()):
            return
        from winnow.pipeline.store import atomic_write_bytes

        keep = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in keep).encode())

    def write(self, rec: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
