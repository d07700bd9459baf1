"""The check every token-weight list passes, on the ground floor so that the trainer's readers and the
selection's user policies (:mod:`winnow.stages.user_policy`) apply the same one: one weight per token,
each a finite float32, none negative; the message names ``where`` (the row, the sample, the function)."""

from __future__ import annotations

import numpy as np

from winnow.core.errors import UserError


def check_weights(w, n: int, where: str, allow_null: bool = True) -> np.ndarray:
    """``w`` as float32 when it has ``n`` finite, non-negative entries, else UserError naming ``where``.

    ``allow_null``: a null (NaN) weighs 0, as a null entry of a stored ``token_weight`` list reads back;
    a weight a function computed has no such excuse (``allow_null=False``: NaN is refused)."""
    if len(w) != n:
        raise UserError(
            f"{where}: {len(w)} token weights for {n} tokens (misaligned); rerun `winnow select` on these samples"
        )
    w = np.asarray(w, dtype=np.float64)  # float64 first: a float32 cast would turn 1e39 into inf silently
    # null (NaN) weighs 0; nan_to_num's default also clamped inf to 3.4e38, which trained to NaN (issue 24)
    bad = np.isinf(w) | (np.abs(np.nan_to_num(w)) > np.finfo(np.float32).max)
    if not allow_null:
        bad |= np.isnan(w)
    if bad.any():
        raise UserError(f"{where}: token weight {w[bad][0]} is not a finite float32; fix or drop this row")
    w = np.nan_to_num(w, nan=0.0).astype(np.float32)
    if (w < 0).any():
        raise UserError(f"{where}: negative token weights are not supported (min {float(w.min()):.3g})")
    return w
