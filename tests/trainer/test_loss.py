"""The packed/padded, trimmed, gathered loss equals a plain full-logit per-sample weighted loss.

Reference: every sample alone through ``model(...)`` in float64 with full logits and log_softmax, loss
Σ_s Σ_i w_i·(-log p(x_i | x_<i)) / Σ w. The trainer's path runs in float32; tolerance 1e-5 on the loss
and on every parameter gradient (max abs difference; gradients here are O(0.1-1)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from winnow.trainer.loss import WeightedLMLoss
from winnow.trainer.packing import layout_batch, plan, prepare

from trainer_fixtures import tiny_llama, weighted_samples


def _reference(model, ids, ws):
    model = model.double()
    total, wsum = 0.0, 0.0
    for x, w in zip(ids, ws, strict=True):
        logits = model(input_ids=torch.as_tensor(x)[None], use_cache=False).logits[0]
        lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.as_tensor(x)[1:, None]).squeeze(-1)
        wt = torch.as_tensor(w[1:], dtype=torch.float64)
        total = total + (wt * -lp).sum()
        wsum += float(wt.sum())
    loss = total / wsum
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _trainer(model, ids, ws, layout, tokens_per_batch):
    prep = prepare(ids, ws, [str(i) for i in range(len(ids))], max_seq_len=tokens_per_batch)
    wrapped = WeightedLMLoss(model)
    batches = [
        layout_batch([prep.ids[i] for i in mb], [prep.weights[i] for i in mb], layout)
        for mb in plan(prep.lengths, tokens_per_batch, layout)
    ]
    wsum = sum(b.weight_sum for b in batches)
    total = 0.0
    for b in batches:
        t = lambda a: torch.as_tensor(a)  # noqa: E731
        pos = t(b.position_ids) if layout == "packed" else None
        part = wrapped(t(b.input_ids), t(b.gather), t(b.targets), t(b.weights), pos)
        part.backward()
        total += float(part.detach())
    grads = {n: p.grad / wsum for n, p in model.named_parameters()}
    return total / wsum, grads, batches


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("tied", [False, True])
def test_gathered_loss_matches_full_logits(layout, tied):
    torch.manual_seed(0)
    ids, ws = weighted_samples(24, seed=1 + tied)
    ours, g_ours, batches = _trainer(tiny_llama(tied=tied), ids, ws, layout, tokens_per_batch=96)
    ref, g_ref = _reference(tiny_llama(tied=tied), ids, ws)
    assert len(batches) > 3 and max(b.n_samples for b in batches) > 1  # several samples share a batch
    assert abs(ours - ref) < 1e-5, (ours, ref)
    for name, g in g_ref.items():
        diff = float((g_ours[name].double() - g).abs().max())
        assert diff < 1e-5, (name, diff)
        assert float(g.abs().max()) > 1e-3  # the gradient is not vacuous


def test_packed_row_without_cache_does_not_leak_between_samples():
    """A packed row's hidden states equal each sample's alone (position ids restart, no cache)."""
    model = tiny_llama()
    ids, ws = weighted_samples(5, seed=3, lo=8)
    b = layout_batch(ids, [np.ones_like(w) for w in ws], "packed")
    wrapped = WeightedLMLoss(model)
    with torch.no_grad():
        h = wrapped.hidden(torch.as_tensor(b.input_ids), torch.as_tensor(b.position_ids))[0]
        for k, x in enumerate(ids):
            alone = wrapped.hidden(torch.as_tensor(x)[None], None)[0]
            a, e = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1])
            assert float((h[a:e] - alone).abs().max()) < 1e-5
