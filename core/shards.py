"""The one shard loop of every step (ingest, model passes, scoring stages, selection).

A step's unit of work is one samples shard: each of its output tables gets a shard with the same
part number and a commit record holding the step's fingerprint, the digests of the inputs it was
computed from, and that shard's counts. :class:`ShardLoop` owns what every step used to spell out
on its own:

* **skip**: a shard whose records (in every output table) carry the same fingerprint and inputs is
  fresh; it is not recomputed, and its counts are read back from its record, so a step's totals
  cover every shard however many were redone (a rerun that skips everything reports the same
  ``counts`` as the run that computed them);
* **commit**: write every output table of a shard, then call the fault hook
  (``WINNOW_FAULT_KILL_AFTER_SHARDS``, :func:`winnow.core.store.shard_done`) once per shard;
* **rank split**: :func:`assign_by_tokens` gives pending shards to ranks longest first;
* **counts**: :meth:`ShardLoop.summary` is the ``shards`` block of the manifest entry.

:func:`step_entry` builds the manifest entry every step records, in one shape: ``step``,
``config``, ``fingerprint``, ``outputs``, ``shards: {total, computed, skipped, by_rank}``,
``counts``, ``wall_s``, ``versions`` (plus step-specific fields), under the key its registry entry
gives (``ingest``, ``model_pass:<alias>``, ``stage:<name>``, ``select:<name>``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from winnow.core.store import Table, shard_done, versions


def assign_by_tokens(tokens: dict[int, int], world: int) -> list[list[int]]:
    """Longest-processing-time-first assignment of shards to ranks (deterministic); each list sorted."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for part in sorted(tokens, key=lambda p: (-tokens[p], p)):
        r = min(range(world), key=lambda i: (loads[i], i))
        out[r].append(part)
        loads[r] += tokens[part]
    return [sorted(x) for x in out]


def rank_parts(run: Any, parts: Sequence[int], d: Any) -> list[int]:
    """This rank's share of ``parts`` (samples shards), by :func:`assign_by_tokens` on their row counts
    from the samples commit records: every rank computes the same split without talking to the others,
    over every shard, fresh or not (a fresh one is then skipped by its rank)."""
    if d.world == 1:
        return list(parts)
    rows = {r.part: r.rows for r in run.table("samples").records()}
    return assign_by_tokens({p: rows.get(p, 0) for p in parts}, d.world)[d.rank]


def shards_block(total: int, computed: int, skipped: int, by_rank: list[int] | None = None) -> dict[str, Any]:
    """The manifest's ``shards`` block: shards this step covers, computed now, skipped as fresh."""
    return {"total": total, "computed": computed, "skipped": skipped, "by_rank": by_rank or [computed]}


@dataclass
class Computed:
    """What ``compute`` returns for one shard: one table per output, its counts, extra record fields."""

    tables: Sequence[pa.Table]
    counts: Mapping[str, int] | None = None
    extra: Mapping[str, Any] | None = None


@dataclass
class ShardLoop:
    """Skip / compute / commit over the shards of one step with the given output tables."""

    outputs: list[Table]
    fingerprint: str
    total: int
    extra: dict[str, Any] = field(default_factory=dict)  # recorded on every committed shard
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def fresh(self, part: int, inputs: Mapping[str, str] | None = None) -> bool:
        want = dict(inputs or {})
        for out in self.outputs:
            rec = out.record(part)
            if rec is None or rec.fingerprint != self.fingerprint or rec.inputs != want:
                return False
        return True

    def skip(self, part: int) -> None:
        """Count ``part`` as fresh; its counts come back from its commit record."""
        self.skipped.append(part)
        rec = self.outputs[0].record(part)
        if rec is not None:
            self.counts.update(rec.extra.get("counts", {}))

    def skip_if_fresh(self, part: int, inputs: Mapping[str, str] | None = None) -> bool:
        if not self.fresh(part, inputs):
            return False
        self.skip(part)
        return True

    def commit(
        self,
        part: int,
        tables: pa.Table | Sequence[pa.Table],
        *,
        inputs: Mapping[str, str] | None = None,
        counts: Mapping[str, int] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one shard of every output table, then run the fault hook once."""
        tables = [tables] if isinstance(tables, pa.Table) else list(tables)
        if len(tables) != len(self.outputs):
            raise ValueError(f"{len(tables)} tables for {len(self.outputs)} outputs")
        record = {**self.extra, **(extra or {})}
        if counts:
            record["counts"] = dict(counts)
        for out, table in zip(self.outputs, tables, strict=True):
            out.write(part, table, fingerprint=self.fingerprint, inputs=dict(inputs or {}), extra=record)
        self.computed.append(part)
        self.counts.update(counts or {})
        shard_done()

    def run(
        self,
        work: Iterable[tuple[int, Any]],
        compute: Callable[[int, Any], Computed],
        *,
        inputs: Callable[[int], Mapping[str, str]] | None = None,
        on_skip: Callable[[int], None] | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> ShardLoop:
        """For each ``(part, item)``: skip it when fresh, else ``compute(part, item)`` and commit."""
        for part, item in work:
            inp = inputs(part) if inputs is not None else None
            if self.skip_if_fresh(part, inp):
                if on_skip is not None:
                    on_skip(part)
            else:
                res = compute(part, item)
                self.commit(part, res.tables, inputs=inp, counts=res.counts, extra=res.extra)
            if on_done is not None:
                on_done(part)
        return self

    def run_parts(
        self,
        parts: Sequence[int],
        compute: Callable[[int, Any], Computed],
        *,
        inputs: Callable[[int], Mapping[str, str]] | Mapping[str, str],
        scan: Callable[[], Any] | None = None,
        force: bool = False,
    ) -> tuple[bool, Any]:
        """A stage's shards, with a scan phase for global statistics; ``(computed any, scan state)``.

        Per-shard inputs (``inputs`` a function of the part, no ``scan``): each shard is skipped when
        fresh, else ``compute(part, None)`` is committed. Whole-table inputs (a mapping) with a ``scan``:
        the statistics span every shard, so either all shards are fresh (nothing is read) or ``scan()``
        runs once and every shard is recomputed with its result (``force``: the caller decided that
        some shard, maybe another rank's, is stale). The scan state is closed at the end when it has a
        ``close`` (a spill file).
        """
        if scan is None:
            per_part = inputs if callable(inputs) else (lambda part: inputs)
            self.run(((p, None) for p in parts), compute, inputs=per_part)
            return bool(self.computed), None
        assert not callable(inputs), "a scan phase needs whole-table inputs"
        if not force and all(self.fresh(p, inputs) for p in parts):
            return False, None
        state = scan()
        try:
            for part in parts:
                res = compute(part, state)
                self.commit(part, res.tables, inputs=inputs, counts=res.counts, extra=res.extra)
        finally:
            getattr(state, "close", lambda: None)()
        return True, state

    def summary(self, by_rank: list[int] | None = None) -> dict[str, Any]:
        skipped = self.total - len(self.computed)  # shards not rewritten were fresh
        return shards_block(self.total, len(self.computed), skipped, by_rank)


def step_entry(
    step: str,
    *,
    config: dict[str, Any],
    fingerprint: str,
    outputs: list[str],
    shards: dict[str, Any],
    counts: dict[str, Any],
    started: float,
    **fields: Any,
) -> dict[str, Any]:
    """A step's manifest entry, in the shape every step shares (step-specific ``fields`` after)."""
    return {
        "step": step,
        "config": config,
        "fingerprint": fingerprint,
        "outputs": outputs,
        "shards": shards,
        "counts": counts,
        **fields,
        "wall_s": round(time.time() - started, 3),
        "versions": versions(),
    }
