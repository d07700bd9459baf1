"""Deduplication by hash-range partitions on disk (core/dedup.py) and the row ranges ingest ranks read
(core/readers.py): checked against a dict over the whole input and against reading every row."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.core import dedup
from winnow.core.readers import count_rows, iter_rows


def _brute_force(ids: list[str]) -> dict[int, int]:
    """position -> first position of the same id, for every repeated occurrence (the old global dict)."""
    first: dict[str, int] = {}
    out = {}
    for pos, sid in enumerate(ids):
        if sid in first:
            out[pos] = first[sid]
        else:
            first[sid] = pos
    return out


@pytest.mark.parametrize("world,n,partition_rows", [(1, 500, 1 << 22), (2, 900, 64), (3, 1000, 100)])
def test_partitions_find_the_first_occurrence_of_every_id(tmp_path, monkeypatch, world, n, partition_rows):
    monkeypatch.setattr(dedup, "PARTITION_ROWS", partition_rows)
    monkeypatch.setattr(dedup, "FLUSH_ROWS", 37)  # several appends per partition file
    rng = np.random.default_rng(world)
    pool = [f"{int(x):016x}" for x in rng.integers(0, 2**64, size=n // 3, dtype=np.uint64)]
    ids = [pool[i] for i in rng.integers(0, len(pool), size=n)]  # ~2 of every 3 rows repeat an id
    parts = dedup.n_partitions(n, world)
    assert parts == max(world, -(-n // partition_rows))
    bounds = [n * r // world for r in range(world + 1)]
    for rank in range(world):  # each rank spills its own contiguous range
        spill = dedup.Spill(tmp_path, rank, parts)
        for pos in range(bounds[rank], bounds[rank + 1]):
            spill.add(ids[pos], pos)
        spill.flush()
    for rank in range(world):
        dedup.resolve(tmp_path, world, rank, parts)
    lookup = dedup.Lookup(tmp_path, parts)
    want = _brute_force(ids)
    assert lookup.range(0, n) == want and len(want) > n // 2
    assert lookup.range(100, 200) == {p: f for p, f in want.items() if 100 <= p < 200}
    keys = np.array([int(s, 16) for s in ids], np.uint64)
    got = dedup.partition_of(keys, parts)
    assert got.min() >= 0 and got.max() < parts
    # a range partition: a larger key never lands in a smaller partition
    order = np.argsort(keys)
    assert np.all(np.diff(got[order]) >= 0)


def test_row_ranges_read_what_a_full_read_yields(tmp_path):
    lines = [json.dumps({"q": i}) for i in range(30)]
    lines[4] = "{bad"
    lines[9] = ""
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    table = pa.table({"q": list(range(10_000))})
    parquet = tmp_path / "b.parquet"
    pq.write_table(table, parquet, row_group_size=3000)  # several record batches
    csv = tmp_path / "c.csv"
    csv.write_text("q,a\n" + "".join(f"{i},x{i}\n" for i in range(25)))
    for path, starts in (
        (jsonl, (0, 1, 4, 29, 30)),
        (parquet, (0, 4095, 4096, 5000, 9999)),
        (csv, (0, 7, 25)),
    ):
        full = list(iter_rows(path, "s"))
        assert count_rows(path) == len(full)
        for start in starts:
            got = list(iter_rows(path, "s", start=start))
            assert [(r.row, r.record, r.reason) for r in got] == [
                (r.row, r.record, r.reason) for r in full[start:]
            ]
