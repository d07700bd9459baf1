"""The micro-batch packer as two CuPy ``RawKernel`` s on torch's current CUDA stream.

The GPU alternative of :func:`winnow.core.layout.pack_varlen` (the one packer: read its docstring), with
the same signature and outputs (``trim=True``, the only mode here); tests compare the two. Steps, after
:func:`~winnow.core.layout.stage` has copied offsets, ids and weights to the device in one transfer from
pinned memory:

1. ``trim_lengths`` (one thread per sample, scanning back from its end): the trimmed length, 0 for a
   sample without a weighted target.
2. torch: packed starts (``cumsum``), ``cu_seqlens`` over the kept samples, and the running count of
   weighted targets (``cumsum`` of a flag), which gives each target its slot in ``gather``.
3. ``scatter_tokens`` (one thread per input token, its sample found by binary search in ``offsets``):
   writes ``input_ids``/``position_ids`` of kept tokens and ``gather``/``targets``/``weights`` of
   weighted ones.

Buffers are torch tensors (torch's caching allocator, nothing held in CuPy's pool); the kernels see
them through DLPack (``cupy.from_dlpack``) and run inside ``cupy.cuda.ExternalStream`` on torch's
current stream, so no synchronisation is needed before torch uses the results. Host syncs
remain: one read of the output sizes, and the kept-sample mask of ``cu_seqlens``.

The CPU/torch packer stays the trainer's default; this one becomes the GPU default only if
``benchmarks/gpu_check.sh`` shows a real gain in step time (not measured yet). ``cupy`` is an optional
``gpu`` extra: import this module only where ``importlib.util.find_spec("cupy")`` finds it.
"""

from __future__ import annotations

import cupy
import numpy as np
import torch

from winnow.kernels.packed import Packed, empty

_SOURCE = r"""
extern "C" __global__ void trim_lengths(const long long* offsets, const float* w, const int n_samples,
                                        long long* trimmed) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= n_samples) return;
    long long a = offsets[s];
    long long n = 0;
    for (long long i = offsets[s + 1] - 1; i > a; --i) {  // position 0 of a sample is never a target
        if (w[i] != 0.0f) { n = i - a + 1; break; }
    }
    trimmed[s] = n;
}

extern "C" __global__ void scatter_tokens(
    const long long* offsets, const int n_samples, const long long* ids, const float* w,
    const long long* trimmed, const long long* starts, const long long* slot_end, const long long n_tokens,
    long long* out_ids, long long* out_pos, long long* gather, long long* targets, float* out_w) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_tokens) return;
    int lo = 0, hi = n_samples;  // the last sample starting at or before i (empty samples skipped)
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (offsets[mid] <= i) lo = mid; else hi = mid;
    }
    long long k = i - offsets[lo];
    if (k >= trimmed[lo]) return;
    long long o = starts[lo] + k;
    out_ids[o] = ids[i];
    out_pos[o] = k;
    if (k >= 1 && w[i] != 0.0f) {
        long long slot = slot_end[i] - 1;
        gather[slot] = o - 1;
        targets[slot] = ids[i];
        out_w[slot] = w[i];
    }
}
"""
_THREADS = 256
_module = None


def _kernels():
    global _module
    if _module is None:
        _module = cupy.RawModule(code=_SOURCE)
    return _module.get_function("trim_lengths"), _module.get_function("scatter_tokens")


def _cp(t: torch.Tensor):
    return cupy.from_dlpack(t)


def pack_cupy(offsets: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, trim: bool = True) -> Packed:
    """Trim, pack and index one micro-batch already on a CUDA device (int64 offsets and ids, float32
    weights, contiguous; see :func:`~winnow.core.layout.stage`). ``trim`` must be true: whole samples are
    the torch packer's job (the trainer's rows are trimmed before they are laid out)."""
    if not trim:
        raise ValueError("pack_cupy packs trimmed samples only (trim=True); use winnow.core.layout.pack_varlen")
    trim_k, scatter_k = _kernels()
    dev = ids.device
    n_samples, n_tokens = offsets.numel() - 1, ids.numel()
    if n_tokens == 0:
        return empty(dev)
    trimmed = torch.empty(n_samples, dtype=torch.int64, device=dev)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream)
    with cupy.cuda.Device(dev.index), stream:
        grid = ((n_samples + _THREADS - 1) // _THREADS,)
        trim_k(grid, (_THREADS,), (_cp(offsets), _cp(weights), np.int32(n_samples), _cp(trimmed)))
    starts = torch.cumsum(trimmed, 0) - trimmed
    flag = weights != 0
    firsts = offsets[:-1][offsets[:-1] < n_tokens]
    flag[firsts] = False  # a sample's first token is never a target
    slot_end = torch.cumsum(flag, 0)
    total, n_targets, longest = torch.cat([trimmed.sum().view(1), slot_end[-1:], trimmed.max().view(1)]).tolist()
    kept = trimmed[trimmed > 0]
    cu = torch.zeros(kept.numel() + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(kept, 0)
    out = Packed(
        input_ids=torch.empty(total, dtype=torch.int64, device=dev),
        position_ids=torch.empty(total, dtype=torch.int64, device=dev),
        cu_seqlens=cu,
        max_seqlen=int(longest),
        gather=torch.empty(n_targets, dtype=torch.int64, device=dev),
        targets=torch.empty(n_targets, dtype=torch.int64, device=dev),
        weights=torch.empty(n_targets, dtype=torch.float32, device=dev),
    )
    if total:  # a kept sample has a weighted target, so n_targets > 0 too: no empty DLPack views
        with cupy.cuda.Device(dev.index), stream:
            grid = ((n_tokens + _THREADS - 1) // _THREADS,)
            args = (_cp(offsets), np.int32(n_samples), _cp(ids), _cp(weights), _cp(trimmed), _cp(starts),
                    _cp(slot_end), np.int64(n_tokens), _cp(out.input_ids), _cp(out.position_ids),
                    _cp(out.gather), _cp(out.targets), _cp(out.weights))
            scatter_k(grid, (_THREADS,), args)
    return out
