"""One switch between the Triton kernels and their PyTorch references.

``WINNOW_KERNELS=reference|triton|auto`` (default ``auto``): ``auto`` takes the Triton kernel for CUDA
tensors when triton imports, and the reference everywhere else (CPU, or a GPU stack without triton);
``triton`` insists (an error when it cannot run, except on CPU under ``TRITON_INTERPRET=1``, which
the tests use); ``reference`` forces the plain PyTorch path everywhere. The trainer and the model
passes reach the kernels only through the functions below (:func:`linear_cross_entropy` for training,
:func:`logprob_entropy` and :func:`contrast_scores` for the passes), so one variable flips every call
site. The variable is read at every call (a process can switch between calls, as the GPU check does).
Nothing here imports triton, cupy, pyarrow or the run store at module level.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from winnow.kernels import chunked_head
from winnow.kernels.linear_cross_entropy import linear_cross_entropy_reference

BACKENDS = ("reference", "triton", "auto")


def requested() -> str:
    value = os.environ.get("WINNOW_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"WINNOW_KERNELS={value!r}: use one of {', '.join(BACKENDS)}")
    return value


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None  # ~0.35 ms a call uncached: once per process


def backend(device: torch.device | str) -> str:
    """The implementation the switch picks for tensors on ``device``: ``"reference"`` or ``"triton"``."""
    want = requested()
    if want == "reference":
        return "reference"
    on_cuda = torch.device(device).type == "cuda"
    has_triton = _has_triton()
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


def logprob_entropy(
    head: chunked_head.LMHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(target) and entropy, (N,) fp32 each; see :func:`.chunked_head.logprob_entropy`.
    ``chunk`` only sizes the reference's blocks (the kernel holds no logits)."""
    if backend(hidden.device) == "triton":
        from winnow.kernels.triton_linear_cross_entropy import logprob_entropy_triton

        return logprob_entropy_triton(head, hidden, targets, entropy=entropy)
    return chunked_head.logprob_entropy(head, hidden, targets, chunk=chunk, entropy=entropy)


def contrast_scores(
    head_pos: chunked_head.LMHead,
    hidden_pos: torch.Tensor,
    head_neg: chunked_head.LMHead,
    hidden_neg: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 1.0,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cDPO ``p_CE`` and each head's log p(target); see :func:`.chunked_head.contrast_scores`."""
    if backend(hidden_pos.device) == "triton":
        from winnow.kernels.triton_linear_cross_entropy import contrast_scores_triton

        return contrast_scores_triton(head_pos, hidden_pos, head_neg, hidden_neg, targets, beta=beta)
    return chunked_head.contrast_scores(head_pos, hidden_pos, head_neg, hidden_neg, targets, beta=beta, chunk=chunk)
