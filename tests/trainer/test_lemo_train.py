"""LeMo in training (trainer.lemo, trainer.lemo_layer): keep=1 is the dense model (loss and every gradient,
float64, padded and packed rows); attention on gathered tokens at their original RoPE positions equals a
direct computation; unselected tokens pass the attention unchanged; it composes with LoRA on q,k,v,o and
refuses a trained MLP with the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from winnow.core.layout import layout_batch
from winnow.trainer.lemo import LemoParams, default_layers, parse_layers, save_predictors
from winnow.trainer.lemo_layer import documents, gathered_attention
from winnow.trainer.lemo_math import BlockPredictor
from winnow.trainer.loss import WeightedLMLoss
from winnow.trainer.method import MethodContext

BLOCK = 8


def _llama(impl: str = "sdpa", seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_cache=False, attn_implementation=impl,
        rope_theta=100.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lemo_pred")
    torch.manual_seed(5)
    preds = {i: BlockPredictor(4, 4, BLOCK, h1=6, h2=10) for i in (1, 2)}
    meta = {"block": BLOCK, "n_heads": 4, "head_dim": 4, "h1": 6, "h2": 10, "layers": [1, 2]}
    save_predictors(folder, preds, meta)
    return folder


def _batch(layout: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, 61, n) for n in (37, 21)]
    weights = [rng.uniform(0.2, 1.5, len(s)).astype(np.float32) for s in seqs]
    return layout_batch(seqs, weights, layout)


def _loss_and_grads(model, b, method=None):
    mod = WeightedLMLoss(model)
    mod.zero_grad()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    pos = t(b.position_ids) if b.layout == "packed" else None
    ctx = method.forward_change(b, model) if method is not None else torch.no_grad().__class__()
    import contextlib

    with ctx if method is not None else contextlib.nullcontext():
        loss = mod(t(b.input_ids), t(b.gather), t(b.targets), t(b.weights).double(), pos)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout,impl", [("padded", "sdpa"), ("packed", "sdpa"), ("packed", "eager")])
def test_keep_one_equals_dense_loss_and_gradients(predictors, layout, impl):
    b = _batch(layout)
    dense_loss, dense_grads = _loss_and_grads(_llama(impl), b)
    model = _llama(impl)
    method = LemoParams(predictors=str(predictors), block=BLOCK, keep=1.0, mlp_keep=1.0)
    method.trainable(model, MethodContext(device=torch.device("cpu")))
    loss, grads = _loss_and_grads(model, b, method)
    assert float(dense_loss) > 0
    torch.testing.assert_close(loss, dense_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == dense_grads.keys() and len(grads) > 10
    for n, g in grads.items():
        torch.testing.assert_close(g, dense_grads[n], rtol=1e-10, atol=1e-12, msg=n)
    assert method.metrics() == {"lemo_kept": 1.0}
    assert "forward" not in vars(model.model.layers[1])  # the class's forward again after the batch


def _rope_by_hand(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Llama's rotate-half RoPE on ``[H, n, d]`` at positions ``pos``."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos[:, None] * inv[None]] * 2, axis=1)
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _direct_attention(attn, x: np.ndarray, idx: np.ndarray, doc: np.ndarray, theta: float) -> np.ndarray:
    w = {n: getattr(attn, n).weight.detach().numpy() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    h, d = 4, 4
    xs = x[idx]
    q = (xs @ w["q_proj"].T).reshape(len(idx), h, d).transpose(1, 0, 2)
    k = (xs @ w["k_proj"].T).reshape(len(idx), 2, d).transpose(1, 0, 2)
    v = (xs @ w["v_proj"].T).reshape(len(idx), 2, d).transpose(1, 0, 2)
    q, k = _rope_by_hand(q, idx.astype(float), theta), _rope_by_hand(k, idx.astype(float), theta)
    out = np.zeros((len(idx), h, d))
    for hh in range(h):
        for i in range(len(idx)):
            js = [j for j in range(i + 1) if doc[j] == doc[i]]
            s = np.array([q[hh, i] @ k[hh // 2, j] for j in js]) / math.sqrt(d)
            p = np.exp(s - s.max())
            out[i, hh] = (p / p.sum()) @ v[hh // 2, js]
    return out.reshape(len(idx), h * d) @ w["o_proj"].T


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("two_docs", [False, True])
def test_gathered_attention_equals_direct_computation(impl, two_docs):
    model = _llama(impl)
    attn = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 9, 10, 17, 30, 31, 39])
    doc = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1]) if two_docs else torch.zeros(9, dtype=torch.long)
    seg = torch.cat([torch.arange(int((doc == k).sum())) for k in doc.unique()])
    cos, sin = model.model.rotary_emb(x[None], torch.arange(40)[None])
    with torch.no_grad():
        got = gathered_attention(attn, x, idx, seg, doc, (cos[0], sin[0])).numpy()
    want = _direct_attention(attn, x.numpy(), idx.numpy(), doc.numpy(), 100.0)
    assert np.abs(want).max() > 0.1
    # transformers computes cos/sin in float32 (then casts): ~1e-7 relative, where a wrong position is O(1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unselected_tokens_skip_attention(predictors):
    from winnow.trainer.lemo_layer import lemo_forward

    model = _llama()
    method = LemoParams(predictors=str(predictors), block=BLOCK, keep=0.4, mlp_keep=1.0)
    method.trainable(model, MethodContext(device=torch.device("cpu")))
    layer, pred = method.state.layers[1]
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, 45, 16, generator=g, dtype=torch.float64)
    pos = torch.arange(45)[None]
    cos_sin = model.model.rotary_emb(h, pos)
    docs = documents(np.arange(45)[None])
    with torch.no_grad():
        out = lemo_forward(method.state, 1, layer, pred, docs, h, position_embeddings=cos_sin)
        idx = method.state.cache[1][0][0]
        skipped = torch.tensor([i for i in range(45) if i not in set(idx.tolist())])
        plain = h[0, skipped] + layer.mlp(layer.post_attention_layernorm(h[0, skipped]))
    assert len(idx) == 2 * BLOCK and len(skipped) == 45 - 2 * BLOCK  # 6 blocks (the last short) -> 2 kept
    torch.testing.assert_close(out[0, skipped], plain, rtol=1e-12, atol=1e-12)
    assert (out[0, idx] - h[0, idx]).abs().max() > 1e-3


def test_documents_and_layers():
    pos = np.array([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert documents(pos) == [[(0, 3), (3, 5), (5, 9)]]
    assert documents(np.tile(np.arange(5), (2, 1))) == [[(0, 5)], [(0, 5)]]
    assert default_layers(32) == list(range(15, 31)) and default_layers(4) == [1, 2]
    assert parse_layers("1, 3-4", 6, "lemo.layers") == [1, 3, 4]
    with pytest.raises(Exception, match="0..3"):
        parse_layers("4", 4, "lemo.layers")


def test_composes_with_lora_and_refuses_a_trained_mlp(predictors):
    from winnow.core.errors import UserError
    from winnow.trainer.lora import LoraParams

    ctx = MethodContext(device=torch.device("cpu"))
    model = LoraParams(r=4, target="q_proj,k_proj,v_proj,o_proj").trainable(_llama(), ctx)
    method = LemoParams(predictors=str(predictors), block=BLOCK, keep=0.4, mlp_keep=0.2)
    method.trainable(model, ctx)
    loss, grads = _loss_and_grads(model, _batch("packed"), method)
    assert torch.isfinite(loss) and grads and all("lora_" in n for n in grads)
    assert all(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)
    assert 0.3 < method.metrics()["lemo_kept"] < 0.9
    full = LoraParams(r=4).trainable(_llama(), ctx)  # all-linear: the MLP has adapters
    with pytest.raises(UserError, match="lora.target=q_proj,k_proj,v_proj,o_proj"):
        LemoParams(predictors=str(predictors), block=BLOCK).trainable(full, ctx)
    with pytest.raises(UserError, match="lemo-fit"):
        LemoParams(predictors=str(predictors.parent / "nothing")).trainable(_llama(), ctx)


def test_activation_checkpointing_recomputes_the_same_selection(predictors):
    from winnow.trainer.lora import LoraParams

    ctx = MethodContext(device=torch.device("cpu"))
    b = _batch("padded", seed=3)
    out = []
    for ckpt in (False, True):
        model = LoraParams(r=4, target="q_proj,k_proj,v_proj,o_proj").trainable(_llama(seed=2), ctx)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        method = LemoParams(predictors=str(predictors), block=BLOCK, keep=0.4, mlp_keep=0.2)
        method.trainable(model, ctx)
        model.train()
        out.append(_loss_and_grads(model, b, method))
        # 2 layers, each selected once (not again when the checkpointed forward is recomputed)
        assert method.state.seen == b.input_ids.size * 2
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=n)
