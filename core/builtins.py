"""``builtin:<name>``: the ground floor's table of built-in models and inputs, filled in by the roof.

The tiny models and the demo data are made by :mod:`winnow.pipeline.builtin` (the tiny models are trained
by winnow's trainer, a room), so the ground floor cannot import them without an arrow pointing up. It keeps
this table instead: :mod:`winnow.pipeline` registers one provider per kind (``model``, ``input``) when it is
imported, which every program does first (the console script, ``winnow run``, ``get_step``). A room asks
:func:`resolve` and never learns who made the directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from winnow.core.errors import UserError

PREFIX = "builtin:"
# kind -> (resolve(name) -> path, names() -> the known names, for messages)
_PROVIDERS: dict[str, tuple[Callable[[str], Path], Callable[[], list[str]]]] = {}


def provide(kind: str, resolve_name: Callable[[str], Path], names: Callable[[], list[str]]) -> None:
    """Register the provider of ``builtin:<name>`` for ``kind`` (the roof does, on import)."""
    _PROVIDERS[kind] = (resolve_name, names)


def _provider(kind: str, spec: str) -> tuple[Callable[[str], Path], Callable[[], list[str]]]:
    if kind not in _PROVIDERS:
        raise UserError(
            f"{spec}: no provider of built-in {kind}s is registered; import winnow.pipeline first (the "
            "`winnow` command, recipes and winnow.pipeline.steps do)"
        )
    return _PROVIDERS[kind]


def resolve(kind: str, spec: str) -> Path:
    """The path of ``builtin:<name>`` (``spec``) for ``kind``, built or fetched by its provider."""
    return _provider(kind, spec)[0](spec[len(PREFIX) :])


def names(kind: str) -> list[str]:
    """The built-in names of ``kind`` (empty when no provider is registered)."""
    return sorted(_PROVIDERS[kind][1]()) if kind in _PROVIDERS else []
