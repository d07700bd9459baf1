"""Helpers the tests import by name (tests/support is on pytest's pythonpath): run the CLI in-process,
small model directories, the GSM8K location."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


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


# Subprocesses start winnow through its console script, never `python -m` from the checkout root
# (the root on sys.path would shadow the PyPI `kernels` package with ours).
WINNOW = str(Path(sys.executable).parent / "winnow")
