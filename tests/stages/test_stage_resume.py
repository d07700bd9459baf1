"""A scoring stage killed between shard commits leaves only whole, committed shards; the rerun finishes
the job (per-shard stages redo only what is missing, stages with dataset-wide statistics redo every
shard) and the result equals an uninterrupted run."""

from __future__ import annotations

import os
import subprocess

import pytest

import synthetic_runs.critical_tokens as test_critical_tokens
import synthetic_runs.eu_plane as test_eu_plane
import synthetic_runs.excess_loss as test_excess_loss
import synthetic_runs.sstoken as test_sstoken
from cli_runner import WINNOW, run_cli

# stage -> (run builder, shards the rerun writes out of 2)
STAGES = {
    "critical_tokens": (test_critical_tokens.make_run, 1),
    "sstoken": (test_sstoken.make_run, 1),
    "eu_plane": (test_eu_plane.make_run, 2),
    "excess_loss": (test_excess_loss.make_run, 2),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_killed_stage_resumes_to_the_uninterrupted_result(tmp_path, stage):
    make_run, rewritten = STAGES[stage]
    run = make_run(tmp_path / "killed")
    env = {**os.environ, "WINNOW_FAULT_KILL_AFTER_SHARDS": "1"}
    proc = subprocess.run(
        [WINNOW, "score", str(run.root), stage],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL right after the first commit
    out = run.table(f"scores/{stage}")
    assert [r.part for r in out.records()] == [0]
    leftovers = [p.name for p in out.dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    assert f"stage:{stage}" not in run.manifest().get(
        "steps", {}
    )  # an unfinished step is not recorded as done

    code, _, err = run_cli("score", run.root, stage)
    assert code == 0, err
    entry = run.manifest()["steps"][f"stage:{stage}"]
    assert (entry["shards"]["computed"], entry["shards"]["skipped"]) == (rewritten, 2 - rewritten)

    clean = make_run(tmp_path / "clean")
    code, _, err = run_cli("score", clean.root, stage)
    assert code == 0, err
    assert out.read().equals(clean.table(f"scores/{stage}").read())
