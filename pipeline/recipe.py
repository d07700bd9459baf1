"""Recipes: a TOML file naming a run directory and the steps to run in it, in order.

```toml
run_dir = "runs/quickstart"          # relative to the working directory; --run-dir overrides

[[steps]]
step = "ingest"                      # a name from winnow.pipeline.steps.REGISTRY
inputs = ["builtin:demo"]            # every other key is a field of that step's parameter dataclass
model = "builtin:tiny"
```

Every step's table is validated against its dataclass before anything runs, so a typo in the last
step fails in a second, not after an hour of model passes; so is the order of the steps: a step that
reads a table no earlier step writes (and the run does not hold yet) fails at once with the step to
add (:func:`winnow.pipeline.steps.check_order`). Steps skip shards that are already
committed with the same fingerprint, so rerunning a recipe only does what is missing or stale.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.core.params import build_params
from winnow.core.store import RunDir, UserError, atomic_write_json
from winnow.pipeline.steps import Step, check_order, get_step, spec


@dataclass
class Recipe:
    path: Path
    run_dir: str
    steps: list[tuple[Step, Any]]


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(set(data) - {"run_dir", "steps", "description"})
    if unknown:
        raise UserError(
            f"{path}: unknown top-level key(s) {unknown}; expected run_dir, description, [[steps]]"
        )
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UserError(f"{path}: no [[steps]] tables")
    steps = []
    for i, table in enumerate(raw_steps):
        table = dict(table)
        name = table.pop("step", None)
        where = f"{path}: steps[{i}]"
        if name is None:
            raise UserError(f'{where}: missing `step = "..."`')
        step = get_step(name)
        params = build_params(step.params, table, f"{where} ({name})")
        if name == "train" and not (params.selection or params.data):  # before any step runs
            raise UserError(
                f'{where} (train): give selection = "NAME" (a selection of the run) or selection = "all" '
                "(every non-rejected sample), or data = EXPORT"
            )
        steps.append((step, params))
    return Recipe(path, str(data.get("run_dir", f"runs/{path.stem}")), steps)


def run_recipe(path: str | Path, run_dir: str | None = None) -> dict[str, Any]:
    return run_loaded(load_recipe(path), run_dir)


def with_models(recipe: Recipe, models: dict[str, str]) -> Recipe:
    """The same recipe with every model field (``model``, ``positive``, ``negative``) whose value is a
    key of ``models`` replaced by its value: one pipeline, run on another set of models."""
    steps = []
    for step, params in recipe.steps:
        swap = {
            k: models[v]
            for k in ("model", "positive", "negative")
            if isinstance(v := getattr(params, k, None), str) and v in models
        }
        steps.append((step, dataclasses.replace(params, **swap) if swap else params))
    return Recipe(recipe.path, recipe.run_dir, steps)


def run_loaded(recipe: Recipe, run_dir: str | None = None) -> dict[str, Any]:
    from winnow.core.lock import run_lock

    run = RunDir(run_dir or recipe.run_dir, create=True)
    with run_lock(run, f"recipe {recipe.path.name}"):  # one writer for the whole recipe
        return _run_steps(recipe, run)


def _run_steps(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    check_order([(s.name, p) for s, p in recipe.steps], run.tables(), where=str(recipe.path))
    atomic_write_json(
        run.root / "recipe.resolved.json",
        {
            "recipe": str(recipe.path),
            "steps": [{"step": s.name, **vars(p)} for s, p in recipe.steps],
        },
    )
    t0 = time.time()
    results = {}
    for step, params in recipe.steps:
        key = spec(step.name).key(params)
        t = time.time()
        results[key] = step.run(run, params)
        print(f"[winnow] {key}: done in {time.time() - t:.1f}s")
    print(
        f"[winnow] recipe {recipe.path.name}: {len(recipe.steps)} steps in {time.time() - t0:.1f}s -> {run.root}"
    )
    return results


def targets_ingest(steps: list[tuple[Step, Any]], path: str | Path) -> tuple[Step, Any]:
    """The recipe step that ingests a DV4LLM target file into ``targets/`` (the stage reads that table),
    with the tokenizer of the recipe's samples ingest; put it before the ``dv4llm`` step."""
    ingest = next(p for s, p in steps if s.name == "ingest" and p.table == "samples")
    step = get_step("ingest")
    return step, step.params(inputs=[str(path)], model=ingest.model, table="targets")
