"""LeMo's arrays against float64 loop references (ALGORITHMS_TRAINING.md §7): ground-truth block scores from a
real (tiny, random) Llama's pre-RoPE Q and K, the predictor's block features and scores, the selection, and
the MLP's partial backward against autograd of its masked form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from winnow.trainer import lemo_math
from winnow.trainer.lemo_math import BlockPredictor, block_scores, keep_blocks, pruned_mlp, recall


def _llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def _pre_rope_qk(model, ids: torch.Tensor, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The layer's q_proj and k_proj outputs during the model's own forward, as ``[H, L, d]`` arrays."""
    got = {}
    attn = model.model.layers[layer].self_attn
    hooks = [
        getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach()))
        for n in ("q_proj", "k_proj")
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    d = attn.head_dim
    split = lambda t: t[0].view(t.shape[1], -1, d).transpose(0, 1).numpy()  # noqa: E731
    return split(got["q_proj"]), split(got["k_proj"])


def _loop_gt(q: np.ndarray, k: np.ndarray, block: int) -> np.ndarray:
    """``max_{i∈m, j∈n} Σ_h ReLU(q_h[i]·k_{h//g}[j]) / 16`` pair by pair."""
    h, n, _ = q.shape
    g = h // k.shape[0]
    nb = n // block
    out = np.zeros((nb, nb))
    for i in range(n):
        for j in range(n):
            s = sum(max(0.0, float(q[hh, i] @ k[hh // g, j])) for hh in range(h))
            out[i // block, j // block] = max(out[i // block, j // block], s)
    return out / 16.0


@pytest.mark.parametrize("block,blocks,layer", [(16, 3, 0), (8, 5, 1)])
def test_ground_truth_equals_loop_reference(block, blocks, layer, monkeypatch):
    model = _llama()
    ids = torch.randint(3, 97, (1, block * blocks), generator=torch.Generator().manual_seed(block))
    q, k = _pre_rope_qk(model, ids, layer)
    want = _loop_gt(q, k, block)
    assert want.max() > 0 and (want > 0).mean() > 0.5  # not a test on zeros
    monkeypatch.setattr(lemo_math, "SCORE_ELEMENTS", 4 * block * 2 * q.shape[1] // 2)  # several chunks
    got = block_scores(torch.from_numpy(q), torch.from_numpy(k), block).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    one = block_scores(torch.from_numpy(q), torch.from_numpy(k), block)  # one chunk: same
    monkeypatch.undo()
    np.testing.assert_allclose(block_scores(torch.from_numpy(q), torch.from_numpy(k), block).numpy(), one)


def test_ground_truth_rejects_a_partial_block():
    with pytest.raises(ValueError, match="not a multiple"):
        block_scores(torch.ones(2, 10, 4), torch.ones(2, 10, 4), 4)


def _relu(a):
    return np.maximum(a, 0.0)


@pytest.mark.parametrize("heads,d,block,blocks,batch", [(4, 8, 16, 3, 2), (2, 4, 8, 5, 1)])
def test_predictor_scores_equal_loop_reference(heads, d, block, blocks, batch):
    torch.manual_seed(heads)
    pred = BlockPredictor(heads, d, block, h1=12, h2=20).double()
    x = torch.randn(batch, block * blocks, heads * d, dtype=torch.float64)
    got = pred(x).detach().numpy()
    w = {n: p.detach().numpy() for n, p in pred.named_parameters()}
    side = lambda s, f: w[f"{s}.4.weight"] @ _relu(w[f"{s}.2.weight"] @ _relu(w[f"{s}.0.weight"] @ f))  # noqa: E731
    xs = x.numpy()
    want = np.zeros((batch, blocks, blocks))
    for b in range(batch):
        for h in range(heads):
            feats = [
                np.concatenate([xs[b, m * block + t, h * d : (h + 1) * d] for t in range(block)])
                for m in range(blocks)
            ]
            for m in range(blocks):
                for n in range(blocks):
                    want[b, m, n] += side("q", feats[m]) @ side("k", feats[n])
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert pred.sizes == (12, 20) and BlockPredictor(heads, d, block).sizes == (128, block * d)


def test_selection_and_recall_by_hand():
    s = torch.tensor([[1.0, 5.0, 0.0, 2.0], [0.0, 1.0, 0.0, 2.5], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # column sums 1, 6, 3, 4.5: keep 0.5 -> 2 blocks {1, 3}, in position order
    assert keep_blocks(s, 0.5).tolist() == [1, 3]
    assert keep_blocks(s, 0.1).tolist() == [1]  # at least one block (floor(0.4) = 0 in the code)
    assert keep_blocks(s, 1.0).tolist() == [0, 1, 2, 3]
    other = torch.zeros(4, 4)
    other[0, 2], other[0, 3] = 9.0, 8.0  # its top two: {2, 3}
    assert recall(other, s, 0.5) == 0.5 and recall(s, s, 0.5) == 1.0


@pytest.mark.parametrize("tokens,hidden,inter,keep", [(7, 6, 10, 0.2), (13, 8, 24, 0.5), (5, 4, 9, 1.0)])
def test_mlp_partial_backward_equals_autograd_of_masked_form(tokens, hidden, inter, keep):
    from transformers.models.llama.modeling_llama import LlamaMLP

    g = torch.Generator().manual_seed(tokens)
    cfg = type(
        "C", (), {"hidden_size": hidden, "intermediate_size": inter, "hidden_act": "silu", "mlp_bias": False}
    )
    mlp = LlamaMLP(cfg).double().requires_grad_(False)
    for p in mlp.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, tokens, hidden, generator=g, dtype=torch.float64)
    gout = torch.randn(2, tokens, hidden, generator=g, dtype=torch.float64)
    # the reference: neurons ranked in numpy, then autograd of down(c ⊙ mask) with the mask fixed
    xn, wg, wu = x.numpy().reshape(-1, hidden), mlp.gate_proj.weight.numpy(), mlp.up_proj.weight.numpy()
    gate, up = xn @ wg.T, xn @ wu.T
    act = gate / (1 + np.exp(-gate))
    score = np.sqrt((act**2).sum(0)) + np.sqrt((up**2).sum(0))
    n = max(1, int(np.ceil(keep * inter)))
    mask = torch.zeros(inter, dtype=torch.float64)
    mask[np.argsort(-score, kind="stable")[:n]] = 1.0
    xr = x.clone().requires_grad_(True)
    masked = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(xr)) * mlp.up_proj(xr) * mask)
    (want,) = torch.autograd.grad(masked, xr, gout)
    xp = x.clone().requires_grad_(True)
    out = pruned_mlp(mlp, xp, keep)
    torch.testing.assert_close(out, mlp(x), rtol=1e-12, atol=1e-12)  # the forward stays dense
    (got,) = torch.autograd.grad(out, xp, gout)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if keep < 1:  # the approximation is real: the dense gradient differs
        (dense,) = torch.autograd.grad(mlp(xr), xr, gout)
        assert (dense - got).abs().max() > 1e-6
