"""Every rank of a training run uses the same LM-head backend.

Under ``WINNOW_KERNELS=auto`` the switch sends the training head to Triton only after the kernel's
self-check passed for the head's key (:mod:`winnow.kernels.self_check`). Were that check left to the
first forward, one rank could pin the reference while another trusts the kernel: the same model would
then train with two numerically different heads. So the loop runs the check once at start-up, on every
rank at the same point, and all-reduces the verdict: a failure anywhere pins the reference everywhere.
"""

from __future__ import annotations

import torch

from winnow.trainer.distributed import Dist, all_reduce_sum


def agree_on_head_backend(
    device: torch.device, amp: torch.dtype | None, bias: bool, softcap: bool, d: Dist
) -> bool | None:
    """Run (and agree on) the training head's self-check where ``auto`` would consult it: ``None`` when
    it would not (reference or triton forced, CPU, fp32 head), else whether Triton is trusted."""
    from winnow.kernels import self_check, switch

    # the head runs in the autocast dtype (switch._autocast_operands); without autocast it is fp32
    if switch.requested() != "auto" or not switch.auto_candidate(device, amp):
        return None

    def reduce(ok: bool) -> bool:
        return all_reduce_sum([0.0 if ok else 1.0], device)[0] == 0.0

    return self_check.passes("linear_ce", device, amp, bias, softcap, reduce=reduce if d.world > 1 else None)
