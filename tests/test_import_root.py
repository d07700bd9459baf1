"""The checkout root is never an import root: its top-level ``kernels/`` would shadow the PyPI package
``kernels`` that transformers imports. Never skipped: it needs neither ../shared nor an optional package.

A stand-in ``kernels`` package on ``PYTHONPATH`` marks what ``import kernels`` gives: started the way the
README starts things (the ``winnow`` and ``pytest`` console scripts, ``python -P``) from the checkout root,
it must be the stand-in; with the root on ``sys.path`` it would be the checkout's folder. A
``sitecustomize`` records it from an ``atexit`` hook, once ``sys.path`` holds everything the launcher put
there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ROOT / "kernels" / "__init__.py"  # a venv inside the checkout is fine: only this file shadows
BIN = Path(sys.executable).parent

SITECUSTOMIZE = """
import atexit, os

def _record():
    import kernels
    with open(os.environ["WINNOW_TEST_KERNELS_LOG"], "w") as f:
        f.write(getattr(kernels, "MARKER", "no marker: " + str(getattr(kernels, "__file__", None))))

atexit.register(_record)
"""


def test_kernels_in_this_session_is_not_the_checkout():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).resolve() != OURS, spec.origin
    assert not any(Path(p or os.curdir).resolve() == ROOT for p in sys.path), sys.path


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stand_in")
    (d / "kernels").mkdir()
    (d / "kernels" / "__init__.py").write_text('MARKER = "stand-in"\n')
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


LAUNCHES = {
    "winnow": [str(BIN / "winnow"), "steps"],
    "pytest": [str(BIN / "pytest"), "-q", "--co", "-p", "no:cacheprovider", "tests/test_import_root.py"],
    "python -P": [sys.executable, "-P", "-c", "import winnow.pipeline.cli"],
}


@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_launch_from_the_checkout_root_keeps_the_root_off_sys_path(launch, stand_in, tmp_path):
    log = tmp_path / "kernels.txt"
    env = {**os.environ, "PYTHONPATH": str(stand_in), "WINNOW_TEST_KERNELS_LOG": str(log)}
    proc = subprocess.run(LAUNCHES[launch], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert log.read_text() == "stand-in"


def test_root_on_sys_path_still_gives_the_installed_kernels(tmp_path):
    """A notebook or ``python -c`` in the checkout root: kernels/__init__.py steps aside for the PyPI one."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 or "No module named 'kernels'" in proc.stderr, proc.stderr[-1500:]
    if proc.returncode == 0:
        assert Path(proc.stdout.strip()).resolve() != OURS, proc.stdout
