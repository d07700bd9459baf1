"""User token policies: ``winnow select RUN python:pkg.module:function`` or ``python:path/to/file.py:function``.

A user policy is a plain Python function called once per samples shard; what it returns becomes the
selection (``selection/<name>/``) exactly like a built-in policy's keep flags and token weights.

**Where it comes from.** ``python:pkg.module:function`` imports ``pkg.module`` (an installed or
``PYTHONPATH`` module); ``python:path/to/file.py:function`` (a spec ending in ``.py`` or holding a ``/``)
loads that file by its path, relative to the working directory, as a module of its own. The working
directory is never put on ``sys.path`` (winnow's checkout root would shadow the PyPI ``kernels`` package),
so a file that imports a sibling module needs that folder on ``PYTHONPATH``.

**The contract.** ::

    def my_policy(shard) -> dict:
        ...
    my_policy.reads = ("scores/excess_loss",)   # optional: tables it reads besides samples

(or ``@winnow.stages.user_policy.reads("scores/excess_loss")`` above the ``def``, which sets the same
attribute; a policy file needs no winnow import).

``shard`` is a :class:`Shard`: ``shard.samples`` (one samples shard as a ``pyarrow.Table``, every column:
``sample_id``, ``messages``, ``text``, ``input_ids``, ``offsets``, ``loss_mask``, ``n_tokens``, the
``meta_`` columns), ``shard.tables`` (``{table: pyarrow.Table}``, the same shard of each table named in
``reads``, rows checked to list the same samples in the same order), ``shard.part`` and
``shard.tokens(table, column)`` (a per-token column as one float64 numpy array per sample, aligned with
``input_ids``, null as NaN; ``table`` may be ``"samples"``). The function returns a mapping (or a
``pyarrow.Table``) with any of:

* ``keep``: one bool per sample (default: every sample kept);
* ``reason``: one non-empty string per sample (default ``user_keep`` / ``user_drop``);
* ``token_weight``: one sequence of ``n_tokens`` finite, non-negative weights per sample (default 1 on
  every token). Weights on tokens that are not supervised (``loss_mask == 0``) are ignored (set to 0, as
  for every policy); ``--tokens SOURCE`` multiplies them by that source's selection.

The checks are those the trainer applies to every stored ``token_weight`` list
(:func:`winnow.core.weights.check_weights`: one weight per token, finite float32, none negative; NaN is
refused too) plus the lengths, the types of ``keep`` and ``reason`` and the keys: any failure is one line
naming the spec (``python:file.py:function``), the sample and the shard, and exits 2. An exception the
function raises is a runtime error (exit 1) naming the spec and the shard.

**Identity.** The selection's fingerprint (hence its manifest entry's ``code_version``,
``select/1+user:<digest>``) includes the sha256 of the source file that defines the function and its
qualified name, so editing the function recomputes the selection instead of passing the old one off as
current; the spec and digest are also in every shard's schema metadata (``winnow.user_policy``). The
digest covers that one file: a helper imported from another module is not in it (change the policy file,
or give the selection another ``--name``, when such a helper changes).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.core.store import RunDir, UserError
from winnow.core.weights import check_weights

PREFIX = "python:"
KEYS = ("keep", "reason", "token_weight")
METADATA_KEY = b"winnow.user_policy"


@dataclass
class Shard:
    """What a user policy sees of one samples shard (the module docstring is the contract)."""

    samples: pa.Table
    tables: dict[str, pa.Table]
    part: int

    def tokens(self, table: str, column: str) -> list[np.ndarray]:
        """``column`` of ``table`` (``"samples"`` or a table in ``reads``) as float64 arrays, one per sample."""
        if table != "samples" and table not in self.tables:
            raise KeyError(f"{table} is not among the tables the function reads {tuple(self.tables)}: add it")
        t = self.samples if table == "samples" else self.tables[table]
        col = t[column].combine_chunks()
        flat = pc.fill_null(pc.list_flatten(col).cast(pa.float64()), float("nan"))
        values = flat.to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
        return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


@dataclass
class UserPolicy:
    spec: str  # as given: python:...
    fn: Callable[[Shard], Any]
    reads: tuple[str, ...]
    digest: str  # sha256 of the defining file's bytes and the function's qualified name

    @property
    def version(self) -> str:
        """Appended to the select step's code version: the fingerprint changes with the source."""
        return f"+user:{self.digest[:16]}"

    @property
    def default_name(self) -> str:
        """``<module or file stem>.<function>`` as one folder name (``tool_call_keys.policy``)."""
        target, func = split_spec(self.spec)
        stem = Path(target).stem if _is_path(target) else target.rsplit(".", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{stem}.{func}")[:100]

    @property
    def metadata(self) -> dict[bytes, bytes]:
        return {METADATA_KEY: json.dumps({"spec": self.spec, "sha256": self.digest}).encode()}

    def check(self, run: RunDir) -> None:
        """Every table in ``reads`` present and fresh (the message names the table and the spec)."""
        stale = run.stale_tables()
        for name in self.reads:
            if not run.table(name).exists():
                raise UserError(f"{self.spec} reads {name}, which {run.root} does not hold: produce it first")
            if stale.get(name):
                raise UserError(
                    f"{self.spec} reads {name}, which is stale ({stale[name][0]}): rerun its step"
                )

    def decide(self, run: RunDir, part: int) -> tuple[dict[str, bool], dict[str, str], np.ndarray]:
        """Call the function on samples shard ``part``: keep and reason per sample and the token weights,
        flat over the shard's tokens (float32), every value checked."""
        samples = run.table("samples").read_part(part)
        ids = samples["sample_id"].combine_chunks()
        tables = {name: _aligned(run, name, part, ids, self.spec) for name in self.reads}
        try:
            got = self.fn(Shard(samples, tables, part))
        except UserError:
            raise
        except Exception as e:  # the user's own bug: a runtime error (exit 1) that says whose and where
            raise RuntimeError(
                f"{self.spec} failed on samples/part-{part:05d}: {type(e).__name__}: {e}"
            ) from e
        return check_result(got, ids.to_pylist(), samples["n_tokens"].to_numpy(), self.spec, part)


def reads(*tables: str) -> Callable[[Callable], Callable]:
    """Decorator: ``@reads("scores/excess_loss", "signals/current")`` sets ``function.reads``."""

    def mark(fn: Callable) -> Callable:
        fn.reads = tables  # type: ignore[attr-defined]
        return fn

    return mark


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def split_spec(spec: str) -> tuple[str, str]:
    """``python:TARGET:FUNCTION`` -> (TARGET, FUNCTION), or ValueError naming the expected forms."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    target, _, func = body.rpartition(":")
    if not target or not func.isidentifier():
        raise ValueError(
            f"policy={spec!r}: write python:pkg.module:function or python:path/to/file.py:function"
        )
    return target, func


def _module(spec: str, target: str) -> Any:
    """The module ``target`` names: a file loaded by its path, or an importable module's name."""
    if _is_path(target) and not Path(target).is_file():
        raise ValueError(f"policy={spec!r}: no file {target} (relative to {Path.cwd()})")
    try:
        if not _is_path(target):
            return importlib.import_module(target)
        return _load_file(spec, target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise ValueError(
                f"policy={spec!r}: no module {target!r} on sys.path (the working directory is not on it: "
                "name the file instead, python:path/to/file.py:function)"
            ) from None
        raise RuntimeError(f"policy={spec!r}: importing {target} failed: {e}") from e
    except SyntaxError as e:  # the user's file: name the line (exit 2)
        raise ValueError(f"policy={spec!r}: {e.filename}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # the module's own code failed while loading: a runtime error naming it
        raise RuntimeError(f"policy={spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e


def _load_file(spec: str, target: str) -> Any:
    """``target``, a Python file, executed as a module of its own."""
    path = Path(target)
    # a module of its own under a name no import can clash with; its folder stays off sys.path
    name = "winnow_user_policy_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    mod_spec.loader.exec_module(module)
    return module


_LOADED: dict[tuple, UserPolicy] = {}


def load(spec: str) -> UserPolicy:
    """The user policy ``spec`` names, checked: a callable with a tuple of table names in ``reads``
    (ValueError otherwise: a parameter error, exit 2). Loaded once per process while a policy file's
    size and mtime stay the same (the parameters ask for it several times per run)."""
    target, _ = split_spec(spec)
    key: tuple = (spec,)
    if _is_path(target) and Path(target).is_file():
        st = Path(target).stat()
        key = (spec, str(Path(target).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        _LOADED[key] = _load(spec)
    return _LOADED[key]


def _load(spec: str) -> UserPolicy:
    target, func = split_spec(spec)
    fn = getattr(_module(spec, target), func, None)
    if not callable(fn):
        raise ValueError(f"policy={spec!r}: {target} has no function {func!r}")
    reads = getattr(fn, "reads", ())
    if isinstance(reads, str) or not all(isinstance(t, str) and t for t in reads):
        raise ValueError(f"policy={spec!r}: {func}.reads must be a tuple of table names, got {reads!r}")
    bad = [t for t in reads if t == "samples" or t.startswith("selection/")]
    if bad:
        raise ValueError(
            f"policy={spec!r}: {func}.reads names {bad[0]}; samples are always given, "
            "selections are not inputs of a selection"
        )
    try:
        source = Path(inspect.getsourcefile(fn) or "").read_bytes()
    except (TypeError, OSError):
        raise ValueError(
            f"policy={spec!r}: cannot read the source of {func} (it fingerprints the selection)"
        ) from None
    digest = hashlib.sha256(source + b"\0" + getattr(fn, "__qualname__", func).encode()).hexdigest()
    return UserPolicy(spec, fn, tuple(reads), digest)


def _aligned(run: RunDir, name: str, part: int, ids: pa.Array, spec: str) -> pa.Table:
    table = run.table(name)
    if table.record(part) is None:
        raise UserError(f"{spec} reads {name}, which has no shard {part}: rerun the step that writes it")
    got = table.read_part(part)
    if "sample_id" not in got.column_names or not got["sample_id"].combine_chunks().equals(ids):
        raise UserError(
            f"{name}/part-{part:05d} does not list the samples of samples/part-{part:05d} in order; "
            f"{spec} reads it per shard: rerun the step that writes it"
        )
    return got


def _column(got: Mapping, key: str, n: int, where: str) -> list | None:
    value = got.get(key)
    if value is None:
        return None
    values = value.to_pylist() if isinstance(value, pa.Array | pa.ChunkedArray) else list(value)
    if len(values) != n:
        raise UserError(f"{where}: returned {len(values)} {key} values for the {n} samples of the shard")
    return values


def check_result(
    got: Any, ids: list[str], n_tokens: np.ndarray, spec: str, part: int
) -> tuple[dict[str, bool], dict[str, str], np.ndarray]:
    """A user policy's return value as (keep, reason, flat float32 weights), or UserError on the first
    thing wrong: a key, a length, a keep that is not a bool, an empty reason, a weight list that is
    misaligned, non-finite or negative (:func:`winnow.core.weights.check_weights`)."""
    where = f"{spec} on samples/part-{part:05d}"
    if isinstance(got, pa.Table):
        got = {c: got[c] for c in got.column_names}
    if not isinstance(got, Mapping):
        raise UserError(f"{where}: returned a {type(got).__name__}; return a dict with {', '.join(KEYS)}")
    unknown = sorted(set(got) - set(KEYS))
    if unknown or not set(got) & set(KEYS):
        raise UserError(f"{where}: returned keys {sorted(got)}; use {', '.join(KEYS)} (at least one)")
    n = len(ids)
    keep = _column(got, "keep", n, where) or [True] * n
    reason = _column(got, "reason", n, where)
    weights = _column(got, "token_weight", n, where)
    for i, k in enumerate(keep):
        if not isinstance(k, bool | np.bool_):
            raise UserError(f"{where}: keep of sample {ids[i]} (row {i}) is {k!r}, not a bool")
    reason = reason or ["user_keep" if k else "user_drop" for k in keep]
    for i, r in enumerate(reason):
        if not isinstance(r, str) or not r:
            raise UserError(f"{where}: reason of sample {ids[i]} (row {i}) is {r!r}, not a non-empty string")
    flat = [np.ones(int(t), np.float32) for t in n_tokens]
    for i, w in enumerate(weights or []):
        if isinstance(w, str | bytes) or not hasattr(w, "__len__"):
            raise UserError(f"{where}: token_weight of sample {ids[i]} (row {i}) is {w!r}, not a list")
        if len(w) != n_tokens[i]:
            raise UserError(
                f"{where}: token_weight of sample {ids[i]} (row {i}) has {len(w)} entries for its "
                f"{n_tokens[i]} tokens (one per input_id)"
            )
        flat[i] = check_weights(w, int(n_tokens[i]), f"{where}: sample {ids[i]} (row {i})", allow_null=False)
    out = np.concatenate(flat) if flat else np.zeros(0, np.float32)
    return dict(zip(ids, map(bool, keep), strict=True)), dict(zip(ids, reason, strict=True)), out
