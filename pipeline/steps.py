"""The registry of steps a recipe or the CLI can run: winnow's own steps, registered once here (the roof).

The table and its questions live on the ground floor (:mod:`winnow.core.steps`, re-exported here for the
roof's readers); this module registers the steps: the built-in scoring stages from their modules' declarations
(``BUILTIN_STAGES``, each ``STAGE``), then the plugins of the entry-point group ``winnow.stages``
(:func:`load_plugins`); the other steps' modules are imported only when the step is used
(:func:`get_step`). Stage modules import torch only when they run, so `winnow --help` and `winnow
inspect` never import it.

Derived from the registry rather than listed by hand: the `winnow score` stage list and help
(:func:`score_stages`, ``SCORE_STAGES``), the selection policies (:func:`selection_policies`) and
``--tokens`` sources (:func:`token_sources`: every stage that writes ``token_keep``), the card's
per-stage sections (:func:`card_sections`), the manifest key of a run (:meth:`StepSpec.key`) and
the recipe check (:func:`check_order`: a step whose input no earlier step or existing table
provides fails before anything runs, with the step to add).

Adding a scoring stage is one module declaring ``STAGE = Stage(...)`` (:mod:`winnow.stages.stage`),
listed in ``BUILTIN_STAGES`` or named by a ``winnow.stages`` entry point; docs/CONTRACTS.md says how.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import string
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from winnow.core.errors import UserError
from winnow.core.steps import (  # noqa: F401  (re-exported: the roof's readers ask the registry here)
    KINDS,
    REGISTRY,
    Ref,
    Step,
    StepSpec,
    _fields,
    register,
    sample_policy,
    score_stages,
    selection_policies,
    spec,
    token_sources,
    unregister,
    writes_column,
)

# the built-in scoring stages, in registry order: each module declares its stage once (``STAGE``), and
# the registry line is built from it. Light to import (numpy, pyarrow; torch only when a stage runs).
from winnow.stages import critical_tokens, dv4llm, eu_plane, excess_loss, sstoken, token_cleaning

BUILTIN_STAGES = (eu_plane, excess_loss, sstoken, critical_tokens, dv4llm, token_cleaning)
ENTRY_POINT_GROUP = "winnow.stages"  # plugins: an entry point naming a module with STAGE (or the Stage)

# the modules the other entries below name (imported only by `get_step`): arrows the import graph sees
if TYPE_CHECKING:
    import winnow.core.ingest
    import winnow.pipeline.lemo_fit
    import winnow.pipeline.token_cleaning_rounds
    import winnow.pipeline.train
    import winnow.stages.passes.contrast_pass
    import winnow.stages.passes.model_pass
    import winnow.stages.select_policy  # noqa: F401


def load(s: StepSpec) -> Step:
    """The runnable step of ``s``: its module is imported here, when the step is first used (a stage
    module's ``STAGE`` is its step)."""
    try:
        mod = importlib.import_module(s.module)
    except ModuleNotFoundError as e:
        if e.name == s.module:
            raise UserError(f"step {s.name!r} is not available in this version of winnow") from None
        raise
    return getattr(mod, "STAGE", None) or mod.STEP


def get_step(name: str) -> Step:
    return load(spec(name))


def available_steps() -> list[str]:
    out = []
    for name in REGISTRY:
        try:
            get_step(name)
        except UserError:
            continue
        out.append(name)
    return out


def card_sections() -> list[tuple[StepSpec, Callable[[Any, StepSpec], list[str]] | None]]:
    """Each stage's card section function (None: the card's generic one), then those other steps declare
    (the self-evolving rounds), in registry order."""
    out = []
    for s in REGISTRY.values():
        if s.kind != "stage" and s.card is None:
            continue
        fn = s.card
        if isinstance(fn, str):
            module, attr = fn.split(":")
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
    defaults = {f.name: f.default for f in dataclasses.fields(load(s).params)}
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


def _online_records(p: Any) -> list[str]:
    """``record_weights=true``: one ``selection/online-<name>-epoch<E>`` per epoch (trainer.online_record;
    fewer when ``max_steps`` ends training early)."""
    online = getattr(p, "online", None)
    if online is None or not online.record_weights or online.policy == "none":
        return []
    name = p.name or p.selection or "all"
    return [f"selection/online-{name}-epoch{e}" for e in range(1, p.epochs + 1)]


# ---- the registry --------------------------------------------------------------------------------
def register_stage(stage: Any, module: str, *, replace: bool = False) -> StepSpec:
    """Register a :class:`winnow.stages.stage.Stage` declared in ``module`` (its registry line is built
    from the declaration: nothing about the stage is said twice)."""
    return register(stage.spec(module), replace=replace)


def load_plugins(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register the stages named in the entry-point group ``winnow.stages`` of the installed (or
    ``PYTHONPATH``) distributions: ``name = "module"`` or ``"module:STAGE"``. A plugin that fails to load
    or clashes with a registered name is skipped with a warning naming it, so one broken plugin does not
    stop winnow. Returns the names registered."""
    import sys
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
            stage = getattr(obj, "STAGE", obj)
            register_stage(stage, ep.module)
        except Exception as e:  # a plugin's own error: say which one, keep the built-in steps working
            print(f"warning: stage plugin {ep.name} = {ep.value!r} not loaded: {e}", file=sys.stderr)
            continue
        out.append(stage.name)
    return out


def _select_reads(p: Any) -> list[str]:
    out = [f"scores/{x}" for x in p.policies if sample_policy(x) is not None]  # every policy of a composition
    source = p.token_source
    if source == "p_ce":
        out.append("scores/critical_tokens")
    elif source != "loss_mask":
        out.append(f"scores/{source}")
    user = getattr(p, "user", None)  # a python: policy's declared tables (winnow.stages.user_policy)
    return out + [t for t in (user.reads if user else ()) if t not in out]


def _round_selections(p: Any) -> list[str]:
    return [f"selection/{p.name}-round{t}" for t in range(p.rounds + 1)]


def _is_samples(p: Any) -> bool:
    return p.table == "samples"


_BEFORE_STAGES = 3  # ingest, model_pass, contrast_pass; then the stages; then select and train
_STEPS = (
    StepSpec(
        "ingest",
        "ingest",
        "winnow.core.ingest",
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
        "select",
        "selection",
        "winnow.stages.select_policy",
        reads=("samples", _select_reads),
        writes=("selection/{name}",),
        key_pattern="select:{name}",
        help="selection policy (or python:pkg.module:function, python:file.py:function): scores -> keep per "
        "sample + token_weight per token in selection/<name>/",
    ),
    StepSpec(
        "train",
        "training",
        "winnow.pipeline.train",
        reads=("samples", Ref("selection/{selection}", lambda p: p.selection not in ("", "all"))),
        writes=(_online_records,),
        key_pattern=lambda p: f"train:{p.name or p.selection or 'all'}",
        help="train a model on a selection (token-weighted, trimmed, packed; resumable; torchrun) -> RUN/train/<name>/",
    ),
    StepSpec(
        "lemo_fit",
        "training",
        "winnow.pipeline.lemo_fit",
        reads=("samples",),
        key_pattern="lemo_fit",
        help="LeMo's per-layer block predictors for long-context token sparsity (train --set lemo.predictors=OUT) -> --out DIR",
    ),
    StepSpec(
        "token_cleaning_rounds",
        "training",
        "winnow.pipeline.token_cleaning_rounds",
        reads=("samples", "signals/{base}"),
        writes=(_round_selections,),
        key_pattern="token_cleaning_rounds:{name}",
        card="winnow.pipeline.token_cleaning_rounds:card_section",
        help="self-evolving Token Cleaning: T+1 parts; train on part 0, then clean each part with base vs "
        "the latest model and train on from it -> selection/<name>-round<t>/, RUN/train/<name>-round<t>/",
    ),
)
for _spec in _STEPS[:_BEFORE_STAGES]:
    register(_spec)
for _module in BUILTIN_STAGES:
    register_stage(_module.STAGE, _module.__name__)
for _spec in _STEPS[_BEFORE_STAGES:]:
    register(_spec)
load_plugins()
