"""The training loop: one optimizer step = ``grad_accum`` micro-batches on each of ``world`` ranks.

The loop drives; the parts live elsewhere, each testable without it: where micro-batches come from
(:mod:`winnow.trainer.batches`: the planned epoch, or an online policy's mini-batches), the update
(:mod:`winnow.trainer.optim`: AdamW, schedule, normalisation by the step's ``Σ w``, clipping), what is
logged (:mod:`winnow.trainer.metrics`) and how the model learns (:mod:`winnow.trainer.method`: trainable
parameters, loss terms, forward changes). fp32 on CPU (bf16 is ~27x slower on this CPU), bf16 autocast
on GPUs that have it, fp16 autocast with a gradient scaler otherwise. ``WINNOW_FAULT_KILL_AFTER_STEPS=k``
SIGKILLs the process right after its k-th optimizer step (the resume test uses it).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winnow.core.layout import MicroBatch, empty_batch, layout_batch
from winnow.trainer import checkpoint, ckpt_integrity
from winnow.trainer.batches import BatchSource, Feed, PlannedBatches
from winnow.trainer.config import TrainParams
from winnow.trainer.data import TrainData
from winnow.trainer.distributed import Dist, all_reduce_sum, no_sync, wrap
from winnow.trainer.loss import WeightedLMLoss
from winnow.trainer.method import TrainingMethod
from winnow.trainer.metrics import Metrics, memory, mfu, peak_rss_mb  # noqa: F401  (re-exported)
from winnow.trainer.optim import Optim, lr_factor  # noqa: F401  (re-exported)
from winnow.trainer.packing import plan

FAULT_ENV = "WINNOW_FAULT_KILL_AFTER_STEPS"


@dataclass
class Env:
    device: torch.device
    dist: Dist
    out: Path | None
    _: KW_ONLY
    pad_id: int = 0
    scale: float = 1.0
    softcap: float | None = None
    always_keep_ids: tuple[int, ...] = ()  # online.always_keep as token ids of the model's tokenizer
    model_dir: Path | None = None  # the base: its tokenizer files go into each checkpoint


def _amp_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or dtype == "float32":
        return None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class Loop:
    """``methods``: the training methods (default ``p.methods()``; their trainable-parameter choice is
    already applied to ``model``: :func:`winnow.trainer.method.apply_trainable`)."""

    def __init__(
        self,
        p: TrainParams,
        data: TrainData,
        model: torch.nn.Module,
        env: Env,
        reference: Any | None = None,
        methods: list[TrainingMethod] | None = None,
    ):
        self.p, self.data, self.env, self.d = p, data, env, env.dist
        self.methods = p.methods() if methods is None else methods
        cuda = env.device.type == "cuda"
        # prompt tuning: padded rows only, each costing num_virtual_tokens more positions (prompt_tuning.py)
        packed_ok = cuda and not p.virtual_tokens
        self.layout = p.layout if p.layout != "auto" else ("packed" if packed_ok else "padded")
        self.eval_plan = (
            plan(data.eval.lengths + p.virtual_tokens, p.tokens_per_batch, self.layout)
            if data.eval.ids
            else []
        )
        if p.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_cls = WeightedLMLoss
        if p.online.selects and p.scoring_mode == "reuse":  # scores from the training forward
            from winnow.trainer.online_reuse import ReuseLMLoss as loss_cls
        terms = [t for m in self.methods for t in m.loss_terms()]
        self.loss_mod = loss_cls(model.to(env.device), env.scale, env.softcap, terms)
        self._wrap()  # before the batch source: DDP's broadcast reaches an online policy's history copy
        self.batches = self._source(reference)
        self.online = self.batches if p.online.policy != "none" else None  # its history, cache (tests)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = self.feed.total_steps(self.steps_per_epoch)
        self.amp = _amp_dtype(p.dtype, env.device)
        from winnow.trainer.kernel_agreement import agree_on_head_backend

        head_bias = getattr(model.get_output_embeddings(), "bias", None) is not None
        agree_on_head_backend(env.device, self.amp, head_bias, env.softcap is not None, self.d)
        self._optimizer(0)
        self.evals: dict[int, float] = {}
        self.kills_after = int(os.environ.get(FAULT_ENV, "0") or 0)
        self.steps_here = 0
        self.mask_id = env.pad_id
        for m in self.methods:
            m.attach(self)

    def _source(self, reference: Any | None) -> BatchSource:
        p, env = self.p, self.env
        self.feed = Feed(
            train=self.data.train, layout=self.layout, tokens_per_batch=p.tokens_per_batch,
            virtual_tokens=p.virtual_tokens, seed=p.seed, grad_accum=p.grad_accum, world=self.d.world,
            rank=self.d.rank, pad_id=env.pad_id, device=env.device, epochs=p.epochs, max_steps=p.max_steps,
            save_every=p.save_every,
        )  # fmt: skip
        if p.online.policy == "none":
            return PlannedBatches(self.feed)
        from winnow.trainer.online_batches import OnlineBatches

        recorder = None
        if p.online.record_weights:
            from winnow.trainer.online_record import WeightRecorder

            recorder = WeightRecorder(p, self.data, p.online.policy, env.device, self.d.main)
        op, model = p.online_params(env.always_keep_ids), self.loss_mod.model
        reuse = p.scoring_mode == "reuse"
        head = (env.scale, env.softcap)
        return OnlineBatches(self.feed, op, model, head, reference=reference, reuse=reuse, recorder=recorder)

    def _wrap(self) -> None:
        """The DDP/FSDP2 wrapper, and the parameters that train (FSDP2 makes them DTensors)."""
        self.wrapped = wrap(self.loss_mod, self.d, self.p.fsdp, self.env.device)
        self.params = [q for q in self.loss_mod.parameters() if q.requires_grad]

    def _optimizer(self, step: int) -> None:
        """AdamW and its schedule over :attr:`params`, from ``step`` on."""
        cuda = self.env.device.type == "cuda"
        self.update = Optim(
            self.p, self.params, lambda: self.total_steps, cuda, self.amp == torch.float16, step
        )
        self.opt, self.sched, self.scaler = self.update.opt, self.update.sched, self.update.scaler

    @property
    def plan(self) -> list:
        """The planned epoch's micro-batches (empty under an online policy)."""
        return getattr(self.batches, "plan", [])

    # ------------------------------------------------------------------------------- batches
    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's ``grad_accum`` micro-batches of optimizer step ``step``."""
        return self.batches.micro_batches(step)

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

    def _changed(self, b: MicroBatch) -> contextlib.ExitStack:
        """Every method's forward change, around one training micro-batch's forward and backward."""
        stack = contextlib.ExitStack()
        for m in self.methods:
            stack.enter_context(m.forward_change(b, self.loss_mod.model))
        return stack

    # ------------------------------------------------------------------------------- steps
    def train_step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._reselect(step)
        self.wrapped.train()
        mbs = self.micro_batches(step)
        from winnow.trainer.online import masked_thought_rate

        noise = masked_thought_rate(self.p.masked_thought, step, self.total_steps)
        loss_sum = self._accumulate(step, mbs, noise)
        local = [
            sum(b.weight_sum for b in mbs),
            float(loss_sum),
            sum(b.real_tokens for b in mbs),
            float(sum(len(b.weights) for b in mbs)),
            float(sum(b.len_sq for b in mbs)),
        ]
        wsum, lsum, tokens, rows, len_sq = all_reduce_sum(local, self.env.device)
        lr, norm = self.update.step(self.d.world, wsum, step, lsum)
        self.batches.after_step(step)
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
        for m in self.methods:
            rec |= m.metrics()
        if self.online is not None:
            rec |= {
                f"online_{k}" if k in ("kept_samples", "kept_tokens", "seen_samples") else k: v
                for k, v in self._online_stats().items()
            }
        lm = self.loss_mod.model
        return (
            rec | memory(self.env.device) | mfu(lm, self.env.device, self.d.world, tokens, rows, len_sq, dt)
        )

    def _accumulate(self, step: int, mbs: list[MicroBatch], noise: float) -> torch.Tensor:
        """Forward and backward of each micro-batch (gradients summed); the sum of their losses."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for m, b in enumerate(mbs):
            with no_sync(self.wrapped, last=m == len(mbs) - 1), self._changed(b):
                key = ((self.p.seed * 1_000_003 + step) * 4099 + self.d.rank) * 131 + m
                part = self._forward(self.wrapped, b, noise, key)
                self.update.backward(part)
            loss_sum += part.detach().double()
        return loss_sum

    def _reselect(self, step: int) -> None:
        """A training method changed which parameters train: new wrapper and optimizer (fresh state)."""
        if any([m.reselect(step, self.loss_mod.model) for m in self.methods]):
            self._wrap()
            self._optimizer(step)

    def _online_stats(self) -> dict[str, int]:
        keys = sorted(self.online.stats)
        summed = all_reduce_sum([float(self.online.stats[k]) for k in keys], self.env.device)
        return {k: int(v) for k, v in zip(keys, summed, strict=True)}

    def _fault_hook(self) -> None:
        self.steps_here += 1
        if self.kills_after and self.steps_here >= self.kills_after:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

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
        folder = checkpoint.step_dir(ckpt_root, steps[-1])
        for m in self.methods:  # first: the optimizer state below belongs to the resumed selection
            m.load(folder)
        self._reselect(steps[-1])
        state = checkpoint.load(folder, self.loss_mod, self.opt, self.sched)
        self.evals = {int(k): v for k, v in state.get("evals", {}).items()}
        if self.d.main:  # a kill between a save and its prune left one checkpoint too many
            checkpoint.prune(ckpt_root, self.p.keep_checkpoints, ckpt_integrity.best_step(self.evals))
        self.batches.load(folder)
        if state.get("world") != self.d.world and self.d.main:
            print(
                f"resuming step {state['step']} on {self.d.world} rank(s), checkpoint written by "
                f"{state.get('world')}: not bitwise as an uninterrupted run, and the data position is re-derived "
                "for the new world size (some micro-batches of the current epoch may repeat or be skipped)",
                file=sys.stderr,
            )
        elif self.d.main:  # same world size: the run continues as if never stopped (the resume tests)
            print(f"resumed from step {state['step']} (bitwise-identical on CPU)", flush=True)
        return int(state["step"])

    def save(self, ckpt_root: Path, step: int) -> None:
        meta = {"world": self.d.world, "evals": self.evals, "total_steps": self.total_steps}
        from winnow.trainer.hub_ckpt import HubLayout

        hub = HubLayout(self.loss_mod.model, self.env.model_dir)
        checkpoint.save(
            ckpt_root, step, self.loss_mod, self.opt, self.sched, meta, self.d.rank, self._save_extra, hub
        )
        if self.d.main:
            scored = {k: v for k, v in self.evals.items() if v is not None}
            best = min(scored, key=scored.get) if scored else None
            checkpoint.prune(ckpt_root, self.p.keep_checkpoints, best)

    def _save_extra(self, folder: Path) -> None:
        """The batch source's and the training methods' state, into the checkpoint folder being written."""
        self.batches.save(folder)
        for m in self.methods:
            m.save(folder)
