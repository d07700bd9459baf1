"""torch.distributed for every step: the torchrun process group and the few collectives steps share.

Every verb runs under ``torchrun --nproc_per_node N --no-python -- winnow <verb> ...`` (README,
"Scaling out"). A step that distributes runs in :func:`distributed` (a single process, or
``WORLD_SIZE`` 1, gets a trivial :class:`Dist` and never imports torch); under torchrun it joins the
process group (gloo on CPU, nccl on CUDA for a model pass), or reuses one its caller created. A CPU step
(ingest, stages, select) holds it for the step (:func:`distributed`); :func:`gather_partials` keeps
the group it creates until the process exits.

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
    created: bool = False

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
        """Destroy the group if this Dist created it, once every rank got here (a rank that tore its
        connections down first made another's gloo abort, SIGABRT, about one run in three with 3 ranks)."""
        if self.created:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            self.created = False


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 outside torchrun), without a process group."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_pref: str = "auto", keep: bool = False) -> Dist:
    """Join (or create) the torchrun process group; a single process gets a trivial :class:`Dist`.

    ``keep``: a group created here stays for the life of the process (destroyed at exit), and the
    returned Dist's ``close`` leaves it alone (:func:`gather_partials`, for code outside a step's
    :func:`distributed` block).
    """
    world = world_size()
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        use_nccl = device_pref != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        created = True
        if keep:
            atexit.register(_destroy)
    return Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        created=created and not keep,
    )


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # as Dist.close
        dist.destroy_process_group()


@contextmanager
def distributed(device_pref: str = "cpu") -> Iterator[Dist]:
    """The process group for one step: joined (or created) on entry; destroyed on a normal exit if
    created here, so the next step of a recipe (a model pass or training on GPUs) creates its own with
    the backend it needs (gloo here: ingest, stages and selections exchange Python objects only; a
    rendezvous again costs ~0.1 s). On an error the group is left to the process's exit: a barrier
    then could pair with another rank's pending collective."""
    d = init_distributed(device_pref)
    yield d
    d.close()


def gather_partials(obj: Any, d: Dist | None = None) -> list[Any]:
    """All-gather per-rank partials when distributed, ``[obj]`` otherwise (the caller combines them).

    ``d`` defaults to the torchrun group of this process (joined with gloo if no step joined it yet).
    """
    return (d or init_distributed("cpu", keep=True)).gather(obj)


def split_even(n: int, world: int, rank: int) -> range:
    """Items ``[lo, hi)`` of ``n`` for ``rank``: contiguous blocks, sizes differing by at most one."""
    return range(n * rank // world, n * (rank + 1) // world)
