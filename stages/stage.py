"""A scoring stage, declared once: :class:`Stage` (what a stage module holds as ``STAGE``) and its runner.

One declaration names everything about a stage: its ``name`` and ``help``, its parameters (a
``kw_only`` dataclass), the tables it reads (``Ref`` patterns over the parameters, with the columns it
needs and the command that produces them) and writes (``scores/<name>``), the output columns other steps
rely on (``keep``+``reason``: a sample policy, ``token_keep``: a ``--tokens`` source), its card section,
its selection policy (:class:`~winnow.core.steps.Policy`, when its sample half is not plain ``keep``)
and its per-shard ``compute``. The registry's line (:meth:`Stage.spec`), the input check, the recorded
inputs and the shard loop all come from it, so nothing is said twice.

The shard loop is :meth:`winnow.core.shards.ShardLoop.run_parts`: a stage without ``scan`` is per-shard
(each shard records its own input shards and is skipped when they are unchanged); a stage with a
``scan`` needs global statistics first (EU-plane thresholds over simulated batches, a top-k across
the dataset, DV4LLM's optimal-transport solve): it records whole-table inputs, ``scan(ctx)`` runs once
when anything changed, then ``compute(ctx, part, state)`` writes every shard, and ``counts(state)``
gives the step's global counts.

A plugin is such a module outside winnow, named in the entry-point group ``winnow.stages``
(docs/CONTRACTS.md, "Adding a scoring stage").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from winnow.core.dist import Dist, distributed
from winnow.core.shards import Computed, rank_parts
from winnow.core.steps import Policy, Ref, StepSpec, TableDecl, _resolve
from winnow.core.store import RunDir, UserError
from winnow.stages import stage_io as io


@dataclass
class Ctx:
    """What a stage's phases see: the run, its parameters, the samples shards and the tables read
    (``tables``: table -> the columns declared for it)."""

    run: RunDir
    params: Any
    parts: list[int]
    tables: dict[str, list[str]]
    d: Dist = field(default_factory=Dist)  # torchrun: this rank (a scan may split its reads by it)

    @property
    def signals(self) -> dict[str, list[str]]:
        """``{alias: columns}`` of the ``signals/<alias>`` tables read, in declaration order."""
        return {t.split("/", 1)[1]: c for t, c in self.tables.items() if t.startswith("signals/")}

    def keys(self) -> list[tuple[str, str]]:
        return [(alias, c) for alias, cols in self.signals.items() for c in cols]

    def shard(self, part: int, sample_columns: list[str] | None = None) -> io.Shard:
        """Samples shard ``part`` with every declared signals column, padded (``stage_io.read_shard``)."""
        return io.read_shard(self.run, part, self.signals, sample_columns)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """A scoring stage (module attribute ``STAGE``; also its runnable step: ``name``, ``params``, ``run``)."""

    name: str
    help: str
    params: type
    code_version: str
    reads: tuple[TableDecl, ...]
    compute: Callable[[Ctx, int, Any], pa.Table | Computed]
    columns: tuple[str, ...] = ()
    scan: Callable[[Ctx], Any] | None = None
    counts: Callable[[Any], dict[str, Any]] | None = None
    check: Callable[[Ctx], None] | None = None
    card: Callable[[Any, Any], list[str]] | None = None
    policy: Policy | None = None
    # torchrun: a stage with a scan computes its shards split across ranks (the scan then runs on every
    # rank and must give each the same state, and compute(ctx, part, state) must not depend on the
    # order of parts); False: rank 0 scans and computes every shard while the others wait.
    shard_split: bool = False

    @property
    def writes(self) -> tuple[str, ...]:
        return (f"scores/{self.name}",)

    def spec(self, module: str) -> StepSpec:
        """The registry line of this stage, whose module (holding ``STAGE``) is ``module``."""
        return StepSpec(
            self.name,
            "stage",
            module,
            reads=self.reads,
            writes=self.writes,
            columns=self.columns,
            card=self.card,
            help=self.help,
            policy=self.policy,
        )

    def inputs(self, params: Any) -> dict[str, list[str]]:
        """Table -> columns read with these parameters (a table named twice: the union, in order)."""
        out: dict[str, list[str]] = {}
        for d in self.reads:
            got = _resolve((d,), params)
            cols = d.columns_for(params) if isinstance(d, Ref) else []
            for table in got:
                out[table] = list(dict.fromkeys([*out.get(table, []), *cols]))
        return out

    def run(self, run: RunDir, params: Any) -> dict[str, Any]:
        return run_stage(self, run, params)


def _check_tables(stage: Stage, run: RunDir, params: Any, parts: list[int]) -> None:
    """Every declared ``signals/`` (and other per-shard) table present for every shard, fresh, with its
    columns; the message names the command that produces it."""
    for d in stage.reads:
        table = d.resolve(params) if isinstance(d, Ref) else None
        if table is None or not table.startswith("signals/"):
            continue
        columns = stage.inputs(params)[table]
        alias = table.split("/", 1)[1]
        hint = d.hint.format(root=run.root) if d.hint else io.signals_command(run, alias, columns)
        got = io.require_table(run, table, parts, hint)
        schema = got.schema()
        absent = [c for c in columns if schema is None or c not in schema.names]
        if absent:
            raise UserError(f"{table} has no column(s) {absent}; produce them with `{hint}`")


def run_stage(stage: Stage, run: RunDir, params: Any) -> dict[str, Any]:
    """Check the declared inputs, run the shard loop (scan first for global statistics), record the step.

    Under torchrun each rank computes the shards :func:`~winnow.core.shards.rank_parts` gives it (a stage
    with a scan: only when it declares ``shard_split``, else rank 0 does all); rank 0 records the step."""
    with distributed("cpu") as d:
        return _run_stage(stage, run, params, d)


def _run_stage(stage: Stage, run: RunDir, params: Any, d: Dist) -> dict[str, Any]:
    started = time.time()
    parts = io.samples_parts(run)
    _check_tables(stage, run, params, parts)
    split = stage.scan is None or stage.shard_split
    # a stage that runs on rank 0 alone sees one process: its scan must not wait on the other ranks
    ctx = Ctx(run, params, parts, stage.inputs(params), d if split else Dist())
    if stage.check is not None:
        stage.check(ctx)
    st = io.StageOutput(run, stage.name, params, stage.code_version, started)
    if d.main:
        io.drop_orphans(st.out, parts)
    tables = list(ctx.tables)
    mine = rank_parts(run, parts, d) if split else (parts if d.main else [])

    def compute(part: int, state: Any) -> Computed:
        got = stage.compute(ctx, part, state)
        return got if isinstance(got, Computed) else Computed([got])

    if stage.scan is None:
        st.loop.run_parts(mine, compute, inputs=lambda part: io.part_inputs(run, tables, part))
        return st.finish(len(parts), d=d)
    inputs = io.table_inputs(run, tables)
    # decided together before any rank commits, so every rank sees the same "all fresh"
    stale = not all(d.gather(all(st.loop.fresh(p, inputs) for p in parts)))
    counts = {}
    if stale and (split or d.main):
        _, state = st.loop.run_parts(mine, compute, inputs=inputs, scan=lambda: stage.scan(ctx), force=True)
        counts = stage.counts(state) if stage.counts is not None else {}
    return st.finish(len(parts), counts, d=d)
