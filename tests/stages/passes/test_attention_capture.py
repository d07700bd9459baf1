"""Recomputed attention importance vs the model's own eager attention, per sample, in both layouts."""

import numpy as np
import pytest
import torch

from winnow.core.attention_capture import AttentionCapture, attention_importance, check_attention
from winnow.core.layout import collate, plan_batches
from winnow.core.store import UserError

from attention_reference import _eager_reference
from model_pass_fixtures import make_config, random_samples


def _model(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = make_config(arch)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_matches_eager_attention(arch, layout):
    model = _model(arch)
    seqs, masks = random_samples(7, seed=3, lo=4, hi=40)
    lens = [len(x) for x in seqs]
    checked = 0
    with torch.inference_mode():
        for plan in plan_batches(lens, 96, layout):
            col = collate(plan, seqs, layout)
            flat_keys = np.zeros(col.input_ids.numel(), bool)
            for k, s in enumerate(col.samples):
                flat_keys[col.starts[k] : col.starts[k] + lens[s]] = masks[s] == 0
            kw = {"position_ids": col.position_ids} if layout == "packed" else {}
            with AttentionCapture(model.model, -1) as cap:
                model.model(input_ids=col.input_ids, use_cache=False, **kw)
            imp = attention_importance(
                cap.module,
                cap.hidden,
                cap.position_embeddings,
                col.segment,
                torch.from_numpy(flat_keys).view(col.input_ids.shape),
            ).reshape(-1)
            for k, s in enumerate(col.samples):
                got = imp[col.starts[k] : col.starts[k] + lens[s]].double().numpy()
                ref = _eager_reference(model, seqs[s], masks[s])
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
                checked += 1
                assert ref.std() > 1e-3  # varied values: a wrong mask or head average would show
    assert checked == len(seqs)


def test_sliding_window_is_exercised_and_matters():
    model = _model("qwen2")
    attn = model.model.layers[-1].self_attn
    assert attn.sliding_window == 7  # the last layer slides; samples up to 40 tokens are longer
    ids = np.random.default_rng(0).integers(0, 300, 30)
    mask = np.zeros(30, np.uint8)
    mask[10:] = 1
    with torch.inference_mode(), AttentionCapture(model.model, -1) as cap:
        model.model(input_ids=torch.as_tensor(ids)[None], use_cache=False)
        seg = torch.zeros(1, 30, dtype=torch.long)
        keys = torch.as_tensor(mask == 0)[None]
        with_window = attention_importance(cap.module, cap.hidden, cap.position_embeddings, seg, keys)
        attn.sliding_window = None
        without = attention_importance(cap.module, cap.hidden, cap.position_embeddings, seg, keys)
    # queries >= 17 cannot see any prompt key inside a 7-token window
    assert float(with_window[0, 17:].abs().max()) == 0.0 and float(without[0, 17:].min()) > 0.0


def test_query_chunking_and_skipping(monkeypatch):
    import winnow.kernels.attention_importance as ai

    model = _model("llama")
    ids = torch.randint(0, 300, (2, 33))
    seg = torch.zeros(2, 33, dtype=torch.long)
    keys = torch.zeros(2, 33, dtype=torch.bool)
    keys[:, :9] = True
    with torch.inference_mode(), AttentionCapture(model.model, 0) as cap:
        model.model(input_ids=ids, use_cache=False)
        full = attention_importance(cap.module, cap.hidden, cap.position_embeddings, seg, keys)
        monkeypatch.setattr(ai, "CHUNK_ELEMS", 4 * 33 * 2 * 5)  # 5 queries per chunk
        chunked = attention_importance(cap.module, cap.hidden, cap.position_embeddings, seg, keys)
        qmask = torch.zeros(2, 33, dtype=torch.bool)
        qmask[:, 20:23] = True
        some = attention_importance(cap.module, cap.hidden, cap.position_embeddings, seg, keys, qmask)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(some[:, 20:23], full[:, 20:23], rtol=1e-6, atol=1e-7)
    assert float(some[:, :20].abs().max()) == 0.0  # chunks without a needed query were skipped


def test_check_attention_accepts_and_refuses(monkeypatch):
    import winnow.core.attention_capture as ai

    model = _model("qwen3")
    orig = ai._project
    with torch.inference_mode():
        check_attention(model, model.model, -1, device="cpu", dtype=torch.float32)
        # a recomputation unaware of Qwen3's per-head q/k norms: what a missed architecture detail looks like
        monkeypatch.setattr(ai, "_project", lambda mod, h, proj, norm: orig(mod, h, proj, "no_such_norm"))
        with pytest.raises(UserError, match="differs from the model's own eager attention"):
            check_attention(model, model.model, -1, device="cpu", dtype=torch.float32)
    with pytest.raises(UserError, match="attention_layer=5"):
        AttentionCapture(model.model, 5)
