"""The trainer's online mode: per-step mini-batches scored by the current model, selected, then packed.

Without an online policy the loop plans its packs once (:mod:`winnow.trainer.packing`). With one,
every optimizer step takes ``grad_accum`` mini-batches of the policy's ``batch_size`` samples (8 by
default, the Q-Tuning paper's per-device batch; ``online.<policy>.batch_size``) per rank, in the seeded order of
:func:`winnow.stages.topk.minibatches` (the offline stages' definition), and for each:

1. one no-grad forward of the current model over the trimmed samples (right-padded rows; causal, so
   padding never reaches a real position) gives log-prob and full-vocabulary entropy at every weighted
   target through :func:`winnow.kernels.switch.logprob_entropy` (no ``[N, V]`` logits); ``rho1`` adds
   a reference forward, ``sstoken`` a history forward and the last layer's attention to the prompt
   (the model pass's recomputation, :mod:`winnow.kernels.attention_importance`): all of it in
   :class:`winnow.trainer.online_scorer.Scorer`, which computes what the policy ``needs``;
2. the policy object (:mod:`winnow.trainer.online_policy`) returns sample drops and token weights;
3. the kept samples are trimmed again and packed into micro-batches as usual; ranks pad to the same
   number of micro-batches (a collective per forward under FSDP2).

``online_scoring=reuse`` (:mod:`winnow.trainer.online_reuse`) takes the current model's scores from the
training forward instead of a separate no-grad forward. Measured side by side on the same mini-batches
(``bench_train.py --interleaved``, against the mini-batch control; near-idle 2-core VM): Q-Tuning at
``r_sample=0.25`` 0.57-0.61x separate vs 0.80-0.92x reuse (reuse must run forward+backward through every
sample); Rho-1 1.45-1.74x vs 1.49-1.62x (no consistent winner); ssToken 1.49-1.73x vs 1.40-1.43x, and
reuse also won all four rows of the cached-history run. So ``online_scoring=auto`` (the default) reuses
for ssToken and runs the separate forward for the others (and for ssToken under LoRA or Masked Thought,
which reuse does not serve or was not measured with).

``record_weights=true`` hands every decision to :mod:`winnow.trainer.online_record`, which writes one
``selection/online-<name>-epoch<E>`` table per epoch into the run.

The history model of ssToken is the model training started from (``history=start``) or an EMA of the
weights updated after every optimizer step (``ema``, Eq. 4); the EMA tensors are saved with every
checkpoint so a resumed run is bitwise identical on CPU. With ``history=start`` a sample's history
losses never change: :mod:`winnow.trainer.online_history_cache` computes them the first time the sample
is drawn and reads them back in later epochs (``sstoken.cache_history``, default on; 4 bytes per
supervised token; saved with every checkpoint). ssToken's cost against the mini-batch control, measured
side by side (``bench_train.py --interleaved --epochs 2``, loaded VM, benchmarks/RESULTS.md): epoch 1
1.46-1.71x separate / 1.34-1.37x reuse (the history forward still runs), epoch 2 1.08-1.24x separate /
0.94-1.13x reuse (what remains is the current model's scoring forward and head pass).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winnow.trainer import online as ol
from winnow.trainer.batches import BatchSource, Feed
from winnow.trainer.online_scorer import EMA_FILE, Scorer, score_rows  # noqa: F401  (re-exported)
from winnow.trainer.packing import MicroBatch, empty_batch, layout_batch, plan, trim


def _max_over_ranks(value: int, device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class OnlineBatches(BatchSource):
    """The micro-batches of an online policy: ``feed.grad_accum`` mini-batches of the policy's
    ``batch_size`` samples per rank and step, scored, selected, trimmed and packed.

    ``model``: the model being trained (its no-grad forward scores a mini-batch; under LoRA its adapters
    are switched off for ``rho1.reference=base``); ``head``: its logit ``(scale, softcap)``;
    ``reference``: Rho-1's reference model (or ``"base"``); ``reuse``: the current model's scores come
    from the training forward (:mod:`winnow.trainer.online_reuse`); ``recorder``: a
    :class:`winnow.trainer.online_record.WeightRecorder` (``record_weights=true``).
    """

    def __init__(
        self,
        feed: Feed,
        op: ol.OnlineParams,
        model: Any,
        head: tuple[float, float | None],
        *,
        reference: Any | None = None,
        reuse: bool = False,
        recorder: Any | None = None,
    ):
        self.feed, self.op = feed, op
        self.policy = op.chosen
        self.need = ol.needs(op)
        self.n = len(feed.train.ids)
        self.batch_size = self.policy.batch_size
        self.n_minibatches = math.ceil(self.n / self.batch_size)
        self.steps_per_epoch = max(1, math.ceil(self.n_minibatches / feed.per_step))
        self.total_steps = feed.total_steps(self.steps_per_epoch)
        self.reuse, self.recorder = reuse and op.selects, recorder
        span = (self.steps_per_epoch, self.total_steps)
        self.scorer = Scorer(feed, op, model, head, reference, span)
        self.stats: dict[str, int] = {}

    # ---------------------------------------------------------------------------------- selection
    def _order(self, epoch: int) -> list[np.ndarray]:
        from winnow.stages.topk import minibatches

        return minibatches(self.n, self.batch_size, seed=self.feed.seed * 1_000_003 + epoch)

    def _select(self, idx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        tr = self.feed.train
        seqs, weights = [tr.ids[k] for k in idx], [tr.weights[k] for k in idx]
        self.stats["seen_samples"] = self.stats.get("seen_samples", 0) + len(idx)
        if not self.op.selects:  # the same mini-batches, nothing scored: the control of the policies
            out = [
                (np.asarray(x, dtype=np.int64), np.asarray(w, dtype=np.float32))
                for x, w in zip(seqs, weights, strict=True)
            ]
            for k, (_, w) in zip(idx, out, strict=True):
                self._note(int(k), w, "all")
            return out
        decision = ol.apply_policy(self.scorer.scored(idx, seqs, weights), self.op)
        return [t for t in self._account(idx, seqs, decision) if t is not None]

    def _account(self, idx: np.ndarray, seqs: list[np.ndarray], decision: ol.Decision) -> list:
        """Stats and recorded weights of one decision; each sample trimmed to what it trains on (or None)."""
        for key, value in decision.stats.items():
            self.stats[key] = self.stats.get(key, 0) + int(value)
        out = []
        for r, k in enumerate(idx):
            w = decision.weight[r, : len(seqs[r])].numpy().astype(np.float32)
            t = trim(seqs[r], w) if decision.keep[r] else None
            default = "kept" if t is not None else "no_token_kept"
            self._note(
                int(k), None if t is None else t[1], decision.reason[r] if decision.reason else default
            )
            out.append(t)
        return out

    def _reuse_batch(self, idx: np.ndarray) -> MicroBatch:
        """One micro-batch holding the whole mini-batch; the policy runs inside its training forward."""
        from winnow.trainer import online_reuse as reuse

        f, tr = self.feed, self.feed.train
        seqs, weights = [tr.ids[k] for k in idx], [tr.weights[k] for k in idx]
        self.stats["seen_samples"] = self.stats.get("seen_samples", 0) + len(idx)
        scored = self.scorer.scored(idx, seqs, weights, current=False)
        lengths = [len(x) for x in seqs]
        groups = [
            reuse.group(seqs, weights, members, f.layout, f.pad_id)
            for members in plan(lengths, f.tokens_per_batch, f.layout)
        ]
        outer = empty_batch(f.pad_id)
        outer.n_samples, outer.real_tokens = len(seqs), sum(lengths)
        outer.len_sq = sum(n * n for n in lengths)
        done = lambda d: self._account(idx, seqs, d)  # noqa: E731
        outer.select = reuse.ReuseSelect(groups, scored, self.op, self.need, done, outer)
        return outer

    def _note(self, k: int, weight: np.ndarray | None, reason: str) -> None:
        if self.recorder is not None:
            self.recorder.note(k, weight, reason)

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of optimizer step ``step`` (padded to the ranks' common count)."""
        f = self.feed
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        # the same keys on every rank (the loop all-reduces them by sorted key), drawn mini-batch or not
        self.stats = dict.fromkeys(["seen_samples", *self.policy.STATS], 0)
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        g, world, rank = f.grad_accum, f.world, f.rank
        out = []
        for m in range(g):
            i = within * world * g + rank * g + m
            if i < len(order) and self.reuse:
                out.append(self._reuse_batch(order[i]))
            elif i < len(order):
                kept += self._select(order[i])
        if kept:
            lengths = [len(s) for s, _ in kept]
            for group in plan(lengths, f.tokens_per_batch, f.layout):
                out.append(
                    layout_batch([kept[k][0] for k in group], [kept[k][1] for k in group], f.layout, f.pad_id)
                )
        want = _max_over_ranks(max(len(out), 1), f.device)
        return out + [empty_batch(f.pad_id) for _ in range(want - len(out))]

    # ---------------------------------------------------------------------------------- state
    def after_step(self, step: int) -> None:
        done = step + 1
        epoch_end = done % self.steps_per_epoch == 0 or done == self.total_steps
        # the loop saves a checkpoint after this hook: gather what the ranks hold before it
        gather = epoch_end or self.feed.checkpoint_after(done)
        self.scorer.after_step(gather)
        if gather and self.recorder is not None:
            self._record_after(done, epoch_end)

    def _record_after(self, done: int, epoch_end: bool) -> None:
        """Gather the recorded rows onto rank 0 before every checkpoint and at the end of an epoch, where
        rank 0 writes the epoch's table."""
        self.recorder.reduce()
        if epoch_end:
            if self.feed.rank == 0:
                self.recorder.write((done - 1) // self.steps_per_epoch)
            self.recorder.reset()

    def save(self, path: Path) -> None:
        if self.recorder is not None:
            self.recorder.save(path)
        self.scorer.save(path)

    def load(self, path: Path) -> None:
        if self.recorder is not None:
            self.recorder.load(path)
        self.scorer.load(path)

    @property
    def history(self) -> Any | None:
        """The history model (ssToken), or None."""
        return self.scorer.history

    @property
    def cache(self) -> Any | None:
        """The frozen history's per-sample losses (online_history_cache), or None."""
        return self.scorer.cache
