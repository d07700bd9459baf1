"""CAFT (winnow.trainer.caft): the loss and every gradient in the real loop against a direct float64
computation with full logits (tiny random Llama, K = 2), the schedule and per-head weights of §1, the
heads' targets never crossing a packed document, and the phases."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from method_loop import _close, _loop, _step_grads, _train_set

from winnow.core.layout import layout_batch
from winnow.trainer.caft import CaftParams, head_positions, schedule
from winnow.trainer.method import MethodContext, apply_trainable
from winnow.trainer.packing import prepare

from trainer_fixtures import tiny_llama, weighted_samples


def test_schedule_and_head_weights():
    assert schedule("rsine", 50, 100) == pytest.approx(0.70711, abs=1e-5)  # §1's value
    assert schedule("rsine", 0, 100) == 1.0 and schedule("rsine", 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert schedule("sine", 100, 100) == 1.0 and schedule("linear", 25, 100) == 0.25
    assert schedule("constant", 3, 10) == 1.0 and schedule("rsine", 3, 0) == 1.0
    p = CaftParams(heads=4)
    assert [p.beta * p.gamma**k for k in range(1, 5)] == pytest.approx([0.008, 0.0064, 0.00512, 0.004096])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_head_targets_stay_in_their_document(k):
    ids, ws = weighted_samples(8, seed=11)
    tr = prepare(ids, ws, [str(i) for i in range(8)], 64)
    b = layout_batch(tr.ids, tr.weights, "packed")
    t = torch.as_tensor
    x = SimpleNamespace(
        input_ids=t(b.input_ids), position_ids=t(b.position_ids), gather=t(b.gather), weights=t(b.weights)
    )
    p, tgt, w = head_positions(x, k)
    # brute force: every weighted target of every sample whose position minus 1+k is still in the sample
    want = []
    for s, (seq, wt) in enumerate(zip(tr.ids, tr.weights, strict=True)):
        for j in range(1 + k, len(seq)):
            if wt[j] != 0:
                want.append((int(b.cu_seqlens[s]) + j - 1 - k, int(seq[j]), float(wt[j])))
    got = sorted(zip(p.tolist(), tgt.tolist(), w.tolist(), strict=True))
    assert got == sorted(want) and len(want) > 10


def _reference(model, heads, train, beta, gamma):
    """``(Σ w·CE_0 + Σ_k β γ^k Σ w·CE_k) / Σ w`` in float64, sample by sample with full logits."""
    m, hs = copy.deepcopy(model).double(), copy.deepcopy(heads).double()
    total, wsum = 0.0, 0.0
    for x, w in zip(train.ids, train.weights, strict=True):
        x, w = torch.as_tensor(x), torch.as_tensor(w, dtype=torch.float64)
        h = m.model(input_ids=x[None], use_cache=False).last_hidden_state
        pos = torch.arange(len(x))[None]
        rope = m.model.rotary_emb(h, position_ids=pos)
        for k in range(len(hs) + 1):
            out = h if k == 0 else hs[k - 1](h, position_embeddings=rope, position_ids=pos)
            logits = m.lm_head(out[0])
            logp = torch.log_softmax(logits, -1)
            coef = 1.0 if k == 0 else beta * gamma**k
            for j in range(1 + k, len(x)):  # target j, predicted at position j - 1 - k
                total = total - coef * w[j] * logp[j - 1 - k, x[j]]
        wsum += float(w[1:].sum())
    loss = total / wsum
    loss.backward()
    return (
        float(loss.detach()),
        {n: q.grad for n, q in m.named_parameters()},
        {n: q.grad for n, q in hs.named_parameters()},
    )


def test_loss_and_gradients_against_float64():
    method = CaftParams(heads=2, beta=0.5, gamma=0.8, train_heads=True)
    model = apply_trainable([method], tiny_llama(seed=12), MethodContext(device=torch.device("cpu")))
    heads = method.term.heads
    ref_loss, ref_grads, ref_head_grads = _reference(model, heads, _train_set(), 0.5, 0.8)
    plain_loss, _, _ = _reference(model, torch.nn.ModuleList(), _train_set(), 0.5, 0.8)
    loop = _loop([method], model)
    head_grads = {}
    original = loop.opt.step

    def step_fn(*a, **k):  # the heads' gradients too (_step_grads reads the model's)
        head_grads.update({n: q.grad.detach().clone() for n, q in heads.named_parameters()})
        return original(*a, **k)

    loop.opt.step = step_fn
    grads, rec = _step_grads(loop)
    assert abs(rec["loss"] - ref_loss) < 1e-5 and abs(ref_loss - plain_loss) > 1e-2, (rec["loss"], ref_loss)
    _close(grads, ref_grads)  # the trunk's gradient carries the heads' losses
    _close(head_grads, ref_head_grads)


def test_phases_freeze_what_the_authors_freeze():
    heads_phase = CaftParams(heads=2, phase="heads")
    model = apply_trainable([heads_phase], tiny_llama(seed=13), MethodContext(device=torch.device("cpu")))
    assert not any(q.requires_grad for q in model.parameters())
    assert all(q.requires_grad for q in heads_phase.term.heads.parameters()) and heads_phase.term.replaces_ce
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    loop = _loop([heads_phase], model)
    loop.train_step(0)
    assert all(torch.equal(q, start[n]) for n, q in model.named_parameters())
    assert {id(q) for q in loop.opt.state} == {id(q) for q in heads_phase.term.heads.parameters()}
    fine = CaftParams(heads=2)
    model = apply_trainable([fine], tiny_llama(seed=13), MethodContext(device=torch.device("cpu")))
    assert all(q.requires_grad for q in model.parameters()) and not any(
        q.requires_grad for q in fine.term.heads.parameters()
    )
    assert fine.term.coefficient(2) == pytest.approx(0.01 * 0.8**2)  # step 0 of rsine: s = 1
