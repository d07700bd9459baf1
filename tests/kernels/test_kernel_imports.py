"""The numeric cores the trainer and the GPU machine reuse import with torch/numpy only.

The GPU machine has no polars, duckdb or datasets, and the trainer must not pull the run store
(pyarrow) in through a kernel. Each module is imported in a fresh interpreter whose import system
raises on those packages (a ``sys.meta_path`` finder placed first), so a module-level import of any of
them, direct or through another winnow module, fails the test.
"""

import json
import subprocess
import sys

BLOCKED = ("pyarrow", "polars", "duckdb", "datasets")
CORES = ("winnow.kernels.chunked_head", "winnow.kernels.attention_importance", "winnow.kernels.sinkhorn")

SCRIPT = """
import json
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
        return None

sys.meta_path.insert(0, Blocked())
result = {{}}
for module in {modules!r}:
    try:
        __import__(module)
        result[module] = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
    except ImportError as e:
        result[module] = str(e)
print(json.dumps(result))
"""


def _import_blocked(*modules: str) -> dict:
    """Import ``modules`` in order in one fresh interpreter (one torch start-up for all of them)."""
    code = SCRIPT.format(blocked=BLOCKED, modules=modules)
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cores_import_without_pyarrow_polars_duckdb():
    assert _import_blocked(*CORES) == {m: [] for m in CORES}


def test_the_block_catches_a_store_import():
    """The same harness reports a module that needs the run store: the test can fail."""
    assert _import_blocked("winnow.pipeline.store") == {
        "winnow.pipeline.store": "blocked for this test: pyarrow"
    }
