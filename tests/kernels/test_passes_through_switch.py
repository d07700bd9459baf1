"""The model passes reach the head through the switch: the same pass with ``WINNOW_KERNELS=triton``
(the interpreter on CPU) and ``=reference`` gives the same per-token values (rtol = atol = 1e-5, the
passes' promise) on the same computed positions."""

import numpy as np
import pytest
import torch

from winnow.core.model_io import load_model
from winnow.stages.passes.contrast_pass import contrast_samples
from winnow.stages.passes.model_scoring import score_samples

from model_pass_fixtures import make_model_dir, random_samples


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [
        load_model(make_model_dir(root, "llama", seed=s), device=dev, dtype=torch.float32) for s in (0, 1)
    ]


def _both(monkeypatch, fn, kernel: str):
    """fn() under each backend; asserts the Triton kernel ran exactly when asked for."""
    from winnow.kernels import triton_linear_cross_entropy as tk

    calls = []
    real = getattr(tk, kernel)
    monkeypatch.setattr(tk, kernel, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    out = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("WINNOW_KERNELS", mode)
        before = len(calls)
        out[mode] = fn()
        assert (len(calls) > before) == (mode == "triton")
    return out["reference"], out["triton"]


def test_model_pass_same_through_triton(loaded, monkeypatch):
    seqs, masks = random_samples(5, seed=3)
    ref, tri = _both(
        monkeypatch,
        lambda: score_samples(loaded[0], seqs, masks, signals=["logprob", "entropy"]),
        "logprob_entropy_triton",
    )
    assert ref.valid.sum() > 50 and np.array_equal(ref.valid, tri.valid)
    for s in ("logprob", "entropy"):
        np.testing.assert_allclose(tri.values[s][tri.valid], ref.values[s][ref.valid], rtol=1e-5, atol=1e-5)


def test_contrast_pass_same_through_triton(loaded, monkeypatch):
    seqs, masks = random_samples(4, seed=4)
    run = lambda: contrast_samples(loaded[0], loaded[1], seqs, masks, beta=0.5)  # noqa: E731
    (ref, rv), (tri, tv) = _both(monkeypatch, run, "contrast_scores_triton")
    assert rv.sum() > 40 and np.array_equal(rv, tv)
    for c in ref:
        np.testing.assert_allclose(tri[c][tv], ref[c][rv], rtol=1e-5, atol=1e-6 if c == "p_ce" else 1e-5)
