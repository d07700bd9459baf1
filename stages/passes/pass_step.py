"""What every model pass does around its per-batch work: one settings dataclass and one runner.

:class:`PassSettings` holds the parameters that only steer how a pass runs (positions, batching,
device, dtype, threads); :class:`~winnow.stages.passes.model_pass.ModelPassParams` and
:class:`~winnow.stages.passes.contrast_pass.ContrastParams` extend it with what the pass computes.
:func:`run_pass` does the rest for both: torchrun process group, model resolution and tokenizer check
for every role (``model``, or ``positive``/``negative``), weights fingerprints, the commit fingerprint,
the shard plan, CPU threads and the malloc threshold, loading, the shard loop
(:func:`.pass_runner.run_shards`) and the manifest entry. A pass supplies only ``load`` (its models
and their checks) and ``compute`` (one samples shard -> one output table).

**Process settings are restored.** A pass sets ``torch.set_num_threads`` and pins glibc's mmap
threshold at 1 MiB (why: :mod:`.pass_runner`) for its own duration only. Threads come back to the
caller's count. glibc has no call that reads the threshold nor one that re-enables its dynamic
adjustment once pinned, so on the way out the threshold is set to glibc's starting value, 128 KiB
(or ``MALLOC_MMAP_THRESHOLD_`` when the caller's environment pinned one): a later 512 KiB block is
mmapped again as it would be in a fresh process, instead of staying in the heap (tested through
``mallinfo2``).

Commit fingerprint = hash of the step kind, :data:`CODE_VERSION`, the weights and ``config.json``
fingerprints of every role and the output-affecting settings (the resolved dtype included). Batching
parameters are left out: they change values only at float-rounding level, and changing them should
not recompute a run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winnow.core.layout import LAYOUTS
from winnow.core.models import check_tokenizer, config_fingerprint, resolve_model, weights_fingerprint
from winnow.core.params import as_dict
from winnow.core.steps import spec
from winnow.core.store import RunDir, stable_hash
from winnow.stages.passes.pass_runner import (
    Dist,
    init_distributed,
    pass_entry,
    plan_shards,
    record_pass,
    return_large_blocks_to_os,
    run_shards,
    set_threads,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from winnow.core.model_io import LoadedModel

CODE_VERSION = "model_pass/1"  # "<step>/<n>" like every step; the contrast pass shares it
POSITIONS = ("supervised", "all")
SAMPLE_COLUMNS = ["sample_id", "input_ids", "loss_mask", "n_tokens"]
PASS_MMAP_THRESHOLD = 1 << 20
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MIN, where its dynamic threshold starts
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(kw_only=True)
class PassSettings:
    """How a model pass runs (not what it computes): positions, batching, device, dtype, threads."""

    positions: str = "supervised"  # supervised | all (targets with a value)
    token_budget: int = 0  # tokens per forward (rows x padded width); 0 = 4096 on CPU, 16384 on GPU
    head_chunk: int = 0  # positions per LM-head chunk; 0 = about 32 MiB of fp32 logits
    dtype: str = "auto"  # auto = fp32 on CPU, bf16 body on GPU (head always fp32)
    trust_remote_code: bool = False  # run the model repo's own Python code (only if you trust it)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    layout: str = "auto"  # auto | padded | packed (see winnow.core.layout)
    threads: int = 0  # CPU threads per rank; 0 = cores / local ranks

    def check_settings(self, where: str) -> None:
        from winnow.core.model_io import DTYPES

        if self.positions not in POSITIONS:
            raise ValueError(f"{where}: positions={self.positions!r} is not one of {list(POSITIONS)}")
        if self.token_budget != 0 and self.token_budget < 16:
            raise ValueError(
                f"{where}: token_budget={self.token_budget} is too small; use >= 16 (or 0 for the default)"
            )
        if self.head_chunk < 0:
            raise ValueError(
                f"{where}: head_chunk={self.head_chunk} must be >= 0 (0 picks ~32 MiB of logits per chunk)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}: dtype={self.dtype!r} is not one of {list(DTYPES)}")
        if self.layout not in ("auto", *LAYOUTS):
            raise ValueError(f"{where}: layout={self.layout!r} is not one of {['auto', *LAYOUTS]}")
        if self.threads < 0:
            raise ValueError(f"{where}: threads={self.threads} must be >= 0 (0 = cores / local ranks)")


def auto_token_budget(token_budget: int, device: torch.device) -> int:
    """0 -> 4096 tokens on CPU (no faster at 8192 here, and 100+ MB more memory), 16384 on GPU."""
    if token_budget > 0:
        return token_budget
    return 16384 if device.type == "cuda" else 4096


def pass_fingerprint(kind: str, model_fps: dict[str, str], settings: dict[str, Any]) -> str:
    return stable_hash({"step": kind, "code": CODE_VERSION, "models": model_fps, **settings})


# ------------------------------------------------------------------------- process-wide settings
def _caller_mmap_threshold() -> int:
    try:
        return int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except (KeyError, ValueError):
        return GLIBC_MMAP_THRESHOLD


@contextmanager
def cpu_settings(threads: int, d: Dist, on_cpu: bool) -> Iterator[int | None]:
    """Threads and the malloc threshold for the pass on CPU; both given back on the way out."""
    if not on_cpu:
        yield None
        return
    import torch

    saved = torch.get_num_threads()
    chosen = set_threads(threads, d)
    pinned = return_large_blocks_to_os(PASS_MMAP_THRESHOLD)
    try:
        yield chosen
    finally:
        torch.set_num_threads(saved)
        if pinned:
            return_large_blocks_to_os(_caller_mmap_threshold())


# ------------------------------------------------------------------------------------ the runner
@dataclass
class PassContext:
    """What ``load`` and ``compute`` of a pass see: the resolved models, device, dtype and budget."""

    params: PassSettings
    dirs: dict[str, Path]  # role -> resolved model directory
    fingerprints: dict[str, str]  # role -> weights fingerprint
    device: torch.device
    dtype: torch.dtype
    token_budget: int
    info: dict[str, Any] = field(default_factory=dict)  # per-rank facts gathered into the manifest

    def load(self, role: str) -> LoadedModel:
        from winnow.core.model_io import load_model

        loaded = load_model(
            self.dirs[role],
            device=self.device,
            dtype=self.dtype,
            layout=self.params.layout,
            trust_remote_code=self.params.trust_remote_code,
            fingerprint=self.fingerprints[role],
        )
        self.info.update(layout=loaded.layout, attn_implementation=loaded.attn_implementation)
        return loaded

    def by_role(self, values: dict[str, Any]) -> Any:
        """One model (role ``model``): its value; several: the role -> value mapping (record format)."""
        return values["model"] if list(values) == ["model"] else dict(values)


@dataclass
class PassJob:
    """What differs between the passes; :func:`run_pass` does everything else."""

    kind: str  # step name: model_pass | contrast_pass
    alias: str  # output table signals/<alias>, manifest key score:<alias>
    models: dict[str, str]  # role -> model spec (local directory or builtin:<name>)
    settings: dict[str, Any]  # output-affecting parameters (fingerprinted; the resolved dtype is added)
    load: Callable[[PassContext], Any]  # load the models, check them together; returns the compute state
    compute: Callable[[PassContext, Any, pa.Table, Callable[[int], None]], pa.Table]
    record: dict[str, Any] = field(default_factory=dict)  # extra commit-record fields


def _resolve(run: RunDir, job: PassJob, trust_remote_code: bool) -> dict[str, Path]:
    dirs = {role: resolve_model(spec) for role, spec in job.models.items()}
    for role, path in dirs.items():
        check_tokenizer(run, path, trust_remote_code, what="model" if role == "model" else f"{role} model")
    return dirs


def run_pass(run: RunDir, p: PassSettings, job: PassJob) -> dict[str, Any]:
    """Score every pending samples shard with ``job``; returns the step's manifest entry."""
    from winnow.core.model_io import resolve_device, resolve_dtype

    t0 = time.time()
    d = init_distributed(p.device)
    try:
        dirs = _resolve(run, job, p.trust_remote_code)
        device = resolve_device(p.device)
        dtype = resolve_dtype(p.dtype, device)
        fps = {role: weights_fingerprint(path) for role, path in dirs.items()}
        ctx = PassContext(p, dirs, fps, device, dtype, auto_token_budget(p.token_budget, device))
        configs = ctx.by_role({role: config_fingerprint(path) for role, path in dirs.items()})
        fp = pass_fingerprint(job.kind, fps, {**job.settings, "dtype": str(dtype), "config": configs})
        table, key = f"signals/{job.alias}", spec(job.kind).key(p)
        plan = plan_shards(run, table, fp, d)
        with cpu_settings(p.threads, d, device.type == "cpu") as threads:
            record = {"model_fingerprint": ctx.by_role(fps), "model": ctx.by_role(_str(dirs))}
            stats = run_shards(
                run,
                d=d,
                plan=plan,
                out_table=table,
                fingerprint=fp,
                extra={**record, "alias": job.alias, **job.record, "rank": d.rank},
                columns=SAMPLE_COLUMNS,
                load=lambda: job.load(ctx),
                compute=lambda state, tbl, advance: job.compute(ctx, state, tbl, advance),
                label=key,
            )
        infos = [x for x in d.gather(ctx.info) if x]
        entry = {
            "step": job.kind,
            "alias": job.alias,
            "table": table,
            "model": record["model"],
            "model_fingerprint": record["model_fingerprint"],
            "fingerprint": fp,
            "config": as_dict(p),
            "device": str(device),
            "dtype": str(dtype),
            "threads": threads,
            "token_budget": ctx.token_budget,
            "world_size": d.world,
            **({k: infos[0][k] for k in ("layout", "attn_implementation")} if infos else {}),
            **pass_entry(stats, plan, t0),
        }
        padded = sum(x.get("computed_tokens", 0) for x in infos)  # rows x width of the forwards run
        entry["counts"]["padding_fraction"] = round(1 - stats["tokens"] / padded, 4) if padded else None
        return record_pass(run, d, key, entry)
    finally:
        d.close()


def _str(dirs: dict[str, Path]) -> dict[str, str]:
    return {role: str(path) for role, path in dirs.items()}
