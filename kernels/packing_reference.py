"""Packing a micro-batch for varlen attention, in PyTorch: the reference for the CuPy packer.

Input is a micro-batch's ragged token lists in Arrow layout: ``offsets`` (S+1,) int64, ``ids`` (T,)
token ids, ``weights`` (T,) float32, where ``weights[i]`` weighs token ``i`` *as a target* (predicted by
the hidden state at ``i - 1``; a sample's first weight never counts). Output, for the samples that
weigh anything, each trimmed after its last nonzero-weight target (later tokens change no loss term
under causal attention):

* ``input_ids``, ``position_ids`` (T',) int64: the trimmed samples back to back, positions restarting
  at 0 per sample;
* ``cu_seqlens`` (S'+1,) int32: sample boundaries (samples with no weighted target are dropped, so
  no zero-length segment reaches the attention kernel); ``max_seqlen``;
* ``gather`` (M,) int64: flat positions whose *next* token is a weighted target (never a sample's last
  position), with that token in ``targets`` (M,) and its weight in ``weights`` (M,) float32.

These are the semantics of the trainer's CPU packer (``trim`` then ``pack_varlen``). Every step is a
vectorised torch op, so the same code runs on CPU tensors or on the GPU; :func:`stage` moves the three
arrays host -> device in one copy from pinned memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Packed:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    gather: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def check_ragged(offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be a non-decreasing (S+1,) array starting at 0")
    if int(offsets[-1]) != ids.size or ids.size != weights.size:
        raise ValueError(f"offsets end at {int(offsets[-1])} but ids/weights hold {ids.size}/{weights.size}")


def stage(
    offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets int64, ids int64, weights float32) on ``device``. For CUDA the three arrays are laid
    into one pinned host buffer and copied with a single non-blocking transfer on the current stream
    (torch's pinned allocator keeps the buffer alive until that copy is done)."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    check_ragged(offsets, ids, weights)
    device = torch.device(device)
    if device.type != "cuda":
        return tuple(torch.from_numpy(x).to(device) for x in (offsets, ids, weights))  # type: ignore[return-value]
    a, b = offsets.nbytes, offsets.nbytes + ids.nbytes  # both multiples of 8: every view stays aligned
    host = torch.empty(b + weights.nbytes, dtype=torch.uint8, pin_memory=True)
    buf = host.numpy()
    buf[:a] = offsets.view(np.uint8)
    buf[a:b] = ids.view(np.uint8)
    buf[b:] = weights.view(np.uint8)
    dev = host.to(device, non_blocking=True)
    return dev[:a].view(torch.int64), dev[a:b].view(torch.int64), dev[b:].view(torch.float32)


def pack_reference(offsets: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Packed:
    """Trim, pack and index one micro-batch (tensors on any one device); see the module docstring."""
    dev = ids.device
    n_samples = offsets.numel() - 1
    lens = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(n_samples, device=dev), lens)  # (T,) owner of each token
    local = torch.arange(ids.numel(), device=dev) - offsets[:-1][sample]  # index inside its sample
    weighted = (weights != 0) & (local >= 1)
    last = torch.full((n_samples,), -1, dtype=torch.int64, device=dev)
    last.scatter_reduce_(0, sample[weighted], local[weighted], reduce="amax")
    trimmed = last + 1  # 0 when the sample weighs nothing
    keep = local < trimmed[sample]
    starts = torch.cumsum(trimmed, 0) - trimmed  # packed start of each sample
    flat = starts[sample] + local
    kept = trimmed[trimmed > 0]
    cu = torch.zeros(kept.numel() + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(kept, 0)
    return Packed(
        input_ids=ids[keep],
        position_ids=local[keep],
        cu_seqlens=cu,
        max_seqlen=int(kept.max()) if kept.numel() else 0,
        gather=flat[weighted] - 1,
        targets=ids[weighted],
        weights=weights[weighted].to(torch.float32),
    )
