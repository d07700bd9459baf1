"""The step registry's table and its questions, on the ground floor: what every room may ask.

A :class:`StepSpec` is one registry line: its kind (``ingest``, ``model_pass``, ``stage``,
``selection``, ``training``), the module holding its runnable :class:`Step`, the tables it reads and
writes as patterns resolved from its parameters (``signals/{history}``), the columns of its output
that other steps rely on (``keep``, ``reason``, ``token_keep``), and its data-card section.

This module holds data and questions only (:func:`score_stages`, :func:`token_sources`,
:func:`selection_policies`, :func:`writes_column`, :meth:`StepSpec.key`): it imports no step. The roof
(:mod:`winnow.pipeline.steps`) fills :data:`REGISTRY` with winnow's own steps and is the one place that
imports a step's module (:func:`winnow.pipeline.steps.get_step`); so a room (the selection policy asks
which stages write ``keep``) reads the registry without an arrow pointing up. Every program enters
through the roof (the CLI, a recipe, ``get_step``), which registers the steps on import.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from winnow.core.errors import UserError

KINDS = ("ingest", "model_pass", "stage", "selection", "training")


@dataclass(frozen=True)
class Step:
    """A unit of a pipeline: validated parameters in, committed tables out.

    ``run(run_dir, params)`` does the work, skipping shards already committed with the same
    fingerprint, and returns the manifest entry for the step (counts, timings, outputs).
    """

    name: str
    params: type
    run: Callable[[Any, Any], dict[str, Any]]
    help: str = ""


@dataclass(frozen=True)
class Ref:
    """A table a step reads or writes: a pattern over its parameters, present only ``when`` true.

    A stage's reads also name the ``columns`` it needs from the table (a tuple, or a function of the
    parameters) and the command that produces it (``hint``, formatted with ``root``, the run folder;
    default for ``signals/<alias>``: the model pass with the signals those columns need), so the stage's
    input check and its recorded inputs come from this one declaration.
    """

    pattern: str
    when: Callable[[Any], bool] | None = None
    columns: tuple[str, ...] | Callable[[Any], Iterable[str]] = ()
    hint: str = ""

    def resolve(self, params: Any) -> str | None:
        if self.when is not None and not self.when(params):
            return None
        return self.pattern.format_map({k: getattr(params, k) for k in _fields(self.pattern)})

    def columns_for(self, params: Any) -> list[str]:
        return list(self.columns(params) if callable(self.columns) else self.columns)


TableDecl = str | Ref | Callable[[Any], Iterable[str]]


def _fields(pattern: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(pattern) if f]


def _resolve(decls: tuple[TableDecl, ...], params: Any) -> list[str]:
    out: list[str] = []
    for d in decls:
        if isinstance(d, str):
            d = Ref(d)
        if isinstance(d, Ref):
            name = d.resolve(params)
            out += [name] if name else []
        else:
            out += list(d(params))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class StepSpec:
    """One registry line. ``module`` holds ``STEP`` (a stage module: ``STAGE``, whose declaration this
    line is built from); ``card`` is a function ``(card, spec) -> list[str]`` or ``"module:function"``
    (None for a stage: the generic section); ``policy`` is a stage's sample half for ``winnow select``
    (:class:`Policy`; None: the stage's ``keep`` and ``reason`` columns when it writes them)."""

    name: str
    kind: str
    module: str
    reads: tuple[TableDecl, ...] = ()
    writes: tuple[TableDecl, ...] = ()
    columns: tuple[str, ...] = ()  # columns of the first written table other steps rely on
    key_pattern: str | Callable[[Any], str] = ""  # manifest key; default "<kind>:<name>" ("stage:eu_plane")
    card: str | Callable[[Any, Any], list[str]] | None = None
    help: str = ""
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name!r}: kind={self.kind!r} is not one of {list(KINDS)}")

    def tables_read(self, params: Any) -> list[str]:
        return _resolve(self.reads, params)

    def tables_written(self, params: Any) -> list[str]:
        return _resolve(self.writes, params)

    def key(self, params: Any) -> str:
        """The step's key in ``manifest.json``: ``<kind>`` or ``<kind>:<instance>``."""
        if callable(self.key_pattern):
            return self.key_pattern(params)
        pattern = self.key_pattern or f"{self.kind}:{self.name}"
        return pattern.format_map({k: getattr(params, k) for k in _fields(pattern)})


@dataclass(frozen=True)
class Policy:
    """A stage's sample half for ``winnow select``: the ``columns`` of ``scores/<stage>`` it reads and
    ``decide(rows, ids, select_params) -> (keep, reason)`` over one shard, where ``rows`` maps a
    sample_id to its values of those columns (a sample without a row is unscored)."""

    columns: tuple[str, ...]
    decide: Callable[[dict[str, dict], list[str], Any], tuple[dict[str, bool], dict[str, str]]]


REGISTRY: dict[str, StepSpec] = {}


def register(spec: StepSpec, *, replace: bool = False) -> StepSpec:
    """Add a step to the registry (the CLI, recipes, selection and the card see it at once)."""
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"step {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def spec(name: str) -> StepSpec:
    if name not in REGISTRY:
        raise UserError(f"unknown step {name!r}; known steps: {sorted(REGISTRY)}")
    return REGISTRY[name]


def score_stages() -> list[str]:
    """The scoring stages, callable as `winnow score DIR STAGE`, in registry order."""
    return [s.name for s in REGISTRY.values() if s.kind == "stage"]


def writes_column(stage: str, column: str) -> bool:
    s = REGISTRY.get(stage)
    return s is not None and column in s.columns


def sample_policy(stage: str) -> Policy | None:
    """The sample half a stage declares, else one over its ``keep``/``reason`` columns, else None
    (a token-level stage: every sample is kept)."""
    s = REGISTRY.get(stage)
    if s is None or s.kind != "stage":
        return None
    if s.policy is not None:
        return s.policy
    return Policy(("keep", "reason"), _keep_column) if "keep" in s.columns else None


def _keep_column(rows: dict[str, dict], ids: list[str], p: Any) -> tuple[dict[str, bool], dict[str, str]]:
    keep = {sid: bool(rows.get(sid, {}).get("keep")) for sid in ids}
    why = {sid: (rows[sid]["reason"] if sid in rows else "unscored") for sid in ids}
    return keep, why


def token_sources() -> list[str]:
    """`select --tokens` values: every supervised token, each stage's ``token_keep``, cDPO's p_CE."""
    return ["loss_mask", *(s for s in score_stages() if writes_column(s, "token_keep")), "p_ce"]


def selection_policies() -> list[str]:
    return [*score_stages(), "all", "sql"]
