"""The attention-importance core against a brute-force float64 loop over queries, keys and heads.

Inputs are random (never zero) q and k of several shapes, grouped-query heads, several samples per row,
padding, a sliding window and logit softcapping. Tolerance: 1e-5 absolute on values in [0, 1] (the core
runs in fp32; the reference in float64).
"""

import math

import pytest
import torch

from winnow.kernels import attention_importance as ai


def _brute(q, k, segment, key_mask, scale, window=None, softcap=None):
    """Per query i: mean over heads of softmax over the allowed keys j, summed over keys with key_mask."""
    q, k = q.double(), k.double()
    rows, heads, width, _ = q.shape
    rep = heads // k.shape[1]
    out = torch.zeros(rows, width, dtype=torch.float64)
    for r in range(rows):
        for i in range(width):
            allowed = [
                j
                for j in range(i + 1)
                if segment[r, j] == segment[r, i] and (window is None or j > i - window)
            ]
            total = 0.0
            for h in range(heads):
                logits = [float(q[r, h, i] @ k[r, h // rep, j]) * scale for j in allowed]
                if softcap:
                    logits = [softcap * math.tanh(x / softcap) for x in logits]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                z = sum(weights)
                total += sum(w / z for w, j in zip(weights, allowed, strict=True) if key_mask[r, j])
            out[r, i] = total / heads
    return out


@pytest.mark.parametrize(
    ("rows", "heads", "kv", "width", "dim", "window", "softcap"),
    [
        (1, 2, 2, 9, 4, None, None),
        (2, 4, 2, 13, 8, None, None),
        (2, 6, 2, 17, 4, 5, None),
        (1, 4, 1, 11, 8, None, 3.0),
    ],
)
def test_matches_brute_force(rows, heads, kv, width, dim, window, softcap, monkeypatch):
    g = torch.Generator().manual_seed(rows * 100 + width)
    q = torch.randn(rows, heads, width, dim, generator=g) * 1.5
    k = torch.randn(rows, kv, width, dim, generator=g) * 1.5
    segment = torch.zeros(rows, width, dtype=torch.long)
    segment[:, width // 2 :] = 1  # two samples packed in each row
    segment[-1, -2:] = -1  # padding at the end of the last row
    key_mask = torch.rand(rows, width, generator=g) < 0.5
    key_mask[:, 0] = True
    scale = dim**-0.5
    want = _brute(q, k, segment, key_mask, scale, window, softcap)
    got = ai.importance_from_qk(q, k, segment, key_mask, scale=scale, window=window, softcap=softcap)
    assert got.dtype == torch.float32 and got.shape == (rows, width)
    assert float(want.abs().max()) > 0.1  # not vacuous
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # Query chunks (3 queries at a time) and skipped chunks give the same values where needed.
    monkeypatch.setattr(ai, "CHUNK_ELEMS", rows * heads * width * 3)
    needed = torch.zeros(rows, width, dtype=torch.bool)
    needed[:, width - 2] = True
    some = ai.importance_from_qk(
        q, k, segment, key_mask, scale=scale, window=window, softcap=softcap, query_mask=needed
    )
    torch.testing.assert_close(some[:, width - 2].double(), want[:, width - 2], rtol=0, atol=1e-5)
    first_computed = (width - 2) // 3 * 3  # start of the only chunk holding a needed query
    assert float(some[:, :first_computed].abs().max()) == 0.0
