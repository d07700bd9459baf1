"""What the loop logs: ``metrics.jsonl`` and the per-step memory and MFU figures."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def mfu(
    lm: Any, device: torch.device, world: int, tokens: float, rows: float, len_sq: float, dt: float
) -> dict:
    """GPU only: the shared convention of :mod:`winnow.trainer.mfu` over every rank's work."""
    if device.type != "cuda":
        return {}
    from winnow.trainer.mfu import mfu as ratio
    from winnow.trainer.mfu import step_flops

    return {"mfu": round(ratio(step_flops(lm, tokens, rows, len_sq), dt, world), 4)}


class Metrics:
    """``metrics.jsonl``: appended by rank 0; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, main: bool, tracker: Any = None):
        self.path, self.main, self.tracker = path, main, tracker  # tracker: trainer.trackers (rank 0)

    def truncate_after(self, step: int) -> None:
        if not (self.main and self.path.exists()):
            return
        from winnow.core.store import atomic_write_bytes

        keep = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in keep).encode())

    def write(self, rec: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tracker is not None:  # a copy: the JSONL line above is the source of truth
                from winnow.trainer.trackers import scalars

                self.tracker.log(rec["step"], scalars(rec))

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
