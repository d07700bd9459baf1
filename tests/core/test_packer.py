"""The one packer (:func:`winnow.core.layout.pack_varlen`) against a brute-force Python packer and by
invariants (CPU), and the CuPy packer against it (``gpu``)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from winnow.core.layout import pack_varlen, stage


def _ragged(seed, n_samples=12, max_len=40, vocab=1000):
    """Random samples with the awkward cases: empty, all-zero weights, weight only on the first token
    (never counts), long unweighted tails, fractional weights."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len, n_samples)
    lens[:3] = [0, 1, 5]
    ids, ws = [], []
    for k, n in enumerate(lens):
        w = np.where(rng.random(n) < 0.4, rng.random(n).astype(np.float32) + 0.1, 0.0).astype(np.float32)
        if k == 2:
            w[:] = 0
            w[0] = 1.0  # only the first token weighs: the sample is dropped
        if k % 4 == 3 and n > 4:
            w[n // 2 :] = 0  # unweighted tail to trim
        ids.append(rng.integers(0, vocab, n))
        ws.append(w)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return offsets, np.concatenate(ids).astype(np.int64), np.concatenate(ws).astype(np.float32), ids, ws


def _brute(ids, ws, trim=True):
    """One sample at a time, token by token (``trim=False``: every sample whole, none dropped)."""
    out_ids, out_pos, cu, gather, targets, weights = [], [], [0], [], [], []
    for x, w in zip(ids, ws, strict=True):
        last = max((i for i in range(1, len(x)) if w[i] != 0), default=None) if trim else len(x) - 1
        if last is None:
            continue
        start = len(out_ids)
        for i in range(last + 1):
            out_ids.append(int(x[i]))
            out_pos.append(i)
            if i >= 1 and w[i] != 0:
                gather.append(start + i - 1)
                targets.append(int(x[i]))
                weights.append(float(w[i]))
        cu.append(len(out_ids))
    return out_ids, out_pos, cu, gather, targets, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_brute_force(seed):
    offsets, ids, ws, ids_list, ws_list = _ragged(seed)
    p = pack_varlen(*stage(offsets, ids, ws, "cpu"))
    want = _brute(ids_list, ws_list)
    got = (p.input_ids, p.position_ids, p.cu_seqlens, p.gather, p.targets, p.weights)
    for name, a, e in zip(("ids", "pos", "cu", "gather", "targets", "weights"), got, want, strict=True):
        assert a.tolist() == pytest.approx(e), name
    assert p.cu_seqlens.dtype == torch.int32 and p.input_ids.dtype == torch.int64
    assert p.max_seqlen == max(np.diff(want[2]))


def test_reference_invariants():
    offsets, ids, ws, *_ = _ragged(7, n_samples=40, max_len=200)
    p = pack_varlen(*stage(offsets, ids, ws, "cpu"))
    cu = p.cu_seqlens.long()
    assert cu[0] == 0 and cu[-1] == p.input_ids.numel() and torch.all(cu[1:] > cu[:-1])  # no empty sample
    starts = torch.zeros(p.input_ids.numel(), dtype=torch.bool)
    starts[cu[:-1]] = True
    assert torch.equal(p.position_ids == 0, starts)  # positions restart exactly at sample starts
    assert torch.equal(p.input_ids[p.gather + 1], p.targets)  # each gathered row predicts its target
    assert not torch.isin(p.gather, cu[1:] - 1).any()  # no target crosses into the next sample
    assert torch.all(p.weights != 0)
    # every weighted target of the input is kept, and the last token of every sample is one
    total = sum(float(w[1:].sum()) for w in np.split(ws, offsets[1:-1]))
    assert p.weights.sum().item() == pytest.approx(total, rel=1e-5)
    assert torch.isin(cu[1:] - 2, p.gather).all()


@pytest.mark.parametrize("seed", [3, 4])
def test_whole_samples_match_brute_force(seed):
    """``trim=False`` (the trainer's rows): no sample cut or dropped, empty and unweighted ones included."""
    offsets, ids, ws, ids_list, ws_list = _ragged(seed, n_samples=30, max_len=100)
    p = pack_varlen(*stage(offsets, ids, ws, "cpu"), trim=False)
    want = _brute(ids_list, ws_list, trim=False)
    got = (p.input_ids, p.position_ids, p.cu_seqlens, p.gather, p.targets, p.weights)
    for name, a, e in zip(("ids", "pos", "cu", "gather", "targets", "weights"), got, want, strict=True):
        assert a.tolist() == pytest.approx(e), name
    assert p.cu_seqlens.dtype == torch.int32 and p.weights.dtype == torch.float32


def test_empty_batch_and_bad_offsets():
    p = pack_varlen(*stage(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), "cpu"))
    assert p.input_ids.numel() == 0 and p.cu_seqlens.tolist() == [0] and p.max_seqlen == 0
    with pytest.raises(ValueError, match="offsets"):
        stage(np.array([0, 5]), np.zeros(4, np.int64), np.zeros(4, np.float32), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
@pytest.mark.parametrize("seed,n_samples,max_len", [(0, 12, 40), (1, 64, 4096), (2, 1, 3)])
def test_cupy_matches_the_torch_packer(seed, n_samples, max_len):
    from winnow.kernels.cupy_packing import pack_cupy

    offsets, ids, ws, *_ = _ragged(seed, n_samples, max_len)
    staged = stage(offsets, ids, ws, "cuda")
    want = pack_varlen(*staged)
    got = pack_cupy(*staged)
    torch.cuda.synchronize()
    for f in ("input_ids", "position_ids", "cu_seqlens", "gather", "targets", "weights"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert got.max_seqlen == want.max_seqlen


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_cupy_source_compiles_without_a_gpu():
    """NVRTC compiles the packer's CUDA source to PTX with no device present (catches C errors on CPU)."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        prog = nvrtc.createProgram(_cupy_source(), "pack.cu", [], [])
    except Exception as e:  # noqa: BLE001 - no NVRTC library: nothing to check here
        pytest.skip(f"NVRTC unavailable: {e}")
    nvrtc.compileProgram(prog, ["-arch=compute_80"])
    ptx = nvrtc.getPTX(prog).decode()
    assert ".entry trim_lengths(" in ptx and ".entry scatter_tokens(" in ptx


def _cupy_source() -> str:
    from winnow.kernels import cupy_packing

    return cupy_packing._SOURCE
