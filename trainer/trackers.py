"""Experiment trackers (``--set report_to=tensorboard|wandb|trackio|none``) and plain progress lines.

``metrics.jsonl`` stays the source of truth: a tracker receives a copy of each record written there (its
numeric fields, at the record's step), from rank 0 only, so a tracker that fails or is absent loses
nothing. The trackers are optional extras, imported only when chosen; a missing one is refused before
``--out`` is touched, naming the pip package. wandb and trackio share one API (``init``/``log``/``finish``);
their tests use stand-in modules (no install, no network).

When stdout is not a terminal (a piped or batch run, where the rich bar never shows) the loop prints one
plain line every ``log_every`` steps and at the last: step/total, loss, tokens per second and the ETA from
the mean step time of this process.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from pathlib import Path
from typing import Any

from winnow.core.store import UserError

# report_to -> (module imported, pip package to install)
PACKAGES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


def check_available(kind: str) -> None:
    """UserError naming the pip package when ``report_to=kind`` cannot be imported."""
    if kind == "none":
        return
    module, package = PACKAGES[kind]
    top = "tensorboard" if kind == "tensorboard" else module  # torch ships the writer, not its backend
    if importlib.util.find_spec(top) is None:
        raise UserError(
            f"report_to={kind} needs the `{package}` package: pip install {package} (or report_to=none)"
        )


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a metrics record, without its step."""
    return {
        k: float(v)
        for k, v in rec.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class _WandbLike:
    """wandb and trackio: ``init(project, name, config)``, ``log(metrics, step=)``, ``finish()``."""

    def __init__(self, module: str, name: str, config: dict[str, Any], out: Path):
        self.mod = importlib.import_module(module)
        extra = {"dir": str(out)} if module == "wandb" else {}
        self.mod.init(project="winnow", name=name, config=config, **extra)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mod.log(values, step=step)

    def close(self) -> None:
        self.mod.finish()


class _TensorBoard:
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "runs"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, out: Path, name: str, config: dict[str, Any]) -> Any | None:
    """The tracker of ``report_to=kind`` (rank 0 calls this), or None for ``none``."""
    if kind == "none":
        return None
    check_available(kind)
    if kind == "tensorboard":
        return _TensorBoard(out)
    return _WandbLike(PACKAGES[kind][0], name, config, out)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class PlainLog:
    """One line per logged step for a stdout that is not a terminal."""

    def __init__(self, start: int, total: int):
        self.start, self.total, self.t0 = start, total, time.perf_counter()

    def line(self, rec: dict[str, Any]) -> str:
        done = rec["step"]
        per_step = (time.perf_counter() - self.t0) / max(done - self.start, 1)
        eta = _duration(per_step * (self.total - done))
        return f"step {done}/{self.total}  loss {rec['loss']:.4f}  tok/s {rec['tokens_per_s']:.0f}  eta {eta}"
