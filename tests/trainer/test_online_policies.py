"""Online policies on hand-built mini-batches: expected weights worked out by hand from the papers' rules."""

from __future__ import annotations

import math

import pytest
import torch

from winnow.pipeline.errors import UserError
from winnow.pipeline.params import build_params
from winnow.trainer import online as ol

NAN = float("nan")


def _scored(nll, mask, **kw) -> ol.Scored:
    mask = torch.tensor(mask, dtype=torch.bool)
    nll = torch.where(mask, torch.tensor(nll, dtype=torch.float64), NAN)
    weight = kw.pop("weight", None)
    weight = mask.double() if weight is None else torch.tensor(weight, dtype=torch.float64)
    return ol.Scored(mask=mask, weight=weight, nll=nll, **kw)


def test_rho1_keeps_the_largest_excess_losses_across_the_batch():
    # 6 supervised tokens, k_ratio 0.5 -> the 3 largest cur - ref across both rows
    nll = [[0, 2.0, 1.0, 3.0], [0, 0.5, 4.0, 0.2]]
    ref = torch.tensor([[0, 1.0, 0.9, 0.5], [0, 0.4, 1.0, 0.3]], dtype=torch.float64)
    mask = [[0, 1, 1, 1], [0, 1, 1, 1]]
    # excess: row0 = 1.0, 0.1, 2.5; row1 = 0.1, 3.0, -0.1 -> keep row0 pos1, pos3, row1 pos2
    s = _scored(nll, mask, nll_ref=ref, weight=[[0, 0.5, 1, 2], [0, 1, 0.25, 0.5]])
    d = ol.Rho1Online(k_ratio=0.5).decide(s)
    assert d.weight.tolist() == [[0, 0.5, 0, 2], [0, 0, 0.25, 0]]
    assert d.keep.tolist() == [True, True]
    assert d.stats == {"kept_samples": 2, "kept_tokens": 3}


def test_sstoken_keeps_ceil_rho_per_row_by_rel_and_attention():
    # gamma=1: pure REL = his - cur, min-max per row; rho 0.5 of 3 tokens -> ceil(1.5) = 2 per row
    nll = [[0, 1.0, 1.0, 1.0], [0, 2.0, 2.0, 0]]
    his = torch.tensor([[0, 3.0, 1.5, 2.0], [0, 2.1, 2.5, 0]], dtype=torch.float64)
    mask = [[0, 1, 1, 1], [0, 1, 1, 0]]
    s = _scored(nll, mask, nll_his=his)
    d = ol.SSTokenOnline(gamma=1.0, rho=0.5).decide(s)
    # row0 REL = 2.0, 0.5, 1.0 -> keep pos1, pos3; row1 REL = 0.1, 0.5, ceil(2*0.5)=1 -> pos2
    assert d.weight.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]
    # gamma=0: attention alone decides
    attn = torch.tensor([[0, 0.1, 0.9, 0.5], [0, 0.7, 0.2, 0]], dtype=torch.float64)
    d0 = ol.SSTokenOnline(gamma=0.0, rho=0.5).decide(_scored(nll, mask, attn=attn))
    assert d0.weight.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]


def test_q_tuning_keeps_the_target_count_and_prunes_only_q2_tokens():
    g = torch.Generator().manual_seed(3)
    b, t = 8, 12
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, 4:] = True
    nll = torch.rand(b, t, generator=g, dtype=torch.float64) * 4 + 0.05
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 3 + 0.05
    s = ol.Scored(mask=mask, weight=mask.double(), nll=torch.where(mask, nll, NAN), entropy=ent)
    p = ol.QTuningOnline(r_sample=0.5, r_token=0.5)
    d = p.decide(s)
    assert int(d.keep.sum()) == 4  # round(r_sample * 8): Algorithm 1's per-batch target
    assert d.stats["kept_samples"] == 4
    assert sum(d.stats[f"q{q}"] for q in (1, 2, 3, 4)) <= b
    kept_tokens = d.weight.ne(0).sum(1)
    for row in range(b):
        if not d.keep[row]:
            assert kept_tokens[row] == 0
        else:  # Q2 rows keep ceil-or-floor half of their 8 tokens, every other kept row keeps all 8
            assert int(kept_tokens[row]) in (4, 8)
    assert d.stats["kept_tokens"] == int(kept_tokens.sum())


def test_masked_thought_masks_only_response_inputs_at_the_ramped_rate():
    p = ol.MaskedThoughtParams(p=0.4, warmup=0.66)
    assert ol.masked_thought_rate(p, 0, 100) == 0.0
    assert math.isclose(ol.masked_thought_rate(p, 33, 100), 0.4 * 33 / 67)
    assert ol.masked_thought_rate(p, 90, 100) == 0.4
    ids = torch.arange(1, 20001).view(10, 2000)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 500:] = True
    out = ol.masked_thought_inputs(ids, response, 0.3, -7, torch.Generator().manual_seed(0))
    masked = out.eq(-7)
    assert not masked[:, :500].any()
    assert torch.equal(out[~masked], ids[~masked])
    share = masked[:, 500:].double().mean().item()
    assert 0.28 < share < 0.32  # 15,000 Bernoulli(0.3) draws: 6 sigma is 0.022


def test_ema_update_matches_the_formula():
    cur, his = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = his.weight.detach().clone()
    ol.ema_update(his, cur, decay=0.9)
    assert torch.allclose(his.weight, 0.9 * before + 0.1 * cur.weight.detach(), atol=1e-7)


def test_namespaced_parameters_fill_each_policy_group():
    p = build_params(
        ol.OnlineParams,
        {
            "policy": "q_tuning",
            "q_tuning.r_sample": "0.125",
            "sstoken.history": "ema",
            "rho1.batch_size": "4",
        },
        "winnow train",
    )
    assert (p.q_tuning.r_sample, p.q_tuning.r_token, p.sstoken.history) == (0.125, 0.5, "ema")
    # each policy has its own mini-batch size (before: every policy read q_tuning.batch_size)
    assert (p.q_tuning.batch_size, p.rho1.batch_size, p.sstoken.batch_size) == (8, 4, 8)
    assert ol.needs(p) == {"nll", "entropy"}
    with pytest.raises(UserError, match="q_tuning.r_sample"):
        build_params(ol.OnlineParams, {"q_tuning.r_sample": "1.5"}, "winnow train")
    with pytest.raises(UserError, match="q_tuning.batch_size"):
        build_params(ol.OnlineParams, {"q_tuning.batch_size": "1"}, "winnow train")
    with pytest.raises(UserError, match="unknown"):
        build_params(ol.OnlineParams, {"q_tuning.nope": "1"}, "winnow train")
    with pytest.raises(UserError, match="unknown"):  # filled by the trainer, never by --set
        build_params(ol.OnlineParams, {"always_keep_ids": "5"}, "winnow train")
    with pytest.raises(UserError, match="online"):
        build_params(ol.OnlineParams, {"policy": "magic"}, "winnow train")
