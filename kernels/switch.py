"""One switch between the Triton kernels and their PyTorch references.

``WINNOW_KERNELS=reference|triton|auto`` (default ``auto``):

* ``reference`` forces the plain PyTorch path everywhere.
* ``triton`` insists (an error when it cannot run, except on CPU under ``TRITON_INTERPRET=1``, which
  the tests use); no self-check: the operator asked for the kernel.
* ``auto`` takes a Triton kernel only for CUDA tensors in bf16/fp16, when triton imports, and only
  after that kernel passed its one-time self-check for the call's key (kernel, device, dtype, bias,
  soft-cap; :mod:`winnow.kernels.self_check`): no kernel that has never run on this GPU gets a user's
  data unchecked. A failed check warns once and pins the reference for that key. **fp32 heads go to
  the reference under ``auto``**: the kernel's fp32 path uses exact IEEE products (no tensor cores, ~10x
  slower than its bf16 path on paper), while the reference's fp32 GEMM is cuBLAS; fp32 heads are the
  model passes' exact path, and no GPU measurement yet shows Triton's fp32 path faster (revisit when
  ``benchmarks/gpu_check.sh`` has timed both). The trainer casts its head to the autocast dtype
  (bf16 on GPUs that have it) so training reaches the kernel.

The trainer and the model passes reach the kernels only through the functions below
(:func:`linear_cross_entropy` for training, :func:`logprob_entropy` and :func:`contrast_scores` for the
passes), so one variable flips every call site. The variable is read at every call (a process can
switch between calls, as the GPU check does). Nothing here imports triton, cupy, pyarrow or the run
store at module level.
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


def _eligible(device: torch.device) -> bool:
    """Devices ``auto`` may send to Triton (a function, so tests can admit the CPU interpreter)."""
    return device.type == "cuda"


def auto_candidate(device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Whether ``auto`` would consider Triton here, subject to the kernel's self-check."""
    return _has_triton() and _eligible(torch.device(device)) and dtype in (torch.bfloat16, torch.float16)


def backend(
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    bias: bool = False,
    softcap: bool = False,
    op: str = "linear_ce",
) -> str:
    """The implementation the switch picks for a call of ``op`` on ``device`` with a head in ``dtype``
    (with or without bias and soft-cap): ``"reference"`` or ``"triton"``."""
    want = requested()
    if want == "reference":
        return "reference"
    device = torch.device(device)
    if want == "auto":
        if not auto_candidate(device, dtype):
            return "reference"
        from winnow.kernels import self_check

        return "triton" if self_check.passes(op, device, dtype, bias, softcap) else "reference"
    if not _has_triton():
        raise RuntimeError("WINNOW_KERNELS=triton but triton is not installed: pip install 'winnow[gpu]'")
    if not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "WINNOW_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)"
        )
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
    """Σ w·ℓ of the LM head over (N, D) hidden states; see :mod:`winnow.kernels.linear_cross_entropy`.

    Under autocast (the trainer on a GPU: fp32 master weights, bf16 autocast) ``hidden``, ``weight`` and
    ``bias`` are cast to the autocast dtype first, as autocast does for any matmul: otherwise the fp32
    master weight sends the head down the kernel's exact-fp32 path (no tensor cores, ~10x slower).
    The casts are differentiable: the gradients reach the fp32 weights in fp32."""
    hidden, weight, bias = _autocast_operands(hidden, weight, bias)
    if backend(hidden.device, weight.dtype, bias is not None, softcap is not None) == "triton":
        from winnow.kernels.triton_linear_cross_entropy import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, targets, token_weight, bias=bias, softcap=softcap)
    return linear_cross_entropy_reference(hidden, weight, targets, token_weight, bias, softcap, chunk)


def _autocast_operands(hidden, weight, bias):
    kind = hidden.device.type
    if not torch.is_autocast_enabled(kind):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(kind)
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


def _head_key(head: chunked_head.LMHead) -> tuple[torch.dtype, bool, bool]:
    return head.weight.dtype, head.bias is not None, head.softcap is not None


def logprob_entropy(
    head: chunked_head.LMHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(target) and entropy, (N,) fp32 each; see :func:`.chunked_head.logprob_entropy`.
    ``chunk`` only sizes the reference's blocks (the kernel holds no logits)."""
    if backend(hidden.device, *_head_key(head), op="logprob_entropy") == "triton":
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
    (dt, b1, c1), (_, b2, c2) = _head_key(head_pos), _head_key(head_neg)
    if backend(hidden_pos.device, dt, b1 or b2, c1 or c2, op="contrast") == "triton":
        from winnow.kernels.triton_linear_cross_entropy import contrast_scores_triton

        return contrast_scores_triton(head_pos, hidden_pos, head_neg, hidden_neg, targets, beta=beta)
    return chunked_head.contrast_scores(
        head_pos, hidden_pos, head_neg, hidden_neg, targets, beta=beta, chunk=chunk
    )
