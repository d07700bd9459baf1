"""GreenTrainer (winnow.trainer.greentrainer): the DP against brute force, the authors' DP and its
reference vector, the analytic FLOPs, and the importance update leaving no trace in the run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from winnow.trainer.greentrainer import GreenTrainerParams, budget, select_dp, tensor_flops

from trainer_fixtures import tiny_llama


def _brute(t_dy, t_dw, imp, limit, selectable):
    """Every subset of the selectable tensors: the best value (the empty selection is worth 0)."""
    best = 0.0
    for m in itertools.product([0, 1], repeat=len(imp)):
        idx = [k for k in range(len(imp)) if m[k]]
        if any(k >= selectable for k in idx):
            continue
        cost = sum(t_dw[k] for k in idx) + (sum(t_dy[: max(idx) + 1]) if idx else 0)
        if cost <= limit:
            best = max(best, sum(imp[k] for k in idx))
    return best


def _cost(t_dy, t_dw, mask):
    idx = np.flatnonzero(mask)
    return int(np.sum(np.asarray(t_dw)[idx])) + (int(np.sum(t_dy[: idx.max() + 1])) if idx.size else 0)


def test_dp_matches_brute_force_including_the_input_most_tensor():
    rng = np.random.default_rng(0)
    with_last = 0
    for _ in range(300):
        n = int(rng.integers(1, 8))
        t_dy, t_dw = rng.integers(0, 6, n), rng.integers(0, 8, n)
        imp = np.round(rng.uniform(-0.3, 1.0, n), 3)
        limit = int(rng.integers(0, int(t_dy.sum() + t_dw.sum()) + 2))
        value, mask = select_dp(t_dy, t_dw, imp, limit)
        want = _brute(t_dy, t_dw, imp, limit, n)
        assert value == pytest.approx(want, abs=1e-12), (t_dy, t_dw, imp, limit)
        assert _cost(t_dy, t_dw, mask) <= limit and float(imp[mask].sum()) == pytest.approx(value, abs=1e-12)
        with_last += bool(mask[-1]) and n > 1
        # the authors' DP: the same problem without the tensors from N_limit on
        cum = np.cumsum(t_dy)
        over = np.flatnonzero(cum > limit)
        n_limit = int(over[0]) if over.size else n - 1
        cvalue, cmask = select_dp(t_dy, t_dw, imp, limit, code_dp=True)
        assert cvalue == pytest.approx(_brute(t_dy, t_dw, imp, limit, n_limit), abs=1e-12)
        assert not cmask[n_limit:].any()
    assert with_last > 20  # the input-most tensor is selected in many cases


@pytest.mark.parametrize(
    "rho,value,mask,right",  # ALGORITHMS_TRAINING.md §6: the authors' simple_test, run through their DP
    [(0.3, 3, [0, 1, 0, 0, 0], 3), (0.6, 13, [0, 1, 1, 0, 0], 13), (1.0, 19, [1, 1, 1, 1, 0], 22)],
)
def test_authors_reference_vector(rho, value, mask, right):
    t_dy, t_dw, imp = np.array([0, 2, 1, 4, 0]), np.array([5, 1, 7, 3, 1]), np.array([1.0, 3, 10, 5, 3])
    limit = int(np.floor(rho * (t_dy.sum() + t_dw.sum())))
    got, m = select_dp(t_dy, t_dw, imp, limit, code_dp=True)
    assert got == value and m.astype(int).tolist() == mask
    assert (
        select_dp(t_dy, t_dw, imp, limit)[0] == right
    )  # at rho = 1 everything fits: 22, input-most included


def test_flops_are_analytic():
    model = tiny_llama(seed=1)  # hidden 32, intermediate 64, vocab 300, heads 4 of 8 dims, untied
    named = list(model.named_parameters())
    dw, dy = tensor_flops(model, named, tokens=100.0, len_sq=900.0)
    at = {n: i for i, (n, _) in enumerate(named)}
    q = at["model.layers.0.self_attn.q_proj.weight"]
    assert dw[q] == dy[q] == 100 * 32 * 32
    v = at["model.layers.1.self_attn.v_proj.weight"]
    assert dw[v] == 100 * 32 * 16 and dy[v] == 100 * 32 * 16 + 4 * 900 * 32
    e = at["model.embed_tokens.weight"]
    assert dy[e] == 0 and dw[e] == 100 * 300 * 32 + 300 * 32
    n = at["model.layers.0.input_layernorm.weight"]
    assert dw[n] == dy[n] == 100 * 32
    head = at["lm_head.weight"]
    assert dw[head] == dy[head] == 100 * 300 * 32  # untied: the head is a tensor of its own
    tied = tiny_llama(seed=1, tied=True)
    tnamed = list(tied.named_parameters())
    tdw, tdy = tensor_flops(tied, tnamed, tokens=100.0, len_sq=900.0)
    assert tnamed[-1][0] == "model.norm.weight" and tdy[-1] == 100 * 32 + 100 * 300 * 32  # the tied head's
    udw, udy, limit, rho_bp = budget(dw, dy, 0.5)
    t_bp, t_fp = dw.sum() + dy.sum(), dy.sum()
    assert rho_bp == pytest.approx(0.5 * (1 + t_fp / t_bp) - t_fp / t_bp)
    assert limit == int(np.floor(rho_bp * (udw.sum() + udy.sum()))) and udw.sum() + udy.sum() <= 1000


def test_selection_leaves_no_trace_and_trains_only_the_selection():
    """A GreenTrainer run's steps equal a plain run with the same selection fixed from the start (weights,
    optimizer, schedule and batches bitwise): the importance update was undone exactly."""
    from method_loop import _loop

    from winnow.trainer.method import MethodContext, TrainingMethod, apply_trainable

    method = GreenTrainerParams(rho=0.8, interval=2)
    model = apply_trainable([method], tiny_llama(seed=9), MethodContext(device=torch.device("cpu")))
    loop = _loop([method], model, epochs=2)
    rng = torch.get_rng_state()
    recs = [loop.train_step(s) for s in range(2)]
    assert torch.equal(rng, torch.get_rng_state())
    trained = set(method.selected)
    assert 0 < len(trained) < len(list(model.parameters()))
    assert recs[0]["greentrainer_trained"] == method.selected and "greentrainer_trained" not in recs[1]
    assert 0 < recs[0]["greentrainer_bp_ratio"] <= 1.0

    class Fixed(TrainingMethod):  # the same selection, fixed before step 0
        def trainable(self, model, ctx):
            for name, q in model.named_parameters():
                q.requires_grad_(name in trained)
            return model

    plain_model = apply_trainable([Fixed()], tiny_llama(seed=9), MethodContext(device=torch.device("cpu")))
    plain = _loop([], plain_model, epochs=2)
    plain_recs = [plain.train_step(s) for s in range(2)]
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r["loss"] for r in recs] == [r["loss"] for r in plain_recs]


def test_parameters_refusals_and_steps_listing():
    from winnow.core.errors import UserError
    from winnow.core.params import build_params
    from winnow.trainer.config import TrainParams

    from cli_runner import run_cli

    p = build_params(TrainParams, {"greentrainer.rho": "0.5", "loss": "otr", "otr.k": "8"}, "--set")
    assert [type(m).__name__ for m in p.methods()] == ["GreenTrainerParams", "OtrMethod"]
    assert p.identity()["greentrainer"]["rho"] == 0.5 and p.identity()["otr"]["k"] == 8
    refused = (
        ({"greentrainer.rho": "0.5", "online": "rho1", "lora_r": "4"}, "greentrainer.rho with lora.r"),
        ({"greentrainer.rho": "0.5", "online": "q_tuning"}, "online=q_tuning is not supported"),
        ({"greentrainer.rho": "1.5"}, r"must be in \[0, 1\]"),
        ({"loss": "dft", "online": "sstoken"}, "online.scoring=reuse"),
        ({"otr.beta": "1"}, "must be < 1"),
    )
    for values, match in refused:
        with pytest.raises((ValueError, UserError), match=match):
            build_params(TrainParams, values, "--set")
    code, out, _ = run_cli("steps")
    assert code == 0
    keys = ["loss = 'ce'", "otr.k = 256", "otr.tau = 1.0", "otr.beta = -0.1", "otr.exact = False"]
    keys += ["hft.enabled = False", "hft.seed = -1", "greentrainer.rho = 0.0", "greentrainer.interval = 2"]
    listed = [line.split("  # ")[0].rstrip() for line in out.splitlines()]  # minus each description
    for line in [*keys, "greentrainer.code_dp = False"]:
        assert "    " + line in listed, line
    assert "hft -> hft.enabled" in out
