"""The domain of every `winnow train` value that the types alone do not bound (issue 24).

``lr=inf``, ``max_grad_norm=nan`` or ``weight_decay=inf`` trained to NaN and exited 0 with non-finite
weights saved; ``seed=-1``, a 20-digit seed, ``threads=100000`` or ``device=meta`` gave tracebacks. Each is
a ValueError here (exit 2 through :func:`winnow.pipeline.params.build_params`) naming the key, the value
and the range. The ranges are wide on purpose: they refuse what cannot train, not what is unusual.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

SEED_MAX = 2**32 - 1  # numpy's and torch's seeders both take [0, 2^32)
THREADS_MAX = 1024
LR_MAX = 10.0  # AdamW's step is ~lr per parameter: beyond this every update overshoots
WEIGHT_DECAY_MAX = 10.0
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def nonfinite_floats(obj: Any, prefix: str = "") -> list[str]:
    """``key=value`` of every NaN or infinite float field of a (nested) parameter dataclass."""
    bad = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            bad += nonfinite_floats(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{prefix}{f.name}={v}")
    return bad


def check_domains(p: Any) -> None:
    """ValueError naming the first value of ``p`` (a TrainParams) outside its domain."""
    bad = nonfinite_floats(p)
    if bad:
        raise ValueError(f"{bad[0]} is not a finite number")
    ranges = {
        "lr": (p.lr, 0.0, LR_MAX, "(0, 10]"),
        "weight_decay": (p.weight_decay, 0.0, WEIGHT_DECAY_MAX, "[0, 10]"),
        "seed": (p.seed, 0, SEED_MAX, f"[0, {SEED_MAX}]"),
        "threads": (p.threads, 1, THREADS_MAX, f"[1, {THREADS_MAX}]"),
    }
    for key, (v, lo, hi, text) in ranges.items():
        if not lo <= v <= hi or (key == "lr" and v == 0):
            raise ValueError(f"{key}={v} is outside {text}")
    if not DEVICE_RE.fullmatch(p.device):
        raise ValueError(f"device={p.device!r}: use auto, cpu, cuda, cuda:N or mps")
