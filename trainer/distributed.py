"""torchrun plumbing: process group, the DDP/FSDP2 wrapper, and rank-0-only writes.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the group uses NCCL on CUDA and gloo on CPU (gloo with two CPU
ranks starts in ~7 s here). DDP is the default; ``fsdp=true`` applies FSDP2's ``fully_shard`` to every
decoder layer and then to the whole model (tied embeddings share the root's unit, so they stay tied).
Both average gradients over ranks; the loop multiplies by the world size before dividing by the step's
``Σ w``, so the update equals one process running every micro-batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CREATED = {"group": False}  # whether setup() made the process group (then teardown() destroys it)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":  # else every rank's "cuda" (and its Triton launches) would mean GPU 0
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        _CREATED["group"] = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from winnow.trainer.loss import unwrap

    body = unwrap(model).base_model
    layers = getattr(body, "layers", None)
    return list(layers) if layers is not None else []


def wrap(module: torch.nn.Module, d: Dist, fsdp: bool, device: torch.device) -> torch.nn.Module:
    """``module`` (a :class:`WeightedLMLoss`) under DDP or FSDP2; itself in a single process."""
    if d.world == 1:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(module.model):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = (
        [torch.cuda.current_device() if device.index is None else device.index]
        if device.type == "cuda"
        else None
    )
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def no_sync(wrapped: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce on every micro-batch of a step but the last (DDP and FSDP2)."""
    if last:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def resync():
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return resync()
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Destroy the group only if :func:`setup` created it: a group an earlier step of the process made
    (``winnow run``, Token Cleaning's rounds) serves the steps after training too, and is destroyed at the
    process's exit (:mod:`winnow.core.dist`)."""
    if dist.is_initialized() and _CREATED["group"]:
        dist.destroy_process_group()
        _CREATED["group"] = False
