"""The shard loop shared by model passes: torchrun ranks, skip-if-committed, commits, progress.

* **Unit of work** = one committed samples shard; the output shard carries the same part number and a
  commit record whose ``inputs`` is that samples shard's digest. A shard whose record has the same
  fingerprint and inputs is skipped, so a killed pass resumes at shard granularity and a rerun under
  another number of ranks reuses everything.
* **Ranks.** When ``WORLD_SIZE > 1`` (torchrun) the pass initialises the process group itself (gloo on
  CPU, nccl on GPU) unless the caller already did. Rank 0 lists the pending shards and assigns them
  longest-processing-time first by token count (each shard goes to the least-loaded rank), then
  broadcasts the plan, so every rank works from one view of what is done. Each rank writes only its
  own shards and commit records; statistics are gathered and only rank 0 touches ``manifest.json``,
  after a barrier.
* **Threads.** On CPU each rank uses ``cores / local ranks`` threads (torchrun sets
  ``OMP_NUM_THREADS=1``, which would leave cores idle when one rank runs per machine).
* **Progress.** Rank 0 shows a bar with tokens/s on a terminal, and one line per shard otherwise.
* **Memory returned to the OS.** glibc raises its mmap threshold as large blocks are freed, after which
  freed activations and logit chunks stay in the heap and fragment it; a CPU pass then peaked at
  920–960 MB max RSS where 695 MB were needed (tiny Llama, V=32k, measured here). On CPU the pass pins
  the threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``, glibc only; a no-op elsewhere), so every
  large tensor is mapped and unmapped on its own; speed was unchanged within noise.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.core.dist import Dist, init_distributed  # noqa: F401  (re-exported for the passes)
from winnow.core.shards import ShardLoop, assign_by_tokens, shards_block
from winnow.core.store import RunDir, UserError, part_name, versions


def return_large_blocks_to_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations >= ``threshold`` bytes with mmap (glibc); False where that is not available."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        return False


def set_threads(threads: int, d: Dist) -> int:
    import torch

    if threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(1, d.local_world))
    torch.set_num_threads(threads)
    return threads


@dataclass
class ShardPlan:
    assignment: list[list[int]]
    inputs: dict[int, dict[str, str]]
    tokens: dict[int, int]
    rows: dict[int, int]
    skipped: list[int] = field(default_factory=list)


def plan_shards(run: RunDir, out_table: str, fingerprint: str, d: Dist) -> ShardPlan:
    """Rank 0 lists the pending shards and assigns them; every rank gets the same plan (or error)."""
    plan: ShardPlan | str | None = None
    if d.rank == 0:
        try:
            plan = _plan_shards(run, out_table, fingerprint, d.world)
        except UserError as e:
            plan = str(e)  # raised on every rank below, so no rank waits forever on the others
    plan = d.broadcast(plan)
    if isinstance(plan, str):
        raise UserError(plan)
    return plan


def _plan_shards(run: RunDir, out_table: str, fingerprint: str, world: int) -> ShardPlan:
    samples = run.table("samples")
    recs = samples.records()
    if not recs:
        raise UserError(f"{run.root} has no committed samples shards: run `winnow ingest` first")
    fresh = ShardLoop([run.table(out_table)], fingerprint, len(recs)).fresh
    pending: dict[int, int] = {}
    inputs, tokens, rows, skipped = {}, {}, {}, []
    for rec in recs:
        inp = {f"samples/{part_name(rec.part)}": rec.sha256}
        n_tok = pq.read_table(samples.part_path(rec.part), columns=["n_tokens"])["n_tokens"]
        inputs[rec.part], tokens[rec.part], rows[rec.part] = inp, int(pc.sum(n_tok).as_py() or 0), rec.rows
        if fresh(rec.part, inp):
            skipped.append(rec.part)
        else:
            pending[rec.part] = tokens[rec.part]
    return ShardPlan(assign_by_tokens(pending, world), inputs, tokens, rows, skipped)


class Progress:
    """Rank-0 progress: a rich bar with tokens/s on a terminal, else one stderr line per shard."""

    def __init__(self, label: str, total_tokens: int, n_shards: int, enabled: bool):
        self.label, self.total, self.n_shards = label, total_tokens, n_shards
        self.enabled = enabled and os.environ.get("WINNOW_PROGRESS", "1") != "0"
        self.t0 = time.perf_counter()
        self.done_tokens = 0
        self.done_shards = 0
        self._bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(label, total=max(total_tokens, 1), tps="-")
            self._bar.start()

    def tps(self) -> float:
        return self.done_tokens / max(time.perf_counter() - self.t0, 1e-9)

    def advance(self, tokens: int) -> None:
        self.done_tokens += tokens
        if self._bar is not None:
            self._bar.update(self._task, advance=tokens, tps=f"{self.tps():,.0f}")

    def shard(self, part: int, rows: int, tokens: int) -> None:
        self.done_shards += 1
        if self.enabled and self._bar is None:
            print(
                f"{self.label}: {part_name(part)} done ({self.done_shards}/{self.n_shards} of this rank, {rows} "
                f"samples, {tokens} tokens), {self.tps():,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def run_shards(
    run: RunDir,
    *,
    d: Dist,
    plan: ShardPlan,
    out_table: str,
    fingerprint: str,
    extra: dict[str, Any],
    columns: list[str],
    load: Callable[[], Any],
    compute: Callable[[Any, pa.Table, Callable[[int], None]], pa.Table],
    label: str,
) -> dict[str, Any]:
    """Compute and commit this rank's shards; return statistics summed over all ranks."""
    mine = plan.assignment[d.rank]
    samples = run.table("samples")
    loop = ShardLoop([run.table(out_table)], fingerprint, len(plan.inputs), extra=extra)
    stats = {"shards_computed": 0, "rows": 0, "tokens": 0, "compute_s": 0.0, "load_s": 0.0}
    if mine:
        t0 = time.perf_counter()
        state = load()
        stats["load_s"] = time.perf_counter() - t0
        prog = Progress(label, sum(plan.tokens[p] for p in mine), len(mine), enabled=d.rank == 0)
        try:
            for part in mine:
                tbl = samples.read_part(part, columns=columns)
                t1 = time.perf_counter()
                result = compute(state, tbl, prog.advance)
                stats["compute_s"] += time.perf_counter() - t1
                counts = {"samples": tbl.num_rows, "tokens": plan.tokens[part]}
                loop.commit(part, result, inputs=plan.inputs[part], counts=counts)  # + the fault hook
                stats["shards_computed"] += 1
                stats["rows"] += tbl.num_rows
                stats["tokens"] += plan.tokens[part]
                prog.shard(part, tbl.num_rows, plan.tokens[part])
        finally:
            prog.close()
    gathered = d.gather(stats)
    total = {k: sum(g[k] for g in gathered) for k in ("shards_computed", "rows", "tokens")}
    slowest = max(g["compute_s"] for g in gathered)
    total["compute_s"] = round(slowest, 3)
    total["load_s"] = round(max(g["load_s"] for g in gathered), 3)
    total["tokens_per_s"] = round(total["tokens"] / slowest, 1) if slowest > 0 else None
    total["shards_skipped"] = len(plan.skipped)
    total["shards_total"] = len(plan.skipped) + sum(len(a) for a in plan.assignment)
    total["shards_by_rank"] = [len(a) for a in plan.assignment]
    return total


def pass_entry(stats: dict[str, Any], plan: ShardPlan, started: float) -> dict[str, Any]:
    """The manifest fields every model pass shares: shard counts, sample/token counts, timings."""
    return {
        "shards": shards_block(
            stats["shards_total"], stats["shards_computed"], stats["shards_skipped"], stats["shards_by_rank"]
        ),
        "counts": {
            "samples": sum(plan.rows.values()),
            "tokens": sum(plan.tokens.values()),
            "computed_samples": stats["rows"],
            "computed_tokens": stats["tokens"],
        },
        "tokens_per_s": stats["tokens_per_s"],
        "load_s": stats["load_s"],
        "compute_s": stats["compute_s"],
        "wall_s": round(time.time() - started, 3),
        "versions": versions(),
    }


def record_pass(run: RunDir, d: Dist, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 writes the pass's manifest entry once every rank has committed its shards."""
    d.barrier()
    if d.rank == 0:
        run.update_manifest(key, entry)
    d.barrier()
    return entry
