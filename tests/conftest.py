"""Shared test helpers: run the CLI in-process, small model directories, data locations."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"

# Some tests build their inputs with another test module's writers (test_eu_plane's synthetic signals,
# ...): keep every test folder importable by module name.
for _sub in sorted(p for p in Path(__file__).parent.rglob("*") if p.is_dir() and not p.name.startswith(("_", "."))):
    if str(_sub) not in sys.path:
        sys.path.append(str(_sub))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


# Triton kernels run under the interpreter when there is no CUDA device. triton (3.x) reads
# TRITON_INTERPRET when a kernel is defined (``@triton.jit``, i.e. when
# winnow.kernels.triton_linear_cross_entropy is imported), and nothing imports that module before a
# kernel test asks for it; tests/kernels/test_linear_cross_entropy.py::test_interpreter_is_active
# fails if that ever stops holding. This lives here, not in tests/kernels/conftest.py, because a
# second conftest module would shadow this one for `from conftest import run_cli`.
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


def run_cli(*args) -> tuple[int, str, str]:
    """Run `winnow ARGS...` in this process; returns (exit code, stdout, stderr)."""
    from winnow.pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["winnow", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def ingest_demo(run_dir) -> Path:
    """`winnow ingest builtin:demo` with the builtin tiny tokenizer into ``run_dir``."""
    code, _, err = run_cli("ingest", "builtin:demo", "--run", run_dir, "--model", "builtin:tiny")
    assert code == 0, err
    return Path(run_dir)


def sql_json(run_dir, sql: str):
    """Query a run through `winnow inspect --sql ... --format json` and parse the rows."""
    code, out, err = run_cli("inspect", run_dir, "--sql", sql, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def write_model_dir(path: Path, tokenizer, max_positions: int = 512) -> Path:
    """A directory `resolve_model`/`AutoTokenizer.from_pretrained` accept: tokenizer files + config.json."""
    tokenizer.save_pretrained(str(path))
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": max_positions})
    )
    return path


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
