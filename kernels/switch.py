"""One switch between the Triton kernels and their PyTorch references.

``WINNOW_KERNELS=reference|triton|auto`` (default ``auto``): ``auto`` takes the Triton kernel for CUDA
tensors when triton imports, and the reference everywhere else (CPU, or a GPU stack without triton);
``triton`` insists (an error when it cannot run, except on CPU under ``TRITON_INTERPRET=1``, which
the tests use); ``reference`` forces the plain PyTorch path everywhere. The trainer and the model
passes reach the kernels only through the functions below, so one variable flips every call site.
Nothing here imports triton, cupy, pyarrow or the run store at module level.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from winnow.kernels.linear_cross_entropy import linear_cross_entropy_reference

BACKENDS = ("reference", "triton", "auto")


def requested() -> str:
    value = os.environ.get("WINNOW_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"WINNOW_KERNELS={value!r}: use one of {', '.join(BACKENDS)}")
    return value


def backend(device: torch.device | str) -> str:
    """The implementation the switch picks for tensors on ``device``: ``"reference"`` or ``"triton"``."""
    want = requested()
    if want == "reference":
        return "reference"
    on_cuda = torch.device(device).type == "cuda"
    has_triton = importlib.util.find_spec("triton") is not None
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if want == "auto":
        return "triton" if (on_cuda and has_triton) else "reference"
    if not has_triton:
        raise RuntimeError("WINNOW_KERNELS=triton but triton is not installed: pip install 'winnow[gpu]'")
    if not (on_cuda or interpreted):
        raise RuntimeError("WINNOW_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
    return "triton"


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Σ w·ℓ of the LM head over (N, D) hidden states; see :mod:`winnow.kernels.linear_cross_entropy`."""
    if backend(hidden.device) == "triton":
        from winnow.kernels.triton_linear_cross_entropy import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, targets, token_weight, bias=bias, softcap=softcap)
    return linear_cross_entropy_reference(hidden, weight, targets, token_weight, bias, softcap, chunk)
