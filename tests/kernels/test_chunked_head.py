"""Chunked LM head: log-prob, entropy and cDPO contrast against float64 full-logit references."""

import numpy as np
import pytest
import torch

from winnow.core.model_io import check_head
from winnow.core.store import UserError
from winnow.kernels.chunked_head import LMHead, auto_chunk, contrast_scores, logprob_entropy

from head_reference import logits64, random_head
from model_pass_fixtures import make_config

# (N, V, d, chunk): awkward sizes, chunk 1, chunk larger than N, auto
SHAPES = [(37, 1000, 16, 8), (5, 123, 123, 1), (64, 4099, 32, 0), (3, 50, 8, 100), (129, 3000, 24, 64)]


@pytest.mark.parametrize("N,V,d,chunk", SHAPES)
@pytest.mark.parametrize("post", [(1.0, None, False), (0.25, None, True), (1.0, 5.0, False)])
def test_logprob_entropy_match_float64(N, V, d, chunk, post):
    scale, softcap, bias = post
    head = random_head(V, d, seed=N + V, scale=scale, softcap=softcap, bias=bias)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, d, generator=g) * 2
    t = torch.randint(0, V, (N,), generator=g)
    lp, ent = logprob_entropy(head, h, t, chunk=chunk)
    logp = logits64(head, h).log_softmax(-1)
    ref_lp = logp.gather(-1, t[:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert ref_lp.max() - ref_lp.min() > 1.0  # far from uniform: the check can fail
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    lp_only, none = logprob_entropy(head, h, t, chunk=chunk, entropy=False)
    assert none is None
    torch.testing.assert_close(lp_only, lp, rtol=0, atol=0)


def test_entropy_has_no_nan_when_softmax_underflows():
    head = random_head(
        500, 16, seed=3, spread=400.0
    )  # logit gaps of thousands: most probabilities are exactly 0
    g = torch.Generator().manual_seed(4)
    h = torch.randn(20, 16, generator=g)
    t = torch.randint(0, 500, (20,), generator=g)
    lp, ent = logprob_entropy(head, h, t, chunk=7)
    # the same fp32 logits (same chunks) in float64: at |z| ~ 1e3 fp32 rounding alone is ~1e-4
    z = torch.cat([head.logits(h[a : a + 7]) for a in range(0, 20, 7)]).double()
    assert (torch.softmax(z.float(), -1) == 0).float().mean() > 0.5  # the underflow case is exercised
    logp = z.log_softmax(-1)
    ref_ent = -(torch.where(logp.exp() > 0, logp.exp() * logp, torch.zeros_like(logp))).sum(-1)
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all()
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_head_memory_is_bounded_by_chunk(monkeypatch):
    head = random_head(300, 8, seed=0)
    sizes = []
    orig = LMHead.logits

    def spy(self, hidden, dtype=None):
        sizes.append(hidden.shape[0])
        return orig(self, hidden, dtype)

    monkeypatch.setattr(LMHead, "logits", spy)
    logprob_entropy(head, torch.randn(100, 8), torch.randint(0, 300, (100,)), chunk=16)
    assert max(sizes) == 16 and sum(sizes) == 100  # never more than one chunk of logits at a time
    assert auto_chunk(32000) * 32000 <= 8 * 1024 * 1024 and auto_chunk(32000) >= 8
    assert auto_chunk(32000, 5) == 5


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_contrast_scores_match_full_logits(beta):
    V, d, N = 700, 12, 45
    hp, hn = random_head(V, d, seed=1), random_head(V, d, seed=2, softcap=4.0)
    g = torch.Generator().manual_seed(5)
    xp, xn = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    zp, zn = logits64(hp, xp), logits64(hn, xn)
    t = torch.randint(0, V, (N,), generator=g)
    t[::2] = zp.argmax(-1)[::2]  # likely tokens too, so p_CE spans a wide range
    p_ce, lpp, lpn = contrast_scores(hp, xp, hn, xn, t, beta=beta, chunk=8)
    ref = ((1 + beta) * zp - beta * zn).softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    assert ref.max() > 0.1 and ref.min() < 1e-3
    torch.testing.assert_close(p_ce.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        lpp.double(), zp.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        lpn.double(), zn.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1), rtol=1e-5, atol=1e-5
    )


def _llama(**over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config("llama", **over)).eval()


def test_check_head_finds_the_post_processing_that_reproduces_forward():
    m = _llama()
    m.config.final_logit_softcapping = 3.0  # named in the config but Llama's forward does not apply it
    head = LMHead(m.lm_head.weight)
    with torch.inference_mode():
        got = check_head(m, m.model, head, device="cpu", dtype=torch.float32, where="t")
    assert (got.scale, got.softcap) == (
        1.0,
        None,
    )  # the candidate that matches forward, not the config's claim


def test_check_head_applies_softcap_when_forward_does(monkeypatch):
    m = _llama()
    m.config.final_logit_softcapping = 3.0
    lin = m.lm_head.forward
    monkeypatch.setattr(m.lm_head, "forward", lambda h: torch.tanh(lin(h) / 3.0) * 3.0)  # Gemma-style forward
    with torch.inference_mode():
        got = check_head(m, m.model, LMHead(m.lm_head.weight), device="cpu", dtype=torch.float32, where="t")
    assert got.softcap == 3.0


def test_check_head_refuses_unknown_post_processing(monkeypatch):
    m = _llama()
    lin = m.lm_head.forward
    monkeypatch.setattr(m.lm_head, "forward", lambda h: lin(h) * 0.7)  # a scaling no config field names
    with pytest.raises(UserError, match="does not reproduce"), torch.inference_mode():
        check_head(m, m.model, LMHead(m.lm_head.weight), device="cpu", dtype=torch.float32, where="t")


def test_head_logits_post_processing_order():
    head = random_head(10, 4, seed=0, scale=0.5, softcap=2.0, bias=True)
    h = torch.randn(3, 4)
    np.testing.assert_allclose(
        head.logits(h).double().numpy(), logits64(head, h).numpy(), rtol=1e-5, atol=1e-6
    )
