"""The registry of steps a recipe or the CLI can run.

Each entry names a module attribute holding a :class:`Step`; modules are imported only when their
step is used, so `winnow --help` and table-only commands never import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from winnow.pipeline.store import RunDir, UserError


@dataclass(frozen=True)
class Step:
    """A unit of a pipeline: validated parameters in, committed tables out.

    ``run(run_dir, params)`` does the work, skipping shards already committed with the same
    fingerprint, and returns the manifest entry for the step (counts, timings, outputs).
    ``key(params)`` names the step in the manifest (e.g. ``score:current``).
    """

    name: str
    params: type
    run: Callable[[RunDir, Any], dict[str, Any]]
    key: Callable[[Any], str] = lambda p: ""
    help: str = ""


# step name -> "module:attribute" of its Step
REGISTRY: dict[str, str] = {
    "ingest": "winnow.pipeline.ingest:STEP",
    "model_pass": "winnow.stages.passes.model_pass:STEP",
    "contrast_pass": "winnow.stages.passes.contrast_pass:STEP",
    "eu_plane": "winnow.stages.eu_plane:STEP",
    "excess_loss": "winnow.stages.excess_loss:STEP",
    "sstoken": "winnow.stages.sstoken:STEP",
    "critical_tokens": "winnow.stages.critical_tokens:STEP",
    "dv4llm": "winnow.stages.dv4llm:STEP",
    "select": "winnow.stages.select_policy:STEP",
    "train": "winnow.trainer.step:STEP",
}

# the scoring stages callable as `winnow score DIR STAGE`
SCORE_STAGES = ("eu_plane", "excess_loss", "sstoken", "critical_tokens", "dv4llm")


def get_step(name: str) -> Step:
    if name not in REGISTRY:
        raise UserError(f"unknown step {name!r}; known steps: {sorted(REGISTRY)}")
    module, attr = REGISTRY[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise UserError(f"step {name!r} is not available in this version of winnow") from None
        raise
    return getattr(mod, attr)


def available_steps() -> list[str]:
    out = []
    for name in REGISTRY:
        try:
            get_step(name)
        except UserError:
            continue
        out.append(name)
    return out
