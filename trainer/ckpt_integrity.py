"""Checkpoint integrity: a checksum file written last, verified before a resume (issue 24).

A checkpoint folder ``step-NNNNNNNN/`` gets ``checksums.json`` (sha256 and size of every other file,
``step``) as the last file written before the folder is renamed into place, as a run's shards get their
commit record last. On resume every checkpoint is checked newest first; one whose files differ (a flipped
byte in ``state.pt`` resumed and ended at eval_loss 6.15 instead of 1.32), are missing or truncated,
whose ``trainer_state.json`` is not JSON or names another step, is reported by name on stderr and removed,
and the newest good one is used. A folder without a checksum file can only come from a winnow that wrote
none (a save renames its folder into place once whole): it is skipped with a warning but not deleted. Leftovers of killed saves
(``checkpoints/.tmp-step-*``, ``OUT/.final-*``) are removed (the caller holds the ``--out`` lock, so no
live writer owns them), and ``keep_checkpoints`` is applied again, since a kill between a save and its
prune leaves one checkpoint too many.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

SUMS = "checksums.json"
PREFIX = "step-"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops (exit 1) and saves nothing as final."""

    winnow_exit = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)


def write_sums(folder: Path, step: int) -> None:
    """``checksums.json`` over every file of ``folder``: call it after every other file is written."""
    files = {p.relative_to(folder).as_posix(): [_sha256(p), p.stat().st_size] for p in _files(folder)}
    data = json.dumps({"step": step, "files": files}, indent=1, sort_keys=True).encode()
    with open(folder / SUMS, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def problem(folder: Path, step: int) -> str | None:
    """Why ``folder`` (checkpoint of ``step``) cannot be resumed from, or None when it is intact."""
    try:
        return _problem(folder, step)
    except OSError as e:  # another rank removing it, or a file that cannot be read
        return f"unreadable ({e.strerror or e})"


def _problem(folder: Path, step: int) -> str | None:
    try:
        sums = json.loads((folder / SUMS).read_text())
        files = sums["files"]
    except FileNotFoundError:
        return f"no {SUMS} (a save that did not finish, or a checkpoint of an older winnow)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{SUMS} is unreadable"
    if sums.get("step") != step:
        return f"{SUMS} names step {sums.get('step')}, the folder step {step}"
    have = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for rel in sorted(set(files) - set(have)):
        return f"{rel} is missing"
    for rel in sorted(set(have) - set(files)):
        return f"{rel} was added after the save"
    for rel, (digest, size) in sorted(files.items()):
        if have[rel].stat().st_size != size:
            return f"{rel} has {have[rel].stat().st_size} bytes, {size} when saved (truncated or edited)"
        if _sha256(have[rel]) != digest:
            return f"{rel} differs from its checksum (a changed byte)"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is not JSON"
    if not isinstance(state, dict) or state.get("step") != step:
        return "trainer_state.json names another step"
    return None


def step_folders(root: Path) -> dict[int, Path]:
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            tail = p.name[len(PREFIX) :]
            if p.is_dir() and p.name.startswith(PREFIX) and tail.isdigit():
                out[int(tail)] = p
    return out


def good_steps(root: Path, main: bool) -> list[int]:
    """Steps of the intact checkpoints under ``root``, oldest first; bad ones are reported and (rank 0)
    removed, so a later save of the same step starts clean and pruning counts only good ones."""
    good = []
    for step, folder in sorted(step_folders(root).items()):
        why = problem(folder, step)
        if why is None:
            good.append(step)
            continue
        if main and not (folder / SUMS).exists():  # renamed into place only once whole: an older winnow's
            print(
                f"warning: checkpoint {folder} has no {SUMS} and cannot be verified: skipped, kept",
                file=sys.stderr,
            )
        elif main:
            print(
                f"warning: checkpoint {folder} is damaged ({why}): removed, resuming from an earlier one",
                file=sys.stderr,
            )
            shutil.rmtree(folder, ignore_errors=True)
    return good


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed saves left: ``checkpoints/.tmp-step-*`` and ``.final-*`` (caller holds the lock)."""
    gone = [*out.glob(".final-*"), *(out / "checkpoints").glob(".tmp-*")]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


def best_step(evals: dict[int, Any]) -> int | None:
    scored = {k: v for k, v in evals.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return min(scored, key=scored.get) if scored else None


def clip_checked(params, max_norm: float, step: int, loss_sum: float, scaled: bool) -> float:
    """Clip the gradients to ``max_norm`` (0: no clipping) and return their norm as a float, after
    :func:`check_finite`, i.e. before the optimizer can apply a non-finite update. Under fp16's gradient
    scaler an overflowing step is skipped by the scaler itself, so only the loss is checked."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    value = float(getattr(norm, "full_tensor", lambda: norm)())  # FSDP2: a DTensor
    check_finite(step, loss_sum, None if scaled else value)
    return value


def check_finite(step: int, loss: float, grad_norm: float | None) -> None:
    """Stop before the optimizer applies a non-finite update (nothing of this step is saved)."""
    bad = [
        f"{k}={v}"
        for k, v in (("loss", loss), ("grad_norm", grad_norm))
        if v is not None and not math.isfinite(v)
    ]
    if bad:
        raise TrainingDiverged(
            f"training diverged at step {step + 1} ({', '.join(bad)}): stopped; the last good checkpoint is "
            "kept and no final model is saved. Lower lr, set max_grad_norm, or check the token weights"
        )


def refuse_nonfinite(weights: dict, step: int) -> None:
    """TrainingDiverged when a weight is NaN or infinite (checked before a checkpoint is written)."""
    import torch

    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingDiverged(
                f"training diverged by step {step}: weight {name} is not finite; stopped, the last good "
                "checkpoint is kept and no final model is saved. Lower lr or set max_grad_norm"
            )
