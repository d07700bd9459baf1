"""Kernel tests run the Triton kernels under the interpreter when there is no CUDA device.

triton (3.x) decides at ``@triton.jit`` time, i.e. when :mod:`winnow.kernels.triton_linear_cross_entropy`
is imported, whether a kernel is interpreted, and reads ``TRITON_INTERPRET`` then (not when triton
itself is imported). Nothing imports that module before a test here asks for it: torch does not import
triton, the switch imports the kernels lazily, and pytest loads this conftest before collecting these
tests (at start-up when a path below this folder is named). So setting the variable here is enough;
``tests/conftest.py`` stays untouched. ``test_interpreter_is_active`` fails if that ever stops holding.

Tests marked ``gpu`` are skipped without CUDA (the GPU check script runs them with ``-m gpu``).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
