"""The shape of the house: floors checked by `lint-imports` on the real graph, no import cycle, every module
in the wheel, no function over 60 lines.

The expected module lists come from walking the folders that ``pyproject.toml``'s ``package-dir`` names
(independent of grimp and of setuptools); the linter's verdicts are checked on a scratch copy of the
source tree, clean and with deliberate violations.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAPPING = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def _modules(root: Path) -> set[str]:
    """Every module of the source tree, by walking the mapped folders."""
    out = set()
    for name, folder in MAPPING.items():
        for f in (root / folder).rglob("*.py"):
            parts = [name, *f.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out.add(".".join(parts))
    return out


def _copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in sorted(set(MAPPING.values())):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, dest / f)
    return dest


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports")], cwd=root, capture_output=True, text=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return _copy_tree(tmp_path_factory.mktemp("house"))


def test_lint_imports_sees_every_module_and_passes(scratch):
    got = _lint(scratch)
    assert got.returncode == 0, got.stdout + got.stderr
    n = len(_modules(scratch))
    assert n > 70  # the floors, not winnow_pkg/ alone (what a plain contract would see)
    assert f"checked {n} modules" in " ".join(got.stdout.split())


@pytest.mark.parametrize(
    "module, line, arrow",
    [
        (
            "core/store.py",
            "def _up():\n    from winnow.pipeline import cli\n",
            "winnow.core.store -> winnow.pipeline.cli",
        ),
        (
            "trainer/loss.py",
            "def _up():\n    from winnow.stages.passes import pass_step\n",
            "winnow.trainer.loss -> winnow.stages.passes.pass_step",
        ),
        (
            "stages/topk.py",
            "if False:\n    import winnow.trainer.step\n",
            "winnow.stages.topk -> winnow.trainer.step",
        ),
        (
            "kernels/switch.py",
            "def _up():\n    import winnow.core.errors\n",
            "winnow.kernels.switch -> winnow.core.errors",
        ),
    ],
)
def test_lint_imports_fails_on_a_lazy_upward_or_sideways_import(scratch, module, line, arrow):
    path = scratch / module
    clean = path.read_text()
    try:
        path.write_text(clean + "\n\n" + line)
        got = _lint(scratch)
    finally:
        path.write_text(clean)
    assert got.returncode == 1, got.stdout + got.stderr
    assert arrow in got.stdout


def test_no_import_cycle_and_a_cycle_is_found(scratch):
    from winnow._layers import build_graph, import_cycles

    assert import_cycles(build_graph(REPO)) == []
    path = scratch / "core" / "errors.py"
    clean = path.read_text()
    try:  # store imports errors; errors importing store under TYPE_CHECKING closes a cycle
        path.write_text(
            clean
            + "\n\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from winnow.core import store\n"
        )
        build_graph.cache_clear()
        cycles = import_cycles(build_graph(scratch.resolve()))
    finally:
        path.write_text(clean)
        build_graph.cache_clear()
    assert ["winnow.core.errors", "winnow.core.store"] in cycles


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    src = _copy_tree(tmp_path / "src")
    got = subprocess.run(
        [
            str(BIN / "pip"),
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stdout + got.stderr  # the dev extra installs `wheel`
    (wheel,) = (tmp_path / "dist").glob("winnow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {
        n[: -len(".py")].removesuffix("/__init__").replace("/", ".") for n in names if n.endswith(".py")
    }
    assert _modules(src) - in_wheel == set()
    data = {f"winnow/pipeline/builtin/{f.name}" for f in (src / "pipeline" / "builtin").glob("*.json")}
    assert data and data <= names


def test_no_function_over_60_lines():
    long = []
    for folder in ("core", "pipeline", "stages", "trainer", "kernels"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > 60:
                        long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_the_registry_arrows_are_in_the_graph():
    """Every module the registry names by string is also an import of winnow.pipeline.steps (under
    TYPE_CHECKING), so the floors contract sees the roof -> room arrows the strings would hide."""
    from winnow._layers import build_graph
    from winnow.pipeline import steps

    imported = build_graph(REPO).find_modules_directly_imported_by("winnow.pipeline.steps")
    named = {s.module for s in steps.REGISTRY.values()} | {
        s.card.split(":")[0] for s in steps.REGISTRY.values() if isinstance(s.card, str)
    }
    assert named - imported == set()
