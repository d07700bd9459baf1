"""`torchrun --nproc_per_node 2` (gloo, CPU) through the CLI: every rank commits shards, same table as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from winnow.stages.passes.model_pass import ModelPassParams, run_model_pass

from model_pass_fixtures import make_model_dir, random_samples, write_samples

ROOT = Path(__file__).resolve().parents[3]


def _values(tbl, col):
    return np.concatenate(
        [np.array([np.nan if v is None else v for v in x], np.float64) for x in tbl[col].to_pylist()]
    )


def test_two_ranks_match_one_process(tmp_path):
    model = make_model_dir(tmp_path, "llama")
    seqs, masks = random_samples(40, seed=3)
    multi = write_samples(tmp_path / "multi", seqs, masks, model, shards=4)
    single = write_samples(tmp_path / "single", seqs, masks, model, shards=4)
    env = {**os.environ, "WINNOW_PROGRESS": "0"}
    # the README's form, started from the checkout root: `--` ends torchrun's options (it would take
    # `--signals` as an abbreviation of its own --signals-to-handle) and --no-python runs the console script
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--no-python",
        "--",
        str(bin_dir / "winnow"),
        "score",
        str(multi.root),
        "--model",
        str(model),
        "--alias",
        "current",
        "--signals",
        "logprob,entropy,embedding",
        "--set",
        "threads=1",
        "--set",
        "token_budget=256",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    out = multi.table("signals/current")
    ranks = {r.part: r.extra["rank"] for r in out.records()}
    assert sorted(ranks) == [0, 1, 2, 3]
    assert sorted(set(ranks.values())) == [0, 1]  # each rank committed shards
    entry = multi.manifest()["steps"]["model_pass:current"]
    assert (
        entry["world_size"] == 2 and entry["shards"]["by_rank"] == [2, 2] and entry["shards"]["computed"] == 4
    )
    assert json.loads((multi.root / "manifest.json").read_text())["tables"]["signals/current"]["shards"] == 4

    run_model_pass(
        single,
        ModelPassParams(
            model=str(model), signals=["logprob", "entropy", "embedding"], token_budget=256, threads=1
        ),
    )
    a, b = out.read(), single.table("signals/current").read()
    assert a["sample_id"].equals(b["sample_id"]) and a.num_rows == 40
    for col in ("logprob", "entropy"):
        np.testing.assert_allclose(_values(a, col), _values(b, col), rtol=1e-5, atol=1e-5)  # nulls agree too
    np.testing.assert_allclose(
        np.array(a["embedding"].to_pylist()), np.array(b["embedding"].to_pylist()), rtol=1e-5, atol=1e-6
    )
