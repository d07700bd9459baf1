"""Checkpoints under ``OUT/checkpoints/step-NNNNNNNN/``: written whole or not at all.

A checkpoint is built in a hidden temporary folder (weights as a loadable model directory, see
:mod:`winnow.trainer.hub_ckpt`; optimizer,
scheduler and RNG states in ``state.pt``; ``trainer_state.json`` with the step, the world size and the
evaluations so far), fsynced and renamed into place, so a run killed mid-write leaves either the
previous checkpoint or the new one. ``state.pt`` is loaded with ``torch.load(weights_only=True)``: it
holds only tensors and plain containers. The data cursor is the step number itself: the batch plan and
its per-epoch order are functions of the seed, so step ``k`` names exactly which micro-batches come next.

Weights and optimizer state are taken with ``torch.distributed.checkpoint.state_dict``'s full-state
helpers, which give the same flat, unsharded dictionaries for a plain module, DDP and FSDP2; every rank
takes part (FSDP2 all-gathers) and rank 0 writes. Resuming on another world size is allowed (the plan
is global) but not bitwise, and the loop says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from winnow.core.store import atomic_write_json, fsync_dir, fsync_tree
from winnow.trainer.ckpt_integrity import refuse_nonfinite, write_sums

PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file():
            out.append(int(p.name[len(PREFIX) :]))
    return sorted(out)


def _options(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights, with names of the wrapped model (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(module, options=_options())
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save(
    root: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    rank: int,
    extra: Any = None,
    hub: Any = None,
) -> Path | None:
    """Weights, optimizer, scheduler and RNG of ``step`` into ``root/step-N`` atomically (rank 0 writes);
    ``extra(folder)`` adds more state (e.g. ssToken's EMA history) before the folder is renamed in; ``hub`` (a :class:`~winnow.trainer.hub_ckpt.HubLayout`) makes the
    folder a model directory ``from_pretrained`` opens."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = full_model_state(module)
    refuse_nonfinite(weights, step)  # a diverged model is never saved as a checkpoint (nor as final)
    optim = get_optimizer_state_dict(module, optimizer, options=_options())
    if rank != 0:
        return None
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_folder(tmp, step, weights, optim, scheduler, meta, extra, hub)
    except BaseException:  # Ctrl-C (KeyboardInterrupt) or an error mid-save: only whole checkpoints remain
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an earlier attempt got this far before dying: same step, same content
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    return final


def _write_folder(
    tmp: Path, step: int, weights, optim, scheduler, meta: dict[str, Any], extra: Any, hub: Any
) -> None:
    from safetensors.torch import save_file

    from winnow.trainer.hub_ckpt import RESUME_FILE

    rest = hub.write(tmp, weights) if hub is not None else None
    if rest is None:  # no model to lay out (direct callers): the loss module's state as one file
        save_file(weights, str(tmp / "model.safetensors"))
    elif rest:
        save_file(rest, str(tmp / RESUME_FILE))
    if os.environ.get("WINNOW_FAULT_INTERRUPT_IN_SAVE"):  # tests: Ctrl-C while a checkpoint is half written
        os.kill(os.getpid(), signal.SIGINT)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
    atomic_write_json(tmp / "trainer_state.json", {"step": step, **meta})
    if extra is not None:
        extra(tmp)
    write_sums(tmp, step)  # last: a folder whose checksums match is a whole checkpoint
    fsync_tree(tmp)


def load(
    path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from winnow.trainer.hub_ckpt import read_weights

    weights = read_weights(path)
    set_model_state_dict(module, weights, options=_options(cpu_offload=False))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=_options(cpu_offload=False))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return json.loads((path / "trainer_state.json").read_text())


def prune(root: Path, keep_last: int, best_step: int | None) -> None:
    """Keep the newest ``keep_last`` checkpoints and the one with the best eval_loss."""
    steps = list_steps(root)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    if best_step is not None:
        keep.add(best_step)
    for s in steps:
        if s not in keep:
            shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for p in root.glob(".tmp-*"):  # leftovers of a killed writer
        shutil.rmtree(p, ignore_errors=True)
