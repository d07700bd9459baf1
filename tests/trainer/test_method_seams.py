"""The three seams of a training method (winnow.trainer.method), each with a toy plugged into the real loop.

References are direct float64 computations with full logits (no chunked head, no gather, no loop):
every sample alone through a float64 copy of the model. The loop runs in float32; tolerances 1e-5 on the
step's loss and on every gradient (max abs difference; gradients here are O(0.1-1), as in test_loss).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from winnow.trainer.distributed import Dist
from winnow.trainer.loss import LossTerm, TermInput, WeightedLMLoss, per_token_in_head
from winnow.trainer.method import TrainingMethod
from winnow.trainer.optim import lr_factor
from winnow.trainer.packing import plan, prepare

from trainer_fixtures import tiny_llama, weighted_samples


def _train_set(n: int = 7, seed: int = 2):
    ids, ws = weighted_samples(n, seed=seed)
    return prepare(ids, ws, [str(i) for i in range(len(ids))], max_seq_len=64)


def _loop(methods, model, **kw):
    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import TrainData
    from winnow.trainer.loop import Env, Loop

    train = _train_set()
    data = TrainData(train, prepare([], [], [], 64), "d", {}, 299)
    base = dict(tokens_per_batch=2048, max_seq_len=64, max_grad_norm=0.0, lr=1e-3, layout="padded", seed=1)
    base["grad_accum"] = len(plan(train.lengths, 2048, "padded"))  # step 0 trains on every sample
    p = TrainParams(**(base | kw))
    loop = Loop(p, data, model, Env(torch.device("cpu"), Dist(), None), methods=methods)
    assert len(loop.plan) == p.grad_accum > 1
    return loop


def _step_grads(loop, step: int = 0):
    """Run one optimizer step; the normalised gradients it applied, by parameter name, and its record."""
    seen = {}
    original = loop.opt.step

    def step_fn(*a, **k):
        for name, q in loop.loss_mod.model.named_parameters():
            seen[name] = None if q.grad is None else q.grad.detach().clone()
        return original(*a, **k)

    loop.opt.step = step_fn
    rec = loop.train_step(step)
    loop.opt.step = original
    return seen, rec


def _reference(model, train, term=None, scale_mlp=None, replaces_ce=False):
    """``(Σ w·(CE + term)) / Σ w`` with float64 full logits, sample by sample; its gradients."""
    m = copy.deepcopy(model).double()
    if scale_mlp is not None:  # the toy forward change, by a forward hook on the model itself
        k, factor = scale_mlp
        m.model.layers[k].mlp.register_forward_pre_hook(lambda mod, args: (args[0] * factor,))
    total, wsum = 0.0, 0.0
    for x, w in zip(train.ids, train.weights, strict=True):
        x = torch.as_tensor(x)
        logits = m(input_ids=x[None], use_cache=False).logits[0][:-1]
        lse = torch.logsumexp(logits, -1)
        ce = lse - logits.gather(-1, x[1:, None]).squeeze(-1)
        per = (0.0 if replaces_ce else ce) + (0.0 if term is None else term * lse**2)
        wt = torch.as_tensor(w[1:], dtype=torch.float64)
        total = total + (wt * per).sum()
        wsum += float(wt.sum())
    loss = total / wsum
    loss.backward()
    return float(loss.detach()), {n: q.grad for n, q in m.named_parameters()}


def _close(grads, ref):
    for name, g in ref.items():
        diff = float((grads[name].double() - g).abs().max())
        assert diff < 1e-5, (name, diff)
        assert float(g.abs().max()) > 1e-4, name  # not vacuous


# ---- a loss term ---------------------------------------------------------------------------------------
class ZSquared(LossTerm):
    """Toy per-token term computed in the chunked head: ``alpha · logsumexp(logits)²`` (a z-loss)."""

    def __init__(self, alpha: float, replaces_ce: bool = False):
        super().__init__()
        self.alpha, self.replaces_ce = alpha, replaces_ce

    def forward(self, x: TermInput) -> torch.Tensor:
        return self.alpha * per_token_in_head(x, lambda lg, t: torch.logsumexp(lg, -1) ** 2, chunk=7)


class WithTerms(TrainingMethod):
    def __init__(self, *terms):
        self.terms = list(terms)

    def loss_terms(self):
        return self.terms


@pytest.mark.parametrize("replaces_ce", [False, True])
def test_toy_loss_term(replaces_ce):
    model = tiny_llama(seed=4)
    ref_loss, ref_grads = _reference(model, _train_set(), 0.01, replaces_ce=replaces_ce)
    loop = _loop([WithTerms(ZSquared(0.01, replaces_ce))], model)
    grads, rec = _step_grads(loop)
    assert abs(rec["loss"] - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (rec["loss"], ref_loss)
    _close(grads, ref_grads)
    # evaluation (and a loss module without terms) is the plain weighted cross-entropy, bit for bit
    plain = WeightedLMLoss(model)
    b = loop.micro_batches(0)[0]
    t = torch.as_tensor
    args = (t(b.input_ids), t(b.gather), t(b.targets), t(b.weights))
    loop.loss_mod.eval()
    with torch.no_grad():
        assert torch.equal(loop.loss_mod(*args), plain(*args))


# ---- a choice of trainable parameters ------------------------------------------------------------------
class NormsThenHead(TrainingMethod):
    """Toy choice: only the RMSNorm weights train; from step ``switch`` on, only the LM head."""

    def __init__(self, switch: int):
        self.switch = switch

    def trainable(self, model, ctx):
        for name, q in model.named_parameters():
            q.requires_grad_("norm" in name)
        return model

    def reselect(self, step, model):
        if step != self.switch:
            return False
        for name, q in model.named_parameters():
            q.requires_grad_(name.startswith("lm_head"))
        return True


def test_toy_trainable_choice():
    from winnow.trainer.method import MethodContext, apply_trainable

    method = NormsThenHead(switch=2)
    model = apply_trainable([method], tiny_llama(seed=5), MethodContext(device=torch.device("cpu")))
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    loop = _loop([method], model, warmup_steps=3, epochs=6)
    for step in range(2):
        loop.train_step(step)
    now = {n: q.detach().clone() for n, q in model.named_parameters()}
    for n in now:  # frozen tensors bitwise unchanged, chosen ones moved
        assert torch.equal(now[n], start[n]) != ("norm" in n), n
    assert {id(q) for q in loop.opt.state} == {id(q) for n, q in model.named_parameters() if "norm" in n}
    rec = loop.train_step(2)  # re-selection: a new optimizer over the head alone, the schedule goes on
    assert {id(q) for q in loop.opt.state} == {id(model.lm_head.weight)}
    assert rec["lr"] == pytest.approx(1e-3 * lr_factor(2, 3, loop.total_steps, 0.1), rel=1e-12)
    after = {n: q.detach().clone() for n, q in model.named_parameters()}
    for n in after:
        assert torch.equal(after[n], now[n]) != n.startswith("lm_head"), n


# ---- a change to the model's forward -------------------------------------------------------------------
class ScaleMLP(TrainingMethod):
    """Toy forward change: the MLP of decoder layer ``k`` sees ``factor`` times its input, in training
    micro-batches only. Patched inside the layer, as LeMo's sparse MLP would be: the part that activation
    checkpointing runs again in the backward (the MLP's saved activations depend on the change)."""

    def __init__(self, k: int, factor: float):
        self.k, self.factor, self.calls = k, factor, 0

    @contextlib.contextmanager
    def forward_change(self, batch, model):
        mlp = model.model.layers[self.k].mlp
        original = type(mlp).forward
        mlp.forward = lambda x: original(mlp, x * self.factor)
        self.calls += 1
        try:
            yield
        finally:
            del mlp.forward  # back to the class's forward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_toy_forward_change(checkpointing):
    """With activation checkpointing the layer's forward runs again inside the backward: the change must
    still be in place there (a context around the forward alone gives wrong gradients)."""
    model = tiny_llama(seed=6)
    ref_loss, ref_grads = _reference(model, _train_set(), scale_mlp=(1, 0.5))
    dense_loss, _ = _reference(model, _train_set())
    method = ScaleMLP(1, 0.5)
    loop = _loop([method], model, activation_checkpointing=checkpointing)
    grads, rec = _step_grads(loop)
    assert method.calls == loop.p.grad_accum  # once per training micro-batch
    assert abs(rec["loss"] - ref_loss) < 1e-5, (rec["loss"], ref_loss)
    assert abs(ref_loss - dense_loss) > 1e-3  # the change does change the loss
    _close(grads, ref_grads)
    assert "forward" not in vars(model.model.layers[1].mlp)  # the dense forward is back
