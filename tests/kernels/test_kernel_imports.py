"""The numeric cores the trainer and the GPU machine reuse import with torch/numpy only.

The GPU machine has no polars, duckdb or datasets, and the trainer must not pull the run store
(pyarrow) in through a kernel. Each module is imported in a fresh interpreter whose import system
raises on those packages (a ``sys.meta_path`` finder placed first), so a module-level import of any of
them, direct or through another winnow module, fails the test.
"""

import subprocess
import sys

import pytest

BLOCKED = ("pyarrow", "polars", "duckdb", "datasets")
CORES = ("winnow.kernels.chunked_head", "winnow.kernels.attention_importance", "winnow.kernels.sinkhorn")

SCRIPT = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
        return None

sys.meta_path.insert(0, Blocked())
import {module}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
assert not loaded, loaded
print("ok")
"""


def _import_blocked(module: str) -> subprocess.CompletedProcess:
    code = SCRIPT.format(blocked=BLOCKED, module=module)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", CORES)
def test_core_imports_without_pyarrow_polars_duckdb(module):
    res = _import_blocked(module)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_the_block_catches_a_store_import():
    """The same harness fails for a module that needs the run store: the test can fail."""
    res = _import_blocked("winnow.pipeline.store")
    assert res.returncode != 0 and "blocked for this test: pyarrow" in res.stderr
