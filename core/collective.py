"""Collectives that are the identity in one process, so a step runs the same code at any world size.

A step whose result must agree across torchrun ranks (DV4LLM's transport solve) calls these rather than
``torch.distributed``: with no process group (one process, or ``WORLD_SIZE`` 1) each returns its input
as it is, so the single-process path is the distributed code with world size 1, not a second path that
can drift. :func:`joined` joins the torchrun group for a block (gloo: these tensors live on the CPU, and
gloo also runs on a GPU machine) and leaves it afterwards if it created it; inside a group that someone
else created (the trainer, a model pass) it reuses that group.

Every function is collective: every rank of the group must call it, in the same order. Arrays cross
ranks as raw tensors (a header of shape and dtype, then the data), never pickled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

_DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_]
# a gloo group over every rank, made by joined() when the default group is not gloo (NCCL on GPUs):
# these collectives move CPU tensors
_GLOO: dict[str, Any] = {"group": None}


def _dist() -> Any:
    """``torch.distributed`` when a group with more than one rank is up, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the joined group; ``(0, 1)`` in one process."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def group() -> Any:
    """The joined group (``dist.group.WORLD``) for APIs that take one; None in one process."""
    dist = _dist()
    return (_GLOO["group"] or dist.group.WORLD) if dist else None


@contextmanager
def joined() -> Iterator[tuple[int, int]]:
    """Join the torchrun group (gloo) for the block when ``WORLD_SIZE`` > 1; yields ``(rank, world)``.

    The group is left (after a barrier, so no rank leaves while another still waits on it) only if this
    block created it; inside a non-gloo group (NCCL) a gloo group over the same ranks serves the block.
    """
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            created = True
        elif dist.get_backend() != "gloo":
            _GLOO["group"] = dist.new_group(backend="gloo")
    try:
        yield rank_world()
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            dist.barrier(group=_GLOO["group"])
            if _GLOO["group"] is not None:
                dist.destroy_process_group(_GLOO["group"])
                _GLOO["group"] = None
            if created:
                dist.destroy_process_group()


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` items: sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier(group=_GLOO["group"])


def all_reduce(t: Any, op: str = "sum") -> Any:
    """``t`` (a CPU tensor) reduced in place over the ranks (``"sum"`` or ``"max"``); ``t`` itself."""
    dist = _dist()
    if dist:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=_GLOO["group"])
    return t


def all_gather_rows(t: Any) -> Any:
    """Every rank's ``t`` (a CPU tensor, any number of rows) concatenated in rank order."""
    dist = _dist()
    if not dist:
        return t
    import torch

    sizes = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    sizes[dist.get_rank()] = t.shape[0]
    dist.all_reduce(sizes, group=_GLOO["group"])
    top = int(sizes.max())
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype)  # gloo gathers equal shapes only
    padded[: t.shape[0]] = t
    got = [torch.empty_like(padded) for _ in range(len(sizes))]
    dist.all_gather(got, padded, group=_GLOO["group"])
    return torch.cat([g[: int(n)] for g, n in zip(got, sizes, strict=True)])


def broadcast_array(a: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Rank ``src``'s array on every rank (other ranks pass None); in one process ``a`` itself."""
    dist = _dist()
    if not dist:
        assert a is not None
        return a
    import torch

    head = torch.zeros(10, dtype=torch.int64)  # dtype code, ndim, up to 8 dims
    if dist.get_rank() == src:
        assert a is not None and a.ndim <= 8
        a = np.array(a, order="C")  # a writable copy: torch.from_numpy refuses read-only buffers
        head[0], head[1] = _DTYPES.index(a.dtype.type), a.ndim
        head[2 : 2 + a.ndim] = torch.tensor(a.shape)
    dist.broadcast(head, src, group=_GLOO["group"])
    dtype, shape = _DTYPES[int(head[0])], [int(s) for s in head[2 : 2 + int(head[1])]]
    flat = torch.from_numpy(a.reshape(-1).view(np.uint8)) if dist.get_rank() == src else None
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = flat if flat is not None else torch.empty(nbytes, dtype=torch.uint8)
    dist.broadcast(buf, src, group=_GLOO["group"])
    return buf.numpy().view(dtype).reshape(shape)


def broadcast_strings(items: list[str] | None, src: int = 0) -> list[str]:
    """Rank ``src``'s list of strings (none holding a NUL) on every rank."""
    if not _dist():
        assert items is not None
        return items
    data = None if items is None else np.frombuffer("\0".join(items).encode(), np.uint8).copy()
    got = broadcast_array(data, src)
    return got.tobytes().decode().split("\0") if got.size else []
