"""The online batch source's scoring: the signals a policy ``needs`` on one mini-batch, in the table frame.

:class:`Scorer` runs the current model's no-grad forward (log-prob, full-vocabulary entropy, the last
layer's attention to the prompt), Rho-1's reference model (or the base under LoRA, adapters off) and the
history model (a frozen copy of the starting model, or its EMA updated after every optimizer step), and
keeps the history losses of a frozen history per sample when a later epoch reads them back
(:mod:`winnow.trainer.online_history_cache`). What it needs to know of the run is the :class:`Feed`.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winnow.kernels.chunked_head import LMHead
from winnow.kernels.switch import logprob_entropy
from winnow.trainer import online as ol
from winnow.trainer.batches import Feed
from winnow.trainer.loss import body_and_head, unwrap
from winnow.trainer.packing import plan

EMA_FILE = "ema_history.safetensors"


def _padded(
    seqs: list[np.ndarray], weights: list[np.ndarray], pad_id: int, device
) -> tuple[torch.Tensor, ...]:
    """Right-padded ``ids`` (B, W) on ``device``, ``weights`` (B, W) float64 and ``real`` (B, W) bool."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    w = torch.zeros((len(seqs), width), dtype=torch.float64)
    for r, (s, x) in enumerate(zip(seqs, weights, strict=True)):
        ids[r, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        w[r, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.float64))
    w[:, 0] = 0.0  # index 0 has no predecessor
    real = torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]
    return ids.to(device), w, real


@torch.no_grad()
def score_rows(
    model: Any,
    scale: float,
    softcap: float | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    entropy: bool,
    real: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token ``nll`` (and ``entropy``; ``attn`` when ``real`` marks the rows' tokens) at the masked
    targets of right-padded rows, NaN elsewhere. ``attn[i]``: head-mean attention of query ``i`` in the
    last layer to the unweighted tokens of its row (ssToken's response-to-prompt score)."""
    attention = real is not None
    from winnow.stages.passes.attention_capture import AttentionCapture, attention_importance

    body, head_mod = body_and_head(model)
    capture = AttentionCapture(body, -1) if attention else nullcontext()
    with capture as cap:
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # (B, W, D)
    rows, cols = torch.nonzero(mask.to(ids.device), as_tuple=True)
    h = hidden[rows, cols - 1]  # the state before target i predicts it
    head = LMHead(head_mod.weight, getattr(head_mod, "bias", None), scale, softcap).to_fp32()
    lp, ent = logprob_entropy(head, h, ids[rows, cols], entropy=entropy)
    out = {"nll": torch.full(mask.shape, math.nan, dtype=torch.float64)}
    out["nll"][rows.cpu(), cols.cpu()] = -lp.double().cpu()
    if entropy:
        out["entropy"] = torch.full(mask.shape, math.nan, dtype=torch.float64)
        out["entropy"][rows.cpu(), cols.cpu()] = ent.double().cpu()
    if attention:
        dev = ids.device
        segment = torch.where(real.to(dev), torch.arange(ids.shape[0], device=dev)[:, None], -1)
        keys = (real & ~mask).to(dev)
        imp = attention_importance(
            cap.module, cap.hidden, cap.position_embeddings, segment, keys, mask.to(dev)
        )
        out["attn"] = torch.where(mask, imp.double().cpu(), math.nan)
    return out


class Scorer:
    """``need``: the policy's signals; ``history_spec``: its :meth:`OnlinePolicy.history_model`;
    ``epochs_span``: ``(steps_per_epoch, total_steps)`` (a history cache pays off only past epoch 1)."""

    def __init__(
        self,
        feed: Feed,
        op: ol.OnlineParams,
        model: Any,
        head: tuple[float, float | None],
        reference: Any | None,
        epochs_span: tuple[int, int],
    ):
        self.feed, self.op, self.model, self.head, self.reference = feed, op, model, head, reference
        self.need = ol.needs(op)
        self.steps_per_epoch, self.total_steps = epochs_span
        self.history_spec = op.chosen.history_model() if "history" in self.need else None
        self.history = None
        if self.history_spec is not None:
            self.history = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.cache = self._history_cache()

    @property
    def ema(self) -> bool:
        return self.history_spec is not None and self.history_spec[0] == "ema"

    def _history_cache(self):
        """A frozen history (``start``) scores a sample the same in every epoch: keep its losses when a
        later epoch will read them back (:mod:`winnow.trainer.online_history_cache`)."""
        if self.history_spec is None or self.history_spec[0] != "start" or not self.history_spec[2]:
            return None
        if self.total_steps <= self.steps_per_epoch:
            return None
        from winnow.trainer.online_history_cache import HistoryCache, supervised_counts

        return HistoryCache(supervised_counts(self.feed.train.weights))

    def _score(self, model, ids, mask, real, entropy: bool = False, attention: bool = False) -> dict:
        """:func:`score_rows` over length-bucketed groups of the mini-batch (as the training rows are laid
        out on CPU), so that one long sample does not pad all eight; results in the (B, W) frame."""
        scale, softcap = self.head
        lengths = real.sum(1).tolist()
        out: dict[str, torch.Tensor] = {}
        for group in plan(lengths, self.feed.tokens_per_batch, "padded"):
            g = torch.as_tensor(group, dtype=torch.long)
            width = max(lengths[k] for k in group)
            sub_real = real[g, :width] if attention else None
            part = score_rows(
                model,
                scale,
                softcap,
                ids[g.to(ids.device), :width],
                mask[g, :width],
                entropy,
                sub_real,
            )
            for key, value in part.items():
                full = out.setdefault(key, torch.full(mask.shape, math.nan, dtype=torch.float64))
                full[g, :width] = value
        return out

    def scored(
        self, idx: np.ndarray, seqs: list[np.ndarray], weights: list[np.ndarray], current: bool = True
    ) -> ol.Scored:
        """The mini-batch (training samples ``idx``) with the scores its policy needs; ``current=False``
        leaves the current model's to the training forward (``online_scoring=reuse``)."""
        lm = self.model
        ids, w, real = _padded(seqs, weights, self.feed.pad_id, self.feed.device)
        mask = w > 0
        s = ol.Scored(mask=mask, weight=w, nll=torch.full(mask.shape, math.nan, dtype=torch.float64))
        s.ids = ids.cpu() if self.op.always_keep_ids else None
        was_training = lm.training
        lm.eval()
        try:
            if current:
                cur = self._score(lm, ids, mask, real, "entropy" in self.need, "attention" in self.need)
                s.nll, s.entropy, s.attn = cur["nll"], cur.get("entropy"), cur.get("attn")
            if "reference" in self.need:
                s.nll_ref = self._reference_nll(ids, mask, real)
            if self.history is not None:
                s.nll_his = self._history_nll(idx, ids, mask, real)
        finally:
            lm.train(was_training)
        return s

    def _history_nll(self, idx: np.ndarray, ids: torch.Tensor, mask: torch.Tensor, real: torch.Tensor):
        if self.cache is None:
            return self._score(self.history, ids, mask, real)["nll"]
        out, missing = self.cache.read(idx, mask)
        if missing:
            rows = torch.as_tensor(missing, dtype=torch.long)
            width = int(real[rows].sum(1).max())
            sub_mask = mask[rows, :width]
            fresh = self._score(self.history, ids[rows.to(ids.device), :width], sub_mask, real[rows, :width])
            self.cache.write(idx[rows.numpy()], list(range(len(missing))), sub_mask, fresh["nll"])
            # epoch 1 reads the stored (float32-rounded) values too: the same number in every epoch
            got, _ = self.cache.read(idx[rows.numpy()], sub_mask)
            out[rows, :width] = got
        return out

    def _reference_nll(self, ids: torch.Tensor, mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        if self.reference == "base":  # LoRA: the same weights with the adapters switched off
            with self.model.disable_adapter():
                return self._score(self.model, ids, mask, real)["nll"]
        return self._score(self.reference, ids, mask, real)["nll"]

    # ---------------------------------------------------------------------------------- state
    def after_step(self, gather: bool) -> None:
        """After an optimizer step: the EMA history follows the weights; ``gather`` (before a checkpoint or
        at an epoch's end): every rank gets the cached history losses the others computed."""
        if self.ema:
            ol.ema_update(self.history, unwrap(self.model), self.history_spec[1])
        if gather and self.cache is not None:
            self.cache.exchange(self.feed.rank, self.feed.world, self.feed.device)

    def save(self, path: Path) -> None:
        if self.cache is not None:
            self.cache.save(path)
        if self.ema:
            from safetensors.torch import save_model  # handles tied embeddings (shared tensors)

            save_model(self.history, str(path / EMA_FILE))

    def load(self, path: Path) -> None:
        if self.cache is not None:
            self.cache.load(path)
        if self.ema:
            from safetensors.torch import load_model

            load_model(self.history, str(path / EMA_FILE), device=str(self.feed.device))
