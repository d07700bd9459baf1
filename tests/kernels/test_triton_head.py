"""No-grad Triton head kernels (interpreted on CPU): per-token log-prob and entropy, and the cDPO
contrast score, against float64 full logits (tests/support/head_reference.py) and against the chunked reference
(:mod:`winnow.kernels.chunked_head`). Same tolerances as the reference promises: rtol = atol = 1e-5
on log-probs and entropies (fp32 logits of size up to ~15), atol 1e-7 on p_CE."""

from __future__ import annotations

import pytest
import torch

from winnow.kernels import chunked_head, switch
from winnow.kernels.chunked_head import LMHead

from head_reference import logits64 as _logits64
from head_reference import random_head as _head


def _tk():
    from winnow.kernels import triton_linear_cross_entropy as tk

    return tk


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # natively on a GPU, interpreted elsewhere


def _on(dev, head):
    f = lambda x: None if x is None else x.to(dev)  # noqa: E731
    return LMHead(f(head.weight), f(head.bias), head.scale, head.softcap)


def _lpe(head, h, t, **kw):
    lp, ent = _tk().logprob_entropy_triton(_on(DEV, head), h.to(DEV), t.to(DEV), **kw)
    return lp.cpu(), (None if ent is None else ent.cpu())


def _contrast(hp, xp, hn, xn, t, beta):
    out = _tk().contrast_scores_triton(
        _on(DEV, hp), xp.to(DEV), _on(DEV, hn), xn.to(DEV), t.to(DEV), beta=beta
    )
    return tuple(x.cpu() for x in out)


def _pick(x, t):
    return x.gather(-1, t[:, None]).squeeze(-1)


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=atol)


POSTS = [(1.0, None, False), (0.25, None, True), (1.5, 5.0, True)]  # (scale, softcap, bias)


@pytest.mark.parametrize("n,v,d", [(123, 1007, 96), (5, 130, 20)])
@pytest.mark.parametrize("scale,softcap,bias", POSTS)
def test_logprob_entropy_match_float64_and_reference(n, v, d, scale, softcap, bias):
    head = _head(v, d, seed=n + v, scale=scale, softcap=softcap, bias=bias)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(n, d, generator=g) * 2
    t = torch.randint(0, v, (n,), generator=g)
    lp, ent = _lpe(head, h, t)
    logp = _logits64(head, h).log_softmax(-1)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (n,)
    assert _pick(logp, t).max() - _pick(logp, t).min() > 1.0  # far from uniform: the check can fail
    _close(lp, _pick(logp, t))
    _close(ent, -(logp.exp() * logp).sum(-1))
    ref_lp, ref_ent = chunked_head.logprob_entropy(head, h, t, chunk=16)
    _close(lp, ref_lp)
    _close(ent, ref_ent)
    lp_only, none = _lpe(head, h, t, entropy=False)
    assert none is None
    _close(lp_only, lp, atol=0)


def test_entropy_stays_finite_when_softmax_underflows():
    head = _head(500, 16, seed=3, spread=400.0)  # logit gaps of thousands: most probabilities are 0
    h = torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    t = torch.randint(0, 500, (20,))
    lp, ent = _lpe(head, h, t)
    z = head.logits(h).double()  # the same fp32 logits: at |z| ~ 1e3 fp32 rounding alone is ~1e-4
    logp = z.log_softmax(-1)
    ref_ent = -torch.where(logp.exp() > 0, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all()
    _close(ent, ref_ent)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_contrast_matches_float64_and_reference(beta):
    v, n = 1007, 45
    hp = _head(v, 96, seed=1, bias=True)
    hn = _head(v, 40, seed=2, softcap=4.0, scale=0.7)  # another hidden size: heads may differ in d
    g = torch.Generator().manual_seed(5)
    xp, xn = torch.randn(n, 96, generator=g), torch.randn(n, 40, generator=g)
    zp, zn = _logits64(hp, xp), _logits64(hn, xn)
    t = torch.randint(0, v, (n,), generator=g)
    t[::2] = zp.argmax(-1)[::2]  # likely tokens too, so p_CE spans a wide range
    p_ce, lpp, lpn = _contrast(hp, xp, hn, xn, t, beta)
    ref = _pick(((1 + beta) * zp - beta * zn).softmax(-1), t)
    assert ref.max() > 0.1 and ref.min() < 1e-3
    _close(p_ce, ref, atol=1e-7)
    _close(lpp, _pick(zp.log_softmax(-1), t))
    _close(lpn, _pick(zn.log_softmax(-1), t))
    for a, b in zip(
        (p_ce, lpp, lpn), chunked_head.contrast_scores(hp, xp, hn, xn, t, beta=beta), strict=True
    ):
        _close(a, b, atol=1e-7 if a is p_ce else 1e-5)


def test_split_vocabulary_states_merge(monkeypatch):
    """The GPU path splits the vocabulary over programs; force 3 splits under the interpreter."""
    tk = _tk()
    monkeypatch.setattr(tk, "_splits", lambda rows, vocab, blk, device: 3)
    head = _head(1007, 24, seed=8, bias=True, softcap=6.0)
    h = torch.randn(30, 24, generator=torch.Generator().manual_seed(9)) * 2
    t = torch.randint(0, 1007, (30,))
    lp, ent = _lpe(head, h, t)
    logp = _logits64(head, h).log_softmax(-1)
    _close(lp, _pick(logp, t))
    _close(ent, -(logp.exp() * logp).sum(-1))


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_switch_routes_head_functions(monkeypatch, mode):
    tk = _tk()
    monkeypatch.setenv("WINNOW_KERNELS", mode)
    calls = []
    for mod, name in [
        (tk, "logprob_entropy_triton"),
        (tk, "contrast_scores_triton"),
        (chunked_head, "logprob_entropy"),
        (chunked_head, "contrast_scores"),
    ]:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    head = _on(DEV, _head(64, 16, seed=1))
    h, t = torch.randn(10, 16, device=DEV), torch.randint(0, 64, (10,), device=DEV)
    switch.logprob_entropy(head, h, t)
    switch.contrast_scores(head, h, head, h, t, beta=0.5)
    if mode == "triton":
        assert calls == ["logprob_entropy_triton", "contrast_scores_triton"]
    else:
        assert calls == ["logprob_entropy", "contrast_scores"]


@pytest.mark.gpu
@pytest.mark.parametrize("v", [32768, 131072])
def test_head_kernels_large_vocab_on_gpu(v):
    g = _head(v, 256, seed=v, bias=True, softcap=30.0)
    head = LMHead(g.weight.cuda(), g.bias.cuda(), g.scale, g.softcap)
    h = torch.randn(777, 256, device="cuda") * 2
    t = torch.randint(0, v, (777,), device="cuda")
    logp = _logits64(head, h).log_softmax(-1)  # float64 on the GPU
    lp, ent = _tk().logprob_entropy_triton(head, h, t)
    _close(lp, _pick(logp, t))
    _close(ent, -(logp.exp() * logp).sum(-1))
