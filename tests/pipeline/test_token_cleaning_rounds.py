"""Self-evolving Token Cleaning (the `token_cleaning_rounds` step): the rounds use disjoint parts of the pool in
stored order and the documented models (round 0 trains the base on every token of part 0; round t keeps the
top rho of part t by ℓ_base − ℓ_θt, θ_t = the model round t-1 saved, and trains on from it), and a run killed
after a round's selection is committed redoes nothing finished when it is run again.

One module run (2 shards, 3 parts, two toy Llamas' worth of training) is killed at round 2's training,
resumed, and then checked; the kept tokens are recomputed from float64 forwards of the saved models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from winnow.core.params import build_params
from winnow.core.store import RunDir, UserError
from winnow.pipeline import token_cleaning_rounds as tcr
from winnow.trainer.config import TrainParams

from cli_runner import run_cli
from model_pass_fixtures import make_model_dir, random_samples, reference, write_samples

ROUNDS, RHO, N = 2, 0.5, 18


def _params(base_dir) -> tcr.RoundsParams:
    train = TrainParams(
        max_steps=2,
        tokens_per_batch=256,
        max_seq_len=64,
        lr=1e-2,
        eval_fraction=0.0,
        progress=False,
        save_every=0,
    )
    return tcr.RoundsParams(model=str(base_dir), rounds=ROUNDS, rho=RHO, name="tc", train=train)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    base_dir = make_model_dir(root, seed=0)
    seqs, masks = random_samples(N, seed=4, lo=6, hi=30)
    run = write_samples(root / "run", seqs, masks, base_dir, shards=2)
    code, _, err = run_cli("score", run.root, "--model", base_dir, "--alias", "base", "--signals", "logprob")
    assert code == 0, err

    from winnow.pipeline import train as train_mod

    real_train, real_cleaned = train_mod.train, tcr._cleaned
    calls: list[tuple[str, str, bool]] = []  # (phase, selection, skipped)
    cleaned: list[tuple[str, int]] = []

    def train(p, run_dir, phase="first"):
        if phase == "first" and p.selection == "tc-round2":
            raise KeyboardInterrupt("killed before round 2 trains")  # round 2's selection is committed
        res = real_train(p, run_dir)
        calls.append((phase, p.selection, bool(res.get("skipped"))))
        return res

    def spy_cleaned(run_, p, where, latest, phase="first"):
        cleaned.append((phase, latest.name))
        return real_cleaned(run_, p, where, latest)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(train_mod, "train", train)
        mp.setattr(tcr, "_cleaned", spy_cleaned)
        with pytest.raises(KeyboardInterrupt):
            tcr.STEP.run(run, _params(base_dir))
        mp.setattr(train_mod, "train", lambda p, d: train(p, d, "resume"))
        mp.setattr(tcr, "_cleaned", lambda *a: spy_cleaned(*a, phase="resume"))
        entry = tcr.STEP.run(run, _params(base_dir))
    finally:
        mp.undo()
    return run, base_dir, seqs, masks, calls, cleaned, entry


def test_resume_redoes_nothing_finished(killed_and_resumed):
    run, _, _, _, calls, cleaned, entry = killed_and_resumed
    assert calls == [
        ("first", "tc-round0", False),
        ("first", "tc-round1", False),
        ("resume", "tc-round0", True),  # finished rounds: the trainer finds its result and skips
        ("resume", "tc-round1", True),
        ("resume", "tc-round2", False),
    ]
    # part 1 was scored by round 0's model and part 2 by round 1's, once each: the resumed run rescored nothing
    assert cleaned == [("first", "tc-round0"), ("first", "tc-round1")]
    man = run.manifest()["steps"]
    for t in range(ROUNDS + 1):
        assert man[f"select:tc-round{t}"]["shards"]["computed"] == 0  # the resumed run committed no shard
    assert [r["skipped"] for r in entry["rounds"]] == [True, True, False]


def test_rounds_use_disjoint_parts_and_the_documented_models(killed_and_resumed):
    from transformers import AutoModelForCausalLM

    run, base_dir, seqs, masks, _, _, entry = killed_and_resumed
    sel = [_selection(run, f"tc-round{t}") for t in range(ROUNDS + 1)]
    # parts: contiguous in stored order (s0000..), sizes 6/6/6, disjoint and covering the pool
    for t, rows in enumerate(sel):
        want = {f"s{i:04d}" for i in range(N) if i * (ROUNDS + 1) // N == t}
        assert {sid for sid, r in rows.items() if r["reason"] != "other_part"} == want
        assert all(not r["keep"] for r in rows.values() if r["reason"] == "other_part")
    # round 0: every supervised token of part 0
    for i in range(6):
        assert np.array_equal(np.asarray(sel[0][f"s{i:04d}"]["token_weight"]) > 0, masks[i] > 0)
    # the models: round t trains from round t-1's output, round 0 from the base
    train_root = run.root / "train"
    chain = [
        json.loads((train_root / f"tc-round{t}" / "winnow_train.json").read_text())["model"] for t in range(3)
    ]
    assert chain == [str(base_dir), str(train_root / "tc-round0"), str(train_root / "tc-round1")]
    assert entry["model"] == str(train_root / "tc-round2")
    # round t >= 1: the global top rho of part t by ℓ_base − ℓ_θt in float64 (θ_t = round t-1's model)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for t in (1, 2):
        latest = AutoModelForCausalLM.from_pretrained(train_root / f"tc-round{t - 1}").eval()
        rows = [i for i in range(N) if i * (ROUNDS + 1) // N == t]
        flat = []
        for i in rows:
            lp_b, lp_l = (
                reference(base, seqs[i].astype(np.int64))[0],
                reference(latest, seqs[i].astype(np.int64))[0],
            )
            flat += [(-(lp_l[j - 1] - lp_b[j - 1]), i, j) for j in range(1, len(seqs[i])) if masks[i][j]]
        flat.sort()
        k = math.floor(RHO * len(flat))
        assert flat[k - 1][0] < flat[k][0] - 1e-4  # no near-tie at the cutoff for float32 to flip
        want = {(i, j) for _, i, j in flat[:k]}
        got = {(i, j) for i in rows for j, w in enumerate(sel[t][f"s{i:04d}"]["token_weight"]) if w > 0}
        assert got == want, t


def test_overall_kept_share_and_errors(killed_and_resumed, tmp_path):
    run, base_dir, _, masks, _, _, entry = killed_and_resumed
    supervised = sum(int(m.sum()) for m in masks)
    weighted = sum(
        int((np.asarray(r["token_weight"]) > 0).sum())
        for t in range(3)
        for r in _selection(run, f"tc-round{t}").values()
    )
    assert entry["counts"] == {
        "supervised_tokens": supervised,
        "weighted_tokens": weighted,
        "kept_share": weighted / supervised,
    }
    with pytest.raises(UserError, match="train.selection is set by each round"):
        build_params(tcr.RoundsParams, {"model": "m", "train": {"selection": "x"}}, "rounds")
    with pytest.raises(UserError, match="rounds=0"):
        build_params(tcr.RoundsParams, {"model": "m", "rounds": 0}, "rounds")
    other = make_model_dir(tmp_path, seed=7)
    with pytest.raises(UserError, match="signals/base was computed with another model"):
        tcr.STEP.run(run, tcr.RoundsParams(model=str(other), rounds=ROUNDS))


def _selection(run: RunDir, name: str) -> dict[str, dict]:
    t = run.table(f"selection/{name}")
    cols = ["sample_id", "keep", "reason", "token_weight"]
    return {r["sample_id"]: r for rec in t.records() for r in t.read_part(rec.part, columns=cols).to_pylist()}


RECIPE = """run_dir = "unused"

[[steps]]
step = "token_cleaning_rounds"
model = "{model}"
rounds = {rounds}
rho = {rho}
name = "tc"

[steps.train]
max_steps = 2
tokens_per_batch = 256
max_seq_len = 64
lr = 1e-2
eval_fraction = 0.0
progress = false
save_every = 0
"""


def test_rounds_under_torchrun_match_one_process(tmp_path):
    """`winnow run` of a rounds recipe on 2 gloo ranks (the README's torchrun form): rank 0 scores and writes
    each round's selection, every rank trains (DDP), and the group outlives each training (before, every
    rank scored and rank 1 read round 0's model before rank 0 had saved it; then training's teardown
    destroyed the group the next round needed). Round 0 (every token of part 0, no model read) is
    one process's bit for bit; a later round scores the same part and keeps as many tokens (ρ of the part's;
    which ones follows a model trained on 2 ranks, whose per-rank batches differ from one process's)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    base_dir = make_model_dir(tmp_path, seed=0)
    seqs, masks = random_samples(N, seed=4, lo=6, hi=30)
    run = write_samples(tmp_path / "one", seqs, masks, base_dir, shards=2)
    code, _, err = run_cli("score", run.root, "--model", base_dir, "--alias", "base", "--signals", "logprob")
    assert code == 0, err
    shutil.copytree(run.root, tmp_path / "two")
    recipe = tmp_path / "rounds.toml"
    recipe.write_text(RECIPE.format(model=base_dir, rounds=ROUNDS, rho=RHO))
    bin_dir, env = Path(sys.executable).parent, {**os.environ, "WINNOW_PROGRESS": "0"}
    one = [str(bin_dir / "winnow"), "run", str(recipe), "--run-dir", str(tmp_path / "one")]
    two = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", "--", *one]
    two[two.index(str(tmp_path / "one"))] = str(tmp_path / "two")
    for cmd in (one, two):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert _selection(a, "tc-round0") == _selection(b, "tc-round0")
    for t in range(1, ROUNDS + 1):
        sa, sb = _selection(a, f"tc-round{t}"), _selection(b, f"tc-round{t}")
        assert sa.keys() == sb.keys()
        part = [k for k, r in sa.items() if r["reason"] != "other_part"]
        assert part == [k for k, r in sb.items() if r["reason"] != "other_part"]
        kept = [sum(sum(x > 0 for x in s[k]["token_weight"] or []) for k in part) for s in (sa, sb)]
        assert kept[0] == kept[1] > 0
