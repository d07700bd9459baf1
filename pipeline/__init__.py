"""winnow.pipeline: the roof (CLI, recipes, the step registry, inspect, card, export, the built-ins).

Importing it registers the providers of ``builtin:<name>`` with the ground floor (:mod:`winnow.core.builtins`):
the tiny models (built by winnow's trainer) and the demo data. Both are imported only when a built-in is
first resolved, so this stays light (no torch): `winnow --help` imports it.
"""

from __future__ import annotations

from pathlib import Path

from winnow.core import builtins
from winnow.core.errors import UserError


def _model(name: str) -> Path:
    from winnow.pipeline.builtin.tiny_model import builtin_model_path

    return builtin_model_path(name)


def _model_names() -> list[str]:
    from winnow.pipeline.builtin.tiny_model import BUILTIN_MODELS

    return list(BUILTIN_MODELS)


def _input(name: str) -> Path:
    if name == "tool_calls":  # TL-Training's demo: tool calls, outputs, errors (builtin/tool_demo.py)
        from winnow.pipeline.builtin.tool_demo import tool_demo_path

        return tool_demo_path()
    if name != "demo":
        raise UserError(
            f"unknown built-in input 'builtin:{name}'; built-in inputs: builtin:demo, builtin:tool_calls"
        )
    from winnow.pipeline.builtin.demo_data import demo_path

    return demo_path()


builtins.provide("model", _model, _model_names)
builtins.provide("input", _input, lambda: ["demo", "tool_calls"])
