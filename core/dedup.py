"""Deduplication for ingest without a global dict: sample-id hashes partitioned by hash range, on disk.

A row whose messages another row already had is rejected as ``duplicate`` naming the first one
(``duplicate_of``, ``detail: same messages as SOURCE:ROW``). Ingest used to keep a dict of every kept
sample id (~160 B a sample, held by one process); here memory per rank is bounded whatever the pool size:

1. **Spill** (each rank, over its own row range): every convertible row's ``(key, pos)`` -- ``key`` the
   sample id's 64 bits, ``pos`` the row's position over all inputs in argument order -- is appended to
   the file of the hash range holding ``key``: ``keys-r<rank>-p<partition>.bin`` (16 bytes a row,
   buffered ``FLUSH_ROWS`` rows at a time).
2. **Resolve** (partition ``p`` by rank ``p % world``, after a barrier): read every rank's file of ``p``,
   sort by ``(key, pos)``; each row whose key occurred at an earlier position is a duplicate of the first
   occurrence. Write ``dups-p<partition>.bin``: ``(pos, first_pos)`` sorted by ``pos``, duplicates only.
   A partition holds at most about ``PARTITION_ROWS`` rows (the number of partitions grows with the
   pool), so this sort is the step's largest allocation: ~16 B x 4M = 64 MB plus the sort's copies.
3. **Look up** (each rank, per shard it builds): a binary search on each memory-mapped ``dups-p*.bin``
   for the shard's position range.

Why "an earlier occurrence" is enough: rows with the same sample id have the same messages, so they
render to the same tokens and are all kept or all rejected for the same reason; a later occurrence is a
``duplicate`` exactly when the first was kept, which ingest checks with the rendered row at hand. The
result is the same rows, column for column, as the one-process dict at any world size. The files live
in a hidden folder of the run (``.ingest-dedup-<table>``, on the storage every rank shares already),
cleared at the start of an ingest and removed at its end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

PARTITION_ROWS = 1 << 22  # rows per hash-range partition (the resolve sort's size)
FLUSH_ROWS = 1 << 16  # rows a rank buffers before appending to its partition files
_REC = np.dtype([("a", "<u8"), ("b", "<i8")])  # (key, pos) in keys-*, (pos, first_pos) in dups-*


def n_partitions(rows: int, world: int) -> int:
    """Partitions for ``rows`` input rows: at least one per rank, at most ``PARTITION_ROWS`` rows each."""
    return max(world, -(-rows // PARTITION_ROWS))


def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """The hash range of each 64-bit key: ``floor(key / 2^64 * parts)`` (top 24 bits, exact for parts < 2^24)."""
    return ((keys >> np.uint64(40)).astype(np.int64) * parts) >> 24


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class Spill:
    """One rank's ``(key, pos)`` records, appended to the file of each key's partition."""

    def __init__(self, folder: Path, rank: int, parts: int):
        self.folder, self.rank, self.parts = folder, rank, parts
        self.keys: list[int] = []
        self.pos: list[int] = []
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(parts):  # every file exists, so the resolver never mistakes "none" for "not yet"
            (folder / f"keys-r{rank}-p{p}.bin").touch()

    def add(self, sample_id: str, pos: int) -> None:
        self.keys.append(int(sample_id, 16))
        self.pos.append(pos)
        if len(self.keys) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        rec = np.empty(len(self.keys), _REC)
        rec["a"], rec["b"] = np.array(self.keys, np.uint64), np.array(self.pos, np.int64)
        where = partition_of(rec["a"], self.parts)
        for p in np.unique(where):
            with open(self.folder / f"keys-r{self.rank}-p{p}.bin", "ab") as f:
                rec[where == p].tofile(f)
        self.keys, self.pos = [], []


def resolve(folder: Path, world: int, rank: int, parts: int) -> None:
    """Write ``dups-p<p>.bin`` for each partition this rank owns (``p % world == rank``)."""
    for p in range(rank, parts, world):
        chunks = [np.fromfile(folder / f"keys-r{r}-p{p}.bin", _REC) for r in range(world)]
        rec = np.concatenate(chunks) if chunks else np.empty(0, _REC)
        order = np.lexsort((rec["b"], rec["a"]))
        key, pos = rec["a"][order], rec["b"][order]
        del rec, chunks, order
        starts = np.ones(len(key), bool)
        starts[1:] = key[1:] != key[:-1]
        first = pos[np.maximum.accumulate(np.where(starts, np.arange(len(key)), 0))]
        dup = ~starts
        out = np.empty(int(dup.sum()), _REC)
        out["a"], out["b"] = pos[dup], first[dup]
        out = out[np.argsort(out["a"], kind="stable")]
        tmp = folder / f".dups-p{p}.bin.tmp-{os.getpid()}"
        out.tofile(tmp)
        os.replace(tmp, folder / f"dups-p{p}.bin")


class Lookup:
    """``first_pos`` of the duplicate rows in a position range, from every partition's sorted file."""

    def __init__(self, folder: Path, parts: int):
        self.maps = []
        for p in range(parts):
            path = folder / f"dups-p{p}.bin"
            if path.stat().st_size:  # np.memmap refuses an empty file
                self.maps.append(np.memmap(path, _REC, mode="r"))

    def range(self, lo: int, hi: int) -> dict[int, int]:
        """``{pos: first_pos}`` for the duplicate rows with ``lo <= pos < hi``."""
        out: dict[int, int] = {}
        for m in self.maps:
            a, b = np.searchsorted(m["a"], [lo, hi])
            got = np.asarray(m[a:b])
            out.update(zip(got["a"].tolist(), got["b"].tolist(), strict=True))
        return out
