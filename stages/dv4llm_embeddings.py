"""DV4LLM's embeddings on disk, so that each torchrun rank holds only its own candidates (issue 29 item 3).

* **Candidates** are the samples that are not targets, numbered in samples order, shard by shard
  (:class:`Layout`: one boolean mask per samples shard, 1 byte a sample). Rank ``r`` of ``W`` solves
  candidates ``[r·N/W, (r+1)·N/W)`` (:func:`winnow.core.collective.split`); one process is rank 0 of 1,
  through the same code.
* **One file per solve**: ``scores/dv4llm/.embeddings/embeddings.npy``, float32 ``(targets + N, dim)``,
  targets first. Rank 0 creates it as ``.embeddings.npy.tmp-<pid>`` (the name ``RunDir.tidy`` removes
  when that writer dies), every rank writes its own rows with ``pwrite``, and rank 0 renames it into
  place and records its key (the digests of the tables read and the embedding parameters) in
  ``embeddings.json``; a later solve with the same key (another ``budget``, ``eps_rel``, ``tol``) reads it
  again instead of re-embedding. Ranks on several machines need the run on a shared file system, as
  they already do for its shards.
* **Reading**: :class:`NpyRows` reads row ranges with ``pread`` into small chunks. A ``np.memmap`` would
  do the same I/O, but every page it touches counts in the process's resident memory (VmHWM) until the
  kernel evicts it: at 10M candidates over 2 ranks that is 5 GB a rank of file pages
  (benchmarks/RESULTS.md, "DV4LLM across ranks").
* **The same embeddings at any world size**, bit for bit: TF-IDF + SVD is fitted on rank 0 on every
  target plus a seeded sample of candidates drawn by global index (:func:`fit_indices`: the same
  sample at any world size), its arrays (vocabulary, IDF, components) are broadcast, and each rank
  transforms its own texts; a text's embedding does not depend on its batch
  (:class:`~winnow.stages.text_embeddings.TfidfSvd`). When every candidate is in the fit (up to
  ``fit_docs`` texts, 200k by default) rank 0 embeds them all from the fit itself, exactly as one
  process always did. Model-encoder embeddings (``minilm``, a model directory) are computed on rank 0
  for every text (their length-sorted batches would otherwise change with the split); ``signals:``
  embeddings are read by each rank for its rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.core import collective
from winnow.core.store import RunDir, atomic_write_json, fsync_dir, stable_hash
from winnow.stages import stage_io as io

FILE = "embeddings.npy"


@dataclass
class Layout:
    """Where the candidates are: per samples shard (``parts``), a mask of its candidate rows and the
    index of its first candidate; ``n`` candidates in all."""

    parts: list[int]
    masks: list[np.ndarray]
    starts: list[int]
    n: int

    def __post_init__(self) -> None:
        self._index = {part: i for i, part in enumerate(self.parts)}

    def where(self, part: int) -> tuple[np.ndarray, int]:
        """Shard ``part``'s candidate mask and the index of its first candidate."""
        i = self._index[part]
        return self.masks[i], self.starts[i]

    def slices(self, lo: int, hi: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(part, first candidate index, row positions in the shard)`` for candidates ``lo..hi``."""
        for part, mask, start in zip(self.parts, self.masks, self.starts, strict=True):
            pos = np.flatnonzero(mask)
            a, b = max(lo, start), min(hi, start + len(pos))
            if a < b:
                yield part, a, pos[a - start : b - start]


def layout(run: RunDir, parts: list[int], targets: set[str]) -> Layout:
    """One read of the ``sample_id`` column, shard by shard: which rows are candidates."""
    samples, value_set = run.table(io.SAMPLES), pa.array(sorted(targets), pa.string())
    masks, starts, n = [], [], 0
    for part in parts:
        ids = samples.read_part(part, columns=["sample_id"]).column("sample_id")
        mask = np.invert(pc.is_in(ids, value_set=value_set).to_numpy(zero_copy_only=False))
        masks.append(mask)
        starts.append(n)
        n += int(mask.sum())
    return Layout(parts, masks, starts, n)


class NpyRows:
    """Rows ``[lo, hi)`` of a 2-d C-order .npy file, read with ``pread`` as they are sliced (see the
    module docstring for why not a memmap); ``shape``, ``ndim``, ``dtype`` as an array's."""

    def __init__(self, path: Path, lo: int = 0, hi: int | None = None) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            self.header = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-d C-order array, got shape {shape}")
        hi = shape[0] if hi is None else hi
        self.lo, self.dtype, self.d = lo, np.dtype(dtype), int(shape[1])
        self.shape, self.ndim = (hi - lo, self.d), 2
        self.row_bytes = self.d * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``a..b`` of this range (clipped to it), a fresh array."""
        a, b = max(0, a), min(b, self.shape[0])
        n = max(0, b - a)
        raw = os.pread(self.fd, n * self.row_bytes, self.header + (self.lo + a) * self.row_bytes)
        if len(raw) != n * self.row_bytes:
            raise OSError(f"short read: {len(raw)} of {n * self.row_bytes} bytes")
        return np.frombuffer(raw, self.dtype).reshape(n, self.d).copy()

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            assert step == 1, "row ranges only"
            return self.read(a, b)
        idx = np.asarray(key)
        return np.concatenate([self.read(int(i), int(i) + 1) for i in idx]) if idx.size else self.read(0, 0)

    def close(self) -> None:
        os.close(self.fd)


def write_rows(path: Path, start: int, rows: np.ndarray, sync: bool = True) -> None:
    """Write float32 ``rows`` at row ``start`` of the .npy at ``path`` (``pwrite``; the file exists);
    ``sync=False`` leaves the fsync to the caller (:func:`sync_file`, once for many pieces)."""
    head = NpyRows(path, 0, 0)
    head.close()
    data = np.ascontiguousarray(rows, dtype=head.dtype)
    if data.shape[1:] != (head.d,):
        raise ValueError(f"rows of width {data.shape[1:]} for a file of width {head.d}")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data.tobytes(), head.header + start * head.row_bytes)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder(run: RunDir) -> Path:
    return run.table("scores/dv4llm").dir / ".embeddings"


def _reusable(path: Path, key: str) -> bool:
    try:
        import json

        return path.is_file() and json.loads(path.with_suffix(".json").read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure(run: RunDir, key_obj: Any, n_rows: int, first: Any, own_rows: Any) -> Path:
    """The embeddings file for this solve, written by every rank together unless one with the same key
    is there (collective).

    ``first()`` runs on rank 0 only: ``(dim, rows rank 0 writes: [(start row, array)], state)``;
    ``own_rows(state, rank, world)`` runs on every rank unless rank 0 wrote every row, and yields the
    ``(start row, array)`` pieces of that rank's candidates (``state`` is rank 0's, None elsewhere: it
    broadcasts what the other ranks need from it first).
    """
    rank, world = collective.rank_world()
    path, key = folder(run) / FILE, stable_hash(key_obj)
    if collective.broadcast_array(np.array([_reusable(path, key)]) if rank == 0 else None)[0]:
        return path
    head = None
    if rank == 0:
        dim, pieces, state = first()
        covered = sum(len(a) for _, a in pieces) == n_rows
        head = np.array([dim, covered, os.getpid()], np.int64)
    dim, covered, pid0 = (int(v) for v in collective.broadcast_array(head))
    tmp = path.parent / f".{FILE}.tmp-{pid0}"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)  # no key names a file being replaced
        created = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))
        del created  # only the header and the (sparse) size: rows go in with pwrite
        for start, rows in pieces:
            write_rows(tmp, start, rows, sync=False)
        sync_file(tmp)
        del pieces
    collective.barrier()
    if not covered:
        for start, rows in own_rows(state if rank == 0 else None, rank, world):
            write_rows(tmp, start, rows, sync=False)
        sync_file(tmp)  # this rank's rows on disk before rank 0 renames the file
        collective.barrier()
    if rank == 0:
        os.replace(tmp, path)
        fsync_dir(path.parent)
        atomic_write_json(path.with_suffix(".json"), {"key": key, "rows": n_rows, "dim": dim})
    collective.barrier()
    return path
