"""``online_scoring=reuse``: the current model's scores from the training forward itself.

The default (``separate``, :mod:`winnow.trainer.online_batches`) scores a mini-batch with a no-grad
forward of the current model, lets the policy decide, then trims and packs the kept samples and runs the
weighted forward+backward on them. ``reuse`` runs one forward *with grad* over every sample of the
mini-batch, takes the current model's log-prob (and entropy, attention to the prompt) at every
supervised position from its detached hidden states, applies the policy, and back-propagates the loss
of the kept positions through that same forward. What it can and cannot do:

* It saves the current model's body forward (the no-grad head over the supervised positions stays: the
  policy needs every position's log-prob before the weights of the training head are known, and the
  fused head computes its gradient with those weights in the same pass). Other models (Rho-1's
  reference, ssToken's history) still run their own no-grad forwards.
* It cannot drop a sample before the forward, nor trim a sample after its last kept token: the body runs
  forward and backward over the whole mini-batch. Q-Tuning, which trains on a quarter of the samples,
  therefore pays a full forward+backward of all of them instead of one of a quarter plus a no-grad
  forward of all: reuse is the wrong trade for it by construction (measured anyway in bench_train.py).
* The policy sees the whole mini-batch, so a mini-batch is one training micro-batch (its length-bucketed
  row groups run in one call; ``tokens_per_batch`` bounds each group, not the mini-batch), and every
  group's activations live until the backward: memory as one micro-batch of the whole mini-batch.
* Masked Thought masks the training forward's inputs, while scores must see the unmasked ones: the two
  are refused together. Scores come from the model in train mode (identical unless it has dropout).

Measured in ``benchmarks/bench_train.py --interleaved`` side by side with the separate forward on the same
mini-batches (loaded 2-core VM, ratio to the mini-batch control): Q-Tuning 0.68x (separate 0.59x), Rho-1
1.30-1.41x (separate 1.33-1.53x), ssToken 1.36-1.65x (separate 1.32-1.82x). Not a clear win for any
policy, so ``separate`` stays the default (benchmarks/RESULTS.md). With ssToken's history losses cached
(``history=start``, from epoch 2 on) one run measured reuse 0.94-1.13x against separate 1.08-1.24x.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from winnow.core.layout import MicroBatch, layout_batch
from winnow.kernels.chunked_head import LMHead
from winnow.kernels.switch import linear_cross_entropy, logprob_entropy
from winnow.trainer import online as ol
from winnow.trainer.loss import WeightedLMLoss, body_and_head
from winnow.trainer.online_params import OnlineParams


@dataclass
class Group:
    """One row group of a mini-batch, laid out as the trainer lays out micro-batches."""

    batch: MicroBatch  # gather/targets/weights: every offline-weighted target of the group
    rows: np.ndarray  # (M,) mini-batch row of each gathered target
    cols: np.ndarray  # (M,) its index in that row (table convention: token i as a target)
    frame_rows: np.ndarray  # (R*W,) mini-batch row of each flat position, -1 on padding


def group(
    seqs: list[np.ndarray], weights: list[np.ndarray], members: list[int], layout: str, pad: int
) -> Group:
    """Lay out the mini-batch rows ``members`` and map every flat position back to ``(row, index)``."""
    mb = layout_batch([seqs[k] for k in members], [weights[k] for k in members], layout, pad)
    width = mb.input_ids.shape[1]
    rows = np.full(mb.input_ids.size, -1, np.int64)
    cols = np.zeros(mb.input_ids.size, np.int64)
    if layout == "packed":
        cu = mb.cu_seqlens.astype(np.int64)
        for j, k in enumerate(members):
            rows[cu[j] : cu[j + 1]] = k
            cols[cu[j] : cu[j + 1]] = np.arange(cu[j + 1] - cu[j])
    else:
        for j, k in enumerate(members):
            rows[j * width : j * width + len(seqs[k])] = k
            cols[j * width : j * width + len(seqs[k])] = np.arange(len(seqs[k]))
    target = mb.gather + 1  # the position of the target token each gathered state predicts
    return Group(mb, rows[target], cols[target], rows)


class ReuseSelect:
    """Passed to :class:`ReuseLMLoss` with one mini-batch: scores it from the training forward, applies
    the policy, returns the weighted loss of what the policy kept and reports the decision back."""

    def __init__(
        self,
        groups: list[Group],
        scored: ol.Scored,
        op: OnlineParams,
        need: set[str],
        done: Callable[[ol.Decision], Any],
        outer: MicroBatch,
    ):
        self.groups, self.scored, self.op, self.need, self.done, self.outer = (
            groups,
            scored,
            op,
            need,
            done,
            outer,
        )

    def loss(self, mod: WeightedLMLoss) -> torch.Tensor:
        from winnow.core.attention_capture import AttentionCapture

        body, head = body_and_head(mod.model)
        attention = "attention" in self.need
        s, hs = self.scored, []
        s.nll = torch.full(s.mask.shape, math.nan, dtype=torch.float64)
        s.entropy = s.nll.clone() if "entropy" in self.need else None
        s.attn = s.nll.clone() if attention else None
        dev = head.weight.device
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        for g in self.groups:
            pos = t(g.batch.position_ids) if g.batch.layout == "packed" else None
            cap = AttentionCapture(body, -1) if attention else None
            if cap is not None:
                with cap:
                    hidden = mod.hidden(t(g.batch.input_ids), pos)
            else:
                hidden = mod.hidden(t(g.batch.input_ids), pos)
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, t(g.batch.gather))
            hs.append(h)
            self._score(mod, head, h.detach(), t(g.batch.targets), g, cap)
        decision = ol.apply_policy(s, self.op)
        self.done(decision)
        total = torch.zeros((), dtype=torch.float32, device=head.weight.device)
        bias = getattr(head, "bias", None)
        for g, h in zip(self.groups, hs, strict=True):
            w = decision.weight[torch.from_numpy(g.rows), torch.from_numpy(g.cols)].to(torch.float32)
            keep = torch.nonzero(w).squeeze(1).to(h.device)
            g.batch.weights = w[w != 0].numpy()  # what the loop sums into Σ w and weighted_tokens
            if keep.numel() == 0:
                total = total + h.sum() * 0.0  # keeps every parameter in the graph (DDP)
                continue
            hk = h.index_select(0, keep) * mod.scale
            b = None if bias is None else bias * mod.scale
            tg = torch.from_numpy(g.batch.targets).to(h.device).index_select(0, keep)
            total = total + linear_cross_entropy(hk, head.weight, tg, w.to(h.device)[keep], b, mod.softcap)
        self.outer.weights = np.concatenate([g.batch.weights for g in self.groups]).astype(np.float32)
        return total

    @torch.no_grad()
    def _score(self, mod, head, h, targets, g: Group, cap) -> None:
        s = self.scored
        lm_head = LMHead(head.weight, getattr(head, "bias", None), mod.scale, mod.softcap).to_fp32()
        lp, ent = logprob_entropy(lm_head, h, targets, entropy=s.entropy is not None)
        rows, cols = torch.from_numpy(g.rows), torch.from_numpy(g.cols)
        s.nll[rows, cols] = -lp.double().cpu()
        if ent is not None:
            s.entropy[rows, cols] = ent.double().cpu()
        if cap is not None:
            s.attn[rows, cols] = self._attention(cap, g, h.device)
            cap.release()

    def _attention(self, cap, g: Group, dev) -> torch.Tensor:
        """Head-mean attention of each supervised query to the unweighted tokens of its own sample."""
        from winnow.core.attention_capture import attention_importance

        shape = g.batch.input_ids.shape
        fr = torch.from_numpy(g.frame_rows)
        real = fr >= 0
        query = torch.zeros(fr.numel(), dtype=torch.bool)
        query[torch.from_numpy(g.batch.gather + 1)] = True
        segment = fr.view(shape).to(dev)
        keys = (real & ~query).view(shape).to(dev)
        imp = attention_importance(
            cap.module,
            cap.hidden.detach(),
            tuple(x.detach() for x in cap.position_embeddings),
            segment,
            keys,
            query.view(shape).to(dev),
        )
        return imp.reshape(-1)[torch.from_numpy(g.batch.gather + 1).to(dev)].double().cpu()


class ReuseLMLoss(WeightedLMLoss):
    """:class:`WeightedLMLoss` that, given ``select``, scores and selects inside its forward (so the
    forward and the gradient hooks of DDP/FSDP2 stay in the one wrapped call)."""

    def forward(self, *args, select: ReuseSelect | None = None) -> torch.Tensor:
        if select is None:
            return super().forward(*args)
        return select.loss(self)
