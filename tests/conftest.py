"""Session-wide test setup: options, markers, the Triton interpreter switch and shared fixtures. Helpers that
tests import by name live in tests/support/ (on pytest's pythonpath, see pyproject.toml)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cli_runner import GSM8K, write_model_dir


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


# Triton kernels run under the interpreter when there is no CUDA device. triton (3.x) reads
# TRITON_INTERPRET when a kernel is defined (``@triton.jit``, i.e. when
# winnow.kernels.triton_linear_cross_entropy is imported), and nothing imports that module before a
# kernel test asks for it; tests/kernels/test_linear_cross_entropy.py::test_interpreter_is_active
# fails if that ever stops holding.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skips = []
    if not config.getoption("--runslow"):
        skips.append(("slow", pytest.mark.skip(reason="slow: run with --runslow")))
    if not HAS_CUDA:  # benchmarks/gpu_check.sh runs these with -m gpu on a GPU machine
        skips.append(("gpu", pytest.mark.skip(reason="gpu: needs a CUDA device")))
    for item in items:
        for marker, skip in skips:
            if item.get_closest_marker(marker) is not None:  # not keywords: a folder named "gpu" matched
                item.add_marker(skip)


@pytest.fixture(scope="session")
def chatml_model_dir(tmp_path_factory) -> Path:
    from tokenizers_fixtures import make_tokenizer

    return write_model_dir(tmp_path_factory.mktemp("chatml_model"), make_tokenizer("chatml"))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K / "train.jsonl").exists():
        if os.environ.get("CI"):  # CI lays ../shared beside the checkout: a skip there hides a broken path
            pytest.fail(f"GSM8K not found at {GSM8K} under CI")
        pytest.skip(f"GSM8K not found at {GSM8K}")
    return GSM8K
