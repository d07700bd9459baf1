"""The real training loop on a tiny train set with one optimizer step over every sample, for the tests of
training methods (tests/trainer/test_method_*.py): build it, run a step and keep the gradients it
applied, compare them with a float64 reference."""

from __future__ import annotations

import torch

from winnow.trainer.distributed import Dist
from winnow.trainer.packing import plan, prepare

from trainer_fixtures import weighted_samples


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


def _close(grads, ref):
    for name, g in ref.items():
        diff = float((grads[name].double() - g).abs().max())
        assert diff < 1e-5, (name, diff)
        assert float(g.abs().max()) > 1e-4, name  # not vacuous
