"""The varlen packer's output: the contract of the torch packer and of its CuPy alternative.

The packer itself is :func:`winnow.core.layout.pack_varlen` (torch ops, any device: the one packer of
the model passes and the trainer); :func:`winnow.kernels.cupy_packing.pack_cupy` is its GPU alternative
with the same signature. Both return a :class:`Packed`; it lives here, on the lowest floor, so the kernel
needs nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: the layout module's planners run without torch (winnow --help)
    import torch


@dataclass
class Packed:
    """One packed micro-batch: ``input_ids``/``position_ids`` (T',) int64 of the samples back to back
    (positions restarting at 0 per sample), ``cu_seqlens`` (S'+1,) int32 sample boundaries and
    ``max_seqlen``; ``gather`` (M,) int64 flat positions whose *next* token is a weighted target, that
    token in ``targets`` (M,) and its weight in ``weights`` (M,) float32."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    gather: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def empty(device: torch.device | str) -> Packed:
    """The packing of a micro-batch without a weighted target."""
    import torch

    z = torch.zeros(0, dtype=torch.int64, device=device)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    return Packed(z, z.clone(), cu, 0, z.clone(), z.clone(), torch.zeros(0, dtype=torch.float32, device=device))
