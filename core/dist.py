"""torch.distributed for every step: the torchrun process group and the few collectives steps share.

Every verb runs under ``torchrun --nproc_per_node N --no-python -- winnow <verb> ...`` (README,
"Scaling out"). A step that distributes runs in :func:`distributed` (a single process, or
``WORLD_SIZE`` 1, gets a trivial :class:`Dist` and never imports torch); under torchrun it joins the
process group (gloo on CPU, nccl on CUDA for a model pass), or reuses the one an earlier step of the same
process created (a recipe runs many steps in one process); it lasts until the process exits.

Global statistics are reduced by gathering per-rank partials and combining them the same way on every
rank (:meth:`Dist.gather`, :func:`gather_partials`): integers are summed exactly and float arrays are
concatenated in shard order before any arithmetic, so a result equals one process bit for bit. The
objects travel pickled through ``all_gather_object`` between the ranks of one job only (they never touch
a file or a user's input).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``local_*``: on this machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Nothing: the group outlives the step (:func:`init_distributed`); kept for the passes' callers."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 outside torchrun), without a process group."""
    return int(os.environ.get("RANK", "0"))


_EXIT = {"clean": True}  # False once a step raised: the exit handler then skips its barrier


def init_distributed(device_pref: str = "auto") -> Dist:
    """Join (or create) the torchrun process group; a single process gets a trivial :class:`Dist`.

    A group created here serves every later step of the process and is destroyed at its exit, after a
    barrier (:func:`_destroy`): destroying it after each step and creating another for the next one
    (a recipe) failed about one time in three here, the new group's gloo mesh connecting to the old
    one's closed ports ("Gloo connectFullMesh failed ... Connection refused"). Backend: nccl for a model
    pass on CUDA (``device_pref`` not ``cpu``), as before; ``cpu:gloo,cuda:nccl`` for a CPU step on a
    machine with CUDA (its objects go through gloo; a later training step's DDP gets nccl; not run on a
    GPU yet), gloo otherwise.
    """
    world = world_size()
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "gloo" if not cuda else ("cpu:gloo,cuda:nccl" if device_pref == "cpu" else "nccl")
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
    return Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def _destroy() -> None:
    """At exit: every rank reaches the barrier before any tears its connections down (without it a rank
    exiting first made another's gloo abort, SIGABRT, about one run in three with 3 ranks). After an
    error it does nothing: a barrier then could pair with another rank's pending collective."""
    import torch.distributed as dist

    if dist.is_initialized() and _EXIT["clean"]:
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def failing_marks_exit() -> Iterator[None]:
    """Around a step (the CLI's and the recipe's step runners): an error marks the exit unclean, so the
    exit handler skips its barrier and the other ranks are not left waiting in it."""
    try:
        yield
    except BaseException:
        _EXIT["clean"] = False
        raise


@contextmanager
def distributed(device_pref: str = "cpu") -> Iterator[Dist]:
    """The process group for one step (see :func:`init_distributed`); an error marks the exit unclean."""
    with failing_marks_exit():
        yield init_distributed(device_pref)


def gather_partials(obj: Any, d: Dist | None = None) -> list[Any]:
    """All-gather per-rank partials when distributed, ``[obj]`` otherwise (the caller combines them).

    ``d`` defaults to the torchrun group of this process (joined with gloo if no step joined it yet).
    """
    return (d or init_distributed("cpu")).gather(obj)


def split_even(n: int, world: int, rank: int) -> range:
    """Items ``[lo, hi)`` of ``n`` for ``rank``: contiguous blocks, sizes differing by at most one."""
    return range(n * rank // world, n * (rank + 1) // world)
