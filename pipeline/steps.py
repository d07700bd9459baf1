"""The registry of steps a recipe or the CLI can run, declared once and read by everything else.

Each step is a light :class:`StepSpec`: its kind (``ingest``, ``model_pass``, ``stage``,
``selection``, ``training``), the module holding its runnable :class:`Step` (imported only when the
step is used, so `winnow --help` and `winnow inspect` never import torch), the tables it reads and
writes as patterns resolved from its parameters (``signals/{history}``), the columns of its output
that other steps rely on (``keep``, ``reason``, ``token_keep``), and its data-card section.

Derived from the registry rather than listed by hand: the `winnow score` stage list and help
(:func:`score_stages`, ``SCORE_STAGES``), the selection policies (:func:`selection_policies`) and
``--tokens`` sources (:func:`token_sources`: every stage that writes ``token_keep``), the card's
per-stage sections (:func:`card_sections`), the manifest key of a run (:meth:`StepSpec.key`) and
the recipe check (:func:`check_order`: a step whose input no earlier step or existing table
provides fails before anything runs, with the step to add).

Adding a scoring stage is one module (parameters dataclass, ``run`` returning the manifest entry,
``STEP = Step(...)``) plus one :func:`register` call; docs/CONTRACTS.md says how.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from winnow.pipeline.errors import UserError

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
    """A table a step reads or writes: a pattern over its parameters, present only ``when`` true."""

    pattern: str
    when: Callable[[Any], bool] | None = None

    def resolve(self, params: Any) -> str | None:
        if self.when is not None and not self.when(params):
            return None
        return self.pattern.format_map({k: getattr(params, k) for k in _fields(self.pattern)})


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


def _online_records(p: Any) -> list[str]:
    """``record_weights=true``: one ``selection/online-<name>-epoch<E>`` per epoch (trainer.online_record;
    fewer when ``max_steps`` ends training early)."""
    online = getattr(p, "online", None)
    if online is None or not online.record_weights or online.policy == "none":
        return []
    name = p.name or p.selection or "all"
    return [f"selection/online-{name}-epoch{e}" for e in range(1, p.epochs + 1)]


@dataclass(frozen=True)
class StepSpec:
    """One registry line. ``module`` holds ``STEP``; ``card`` is ``"module:function"`` called as
    ``function(card, spec) -> list[str]`` (None for a stage: the generic section)."""

    name: str
    kind: str
    module: str
    reads: tuple[TableDecl, ...] = ()
    writes: tuple[TableDecl, ...] = ()
    columns: tuple[str, ...] = ()  # columns of the first written table other steps rely on
    key_pattern: str | Callable[[Any], str] = ""  # manifest key; default "<kind>:<name>" ("stage:eu_plane")
    card: str | None = None
    help: str = ""

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

    def load(self) -> Step:
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name == self.module:
                raise UserError(f"step {self.name!r} is not available in this version of winnow") from None
            raise
        return mod.STEP


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


def get_step(name: str) -> Step:
    return spec(name).load()


def available_steps() -> list[str]:
    out = []
    for name in REGISTRY:
        try:
            get_step(name)
        except UserError:
            continue
        out.append(name)
    return out


def score_stages() -> list[str]:
    """The scoring stages, callable as `winnow score DIR STAGE`, in registry order."""
    return [s.name for s in REGISTRY.values() if s.kind == "stage"]


def writes_column(stage: str, column: str) -> bool:
    s = REGISTRY.get(stage)
    return s is not None and column in s.columns


def token_sources() -> list[str]:
    """`select --tokens` values: every supervised token, each stage's ``token_keep``, cDPO's p_CE."""
    return ["loss_mask", *(s for s in score_stages() if writes_column(s, "token_keep")), "p_ce"]


def selection_policies() -> list[str]:
    return [*score_stages(), "all", "sql"]


def card_sections() -> list[tuple[StepSpec, Callable[[Any, StepSpec], list[str]] | None]]:
    """Each stage's card section function (None: the card's generic one), in registry order."""
    out = []
    for s in REGISTRY.values():
        if s.kind != "stage":
            continue
        fn = None
        if s.card:
            module, attr = s.card.split(":")
            fn = getattr(importlib.import_module(module), attr)
        out.append((s, fn))
    return out


def __getattr__(name: str) -> Any:
    if name == "SCORE_STAGES":  # kept for readers of the old constant; follows registrations
        return tuple(score_stages())
    raise AttributeError(name)


# ---- the recipe check ----------------------------------------------------------------------------
def _provider(table: str) -> str:
    """How to get ``table``: the step (and parameter value) that writes it."""
    candidates = []
    for s in REGISTRY.values():
        for d in s.writes:
            pattern = d if isinstance(d, str) else getattr(d, "pattern", None)
            if pattern is None:
                continue
            names = _fields(pattern)
            regex = "".join(
                re.escape(lit) + (f"(?P<{f}>[^/]+)" if f else "")
                for lit, f, _, _ in string.Formatter().parse(pattern)
            )
            m = re.fullmatch(regex, table)
            if m:
                candidates.append((len(names), s, m.groupdict()))
    if not candidates:
        return "no registered step writes it"
    _, s, values = min(candidates, key=lambda c: c[0])  # a literal pattern beats a placeholder
    defaults = {f.name: f.default for f in dataclasses.fields(s.load().params)}
    given = [f"{k} = {v}" for k, v in values.items() if defaults.get(k) != v]
    article = "an" if s.name[0] in "aeiou" else "a"
    return f"add {article} {s.name}" + (f" with {', '.join(given)}" if given else " step") + " before it"


def check_order(steps: list[tuple[str, Any]], existing: Iterable[str], where: str = "recipe") -> None:
    """Fail before anything runs when a step reads a table that no earlier step writes and the run
    does not already hold; the message names the step to add."""
    have = set(existing)
    for i, (name, params) in enumerate(steps):
        s = spec(name)
        for table in s.tables_read(params):
            if table not in have:
                raise UserError(
                    f"{where}: steps[{i}] {name} reads {table}: {_provider(table)} "
                    "(no earlier step writes it and the run does not hold it)"
                )
        have |= set(s.tables_written(params))


# ---- the registry --------------------------------------------------------------------------------
def _dv4llm_reads(p: Any) -> list[str]:
    return [f"signals/{p.embedding.split(':', 1)[1]}"] if p.embedding.startswith("signals:") else []


def _select_reads(p: Any) -> list[str]:
    out = [
        f"scores/{x}" for x in p.policies if writes_column(x, "keep") or writes_column(x, "selected")
    ]  # every policy of a composition
    source = p.token_source
    if source == "p_ce":
        out.append("scores/critical_tokens")
    elif source != "loss_mask":
        out.append(f"scores/{source}")
    return out


def _is_samples(p: Any) -> bool:
    return p.table == "samples"


_SAMPLE_HALF = ("keep", "reason", "token_keep")
for _spec in (
    StepSpec(
        "ingest",
        "ingest",
        "winnow.pipeline.ingest",
        writes=("{table}", Ref("rejects", _is_samples), Ref("vocab", _is_samples)),
        key_pattern=lambda p: "ingest" if p.table == "samples" else f"ingest:{p.table}",
        help="Local files -> samples/ and rejects/ tables, tokenized with the model's chat template.",
    ),
    StepSpec(
        "model_pass",
        "model_pass",
        "winnow.stages.passes.model_pass",
        reads=("samples",),
        writes=("signals/{alias}",),
        key_pattern="model_pass:{alias}",
        help="one forward of a causal LM: logprob, entropy, attention, embeddings -> signals/<alias>/",
    ),
    StepSpec(
        "contrast_pass",
        "model_pass",
        "winnow.stages.passes.contrast_pass",
        reads=("samples",),
        writes=("signals/contrast",),
        key_pattern="model_pass:contrast",
        help="cDPO contrastive estimate p_CE from a positive and a negative model -> signals/contrast/",
    ),
    StepSpec(
        "eu_plane",
        "stage",
        "winnow.stages.eu_plane",
        reads=("samples", "signals/{alias}"),
        writes=("scores/eu_plane",),
        columns=_SAMPLE_HALF,
        card="winnow.pipeline.card_sections:eu_plane",
        help="Q-Tuning EU plane: sample quadrants by PPL x entropy, token pruning in Q2",
    ),
    StepSpec(
        "excess_loss",
        "stage",
        "winnow.stages.excess_loss",
        reads=("samples", "signals/{current}", "signals/{reference}"),
        writes=("scores/excess_loss",),
        columns=("token_keep", "mean_excess"),
        card="winnow.pipeline.card_sections:excess_loss",
        help="Rho-1 excess loss: current-model loss minus reference-model loss, top-k% across the batch",
    ),
    StepSpec(
        "sstoken",
        "stage",
        "winnow.stages.sstoken",
        reads=("samples", "signals/{current}", Ref("signals/{history}", lambda p: p.gamma > 0)),
        writes=("scores/sstoken",),
        columns=("token_keep",),
        help="ssToken: retrospective excess loss (history - current) mixed with attention, top-rho per sample",
    ),
    StepSpec(
        "critical_tokens",
        "stage",
        "winnow.stages.critical_tokens",
        reads=("samples", "signals/{contrast}"),
        writes=("scores/critical_tokens",),
        columns=(*_SAMPLE_HALF, "min_p_ce"),
        card="winnow.pipeline.card_sections:critical_tokens",
        help="cDPO critical tokens: p_CE scores; for SFT drop incorrect samples, weight correct tokens by p_CE",
    ),
    StepSpec(
        "dv4llm",
        "stage",
        "winnow.stages.dv4llm",
        reads=("samples", _dv4llm_reads),
        writes=("scores/dv4llm", Ref("targets", lambda p: not p.targets.startswith("sql:"))),
        columns=("selected", "role"),
        card="winnow.pipeline.card_sections:dv4llm",
        help="GOT-D optimal-transport selection of the candidates closest to a target set.",
    ),
    StepSpec(
        "select",
        "selection",
        "winnow.stages.select_policy",
        reads=("samples", _select_reads),
        writes=("selection/{name}",),
        key_pattern="select:{name}",
        help="selection policy: scores -> keep per sample + token_weight per token in selection/<name>/",
    ),
    StepSpec(
        "train",
        "training",
        "winnow.trainer.step",
        reads=("samples", Ref("selection/{selection}", lambda p: bool(p.selection))),
        writes=(_online_records,),
        key_pattern=lambda p: f"train:{p.name or p.selection or 'all'}",
        help="train a model on a selection (token-weighted, trimmed, packed; resumable; torchrun) -> RUN/train/<name>/",
    ),
):
    register(_spec)
