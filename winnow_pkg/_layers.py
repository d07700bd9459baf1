"""The import-linter contract type behind `lint-imports`: winnow's floors, checked on the real import graph.

``winnow`` is assembled from top-level folders (``pyproject.toml``'s ``package-dir``: ``winnow.core`` is
``core/``, ...), but grimp, import-linter's graph builder, walks the folder of the root package only:
``winnow_pkg/``, one module. A plain layers contract would see none of the floors. This contract type
(``mapped_layers``, declared in ``[tool.importlinter]``) builds the graph from a link tree instead: a
temporary ``winnow/`` whose entries point at the folders ``package-dir`` names, read from the
``pyproject.toml`` of the working directory (so a scratch copy of the checkout is linted as itself, not
the installed package), then checks it exactly as import-linter's ``layers`` contract does. Lazy
(function-level) and ``TYPE_CHECKING`` imports count. It prints the size of the graph it checked, so a
vacuous pass (a handful of modules) shows.

Used by `lint-imports` only (it imports import-linter and grimp, the ``dev`` extra); nothing at run time
imports it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
import tempfile
import tomllib
from pathlib import Path

import grimp
from importlinter.application import output
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import ContractCheck

ROOT = "winnow"


def package_dirs(checkout: Path) -> dict[str, Path]:
    """``package-dir`` of ``checkout/pyproject.toml``: import name -> folder."""
    cfg = tomllib.loads((checkout / "pyproject.toml").read_text())
    mapping = cfg["tool"]["setuptools"]["package-dir"]
    return {name: (checkout / folder).resolve() for name, folder in mapping.items()}


def link_tree(checkout: Path, dest: Path) -> Path:
    """``dest/winnow/``: the root package's files, and one link per mapped subpackage folder."""
    dirs = package_dirs(checkout)
    tree = dest / ROOT
    tree.mkdir(parents=True)
    for f in dirs[ROOT].glob("*.py"):
        os.symlink(f, tree / f.name)
    for name, folder in dirs.items():
        parts = name.split(".")
        if name == ROOT or len(parts) != 2 or parts[0] != ROOT:  # deeper names live inside their parent
            continue
        os.symlink(folder, tree / parts[1], target_is_directory=True)
    return tree


@functools.cache
def build_graph(checkout: Path) -> grimp.ImportGraph:
    """The import graph of ``winnow`` as ``checkout``'s ``package-dir`` assembles it.

    grimp locates the root package with ``importlib.util.find_spec``, which answers from ``sys.modules``
    (this module is inside ``winnow``) and from the installed editable finder: for the build, the link
    tree is put first on ``sys.path`` and ``winnow`` is taken out of ``sys.modules``, then both restored.
    """
    with tempfile.TemporaryDirectory(prefix="winnow-layers-") as tmp:
        link_tree(checkout, Path(tmp))
        saved = sys.modules.pop(ROOT, None)
        sys.path.insert(0, tmp)
        importlib.invalidate_caches()
        try:
            return grimp.build_graph(ROOT, cache_dir=None)
        finally:
            sys.path.remove(tmp)
            if saved is not None:
                sys.modules[ROOT] = saved
            importlib.invalidate_caches()


class MappedLayersContract(LayersContract):
    """import-linter's ``layers`` contract over :func:`build_graph`'s graph (same options)."""

    type_name = "mapped_layers"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        real = copy.deepcopy(build_graph(Path.cwd().resolve()))  # the check removes ignored imports
        n_imports = sum(len(real.find_modules_directly_imported_by(m)) for m in real.modules)
        output.print(f"{self.name}: checked {len(real.modules)} modules, {n_imports} imports between them")
        return super().check(real, verbose)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every set of modules that import each other in a cycle (strongly connected components of more
    than one module, lazy and TYPE_CHECKING imports included), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:  # Tarjan's algorithm, iterative (no recursion limit on a long import chain)
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)
