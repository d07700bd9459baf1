"""Token Cleaning, fixed model: scores and selected sets (global and per sample, ties) against a float64
reimplementation in plain Python, by hand on the Rho-1 synthetic run, on random tied signals over several
shards, and with two fixed toy models scored by the model pass; `winnow select RUN token_cleaning --set ...`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from winnow.core.params import build_params
from winnow.core.store import RunDir, UserError
from winnow.stages import token_cleaning as tc
from winnow.stages.token_cleaning_math import token_cleaning_select

from cli_runner import run_cli
from stage_fixtures import write_signals, write_synthetic_samples
from synthetic_runs.excess_loss import make_run


def reference_selection(scores: list[list[float | None]], rho: float, level: str) -> list[set[int]]:
    """The authors' rule in float64 Python: (row-major) stable sort by score descending, keep ⌊rho·N⌋
    of the pool (global) or ⌊rho·n_i⌋ of each row (sample); None = not scored."""
    flat = [(-s, i, j) for i, row in enumerate(scores) for j, s in enumerate(row) if s is not None]
    kept: list[set[int]] = [set() for _ in scores]
    if level == "global":
        k = math.floor(rho * len(flat) + 1e-9)
        for _, i, j in sorted(flat)[:k]:  # ties: (i, j) ascending = earlier token first
            kept[i].add(j)
        return kept
    for i, row in enumerate(scores):
        mine = sorted((-s, j) for j, s in enumerate(row) if s is not None)
        kept[i] = {j for _, j in mine[: math.floor(rho * len(mine) + 1e-9)]}
    return kept


def _rows(run_root, table: str, columns: list[str]) -> list[dict]:
    """Every row of ``table`` in stored order (shard, row), read with pyarrow."""
    t = RunDir(run_root).table(table)
    return [
        r for rec in t.records() for r in t.read_part(rec.part, columns=["sample_id", *columns]).to_pylist()
    ]


def _stage_rows(run_root) -> list[dict]:
    return _rows(run_root, "scores/token_cleaning", ["token_score", "token_keep"])


def _selection(run_root, name: str = "token_cleaning") -> dict[str, dict]:
    rows = _rows(run_root, f"selection/{name}", ["keep", "reason", "token_weight"])
    return {r["sample_id"]: r for r in rows}


@pytest.mark.parametrize(
    ("rho", "level", "want"),
    [
        # N = 9 scored: floor(0.34 * 9) = 3: c1 (2.0), then the first two of the 1.0 ties a2, b1 (c2 loses)
        (0.34, "global", {"a": {2}, "b": {1}, "c": {1}, "d": set()}),
        # per sample: a floor(1.5) = 1 of (0.5, 1.0, -0.25); b 1 of (1.0, 0.25); c 1 of (2, 1, 0); d none
        (0.5, "sample", {"a": {2}, "b": {1}, "c": {1}, "d": set()}),
        # per sample 0.67: a 2 (1.0, 0.5), b 1, c 2 (2.0, 1.0), d floor(0.67) = 0
        (0.67, "sample", {"a": {1, 2}, "b": {1}, "c": {1, 2}, "d": set()}),
    ],
)
def test_hand_computed_selection_through_select(tmp_path, rho, level, want):
    run = make_run(tmp_path / "run")  # aliases current / reference: current plays the base here
    code, out, err = run_cli(
        "select",
        run.root,
        "token_cleaning",
        "--set",
        "base=current",
        "--set",
        f"rho={rho}",
        "--set",
        f"level={level}",
    )
    assert code == 0, err
    assert "step=token_cleaning" in out  # the stage ran first
    sel = _selection(run.root)
    for sid, positions in want.items():
        got = {i for i, w in enumerate(sel[sid]["token_weight"]) if w > 0}
        assert got == positions, sid
        assert sel[sid]["keep"] == bool(positions)
    assert sel["d"]["reason"] == "no_token_weight"  # nothing kept: dropped, never a zero-weight batch


@pytest.mark.parametrize("level", ["global", "sample"])
@pytest.mark.parametrize("rho", [0.3, 0.6, 1.0])
def test_random_tied_signals_over_shards_match_reference(tmp_path, level, rho):
    rng = np.random.default_rng(int(rho * 10) + len(level))
    run = RunDir(tmp_path / f"run-{level}-{rho}", create=True)
    scores: list[list[float | None]] = []
    for part in range(3):
        rows, base, ref = [], [], []
        for _ in range(int(rng.integers(2, 7))):
            n = int(rng.integers(2, 12))
            mask = [0] + [int(x) for x in rng.random(n - 1) < 0.75]
            rows.append({"input_ids": list(range(n)), "loss_mask": mask})
            # quarters: exact in float32, many ties in the difference
            b = [None] + [-float(rng.integers(0, 12)) / 4 for _ in range(n - 1)]
            r = [None] + [-float(rng.integers(0, 12)) / 4 for _ in range(n - 1)]
            base.append(b)
            ref.append(r)
            scores.append([(r[j] - b[j]) if m and j else None for j, m in enumerate(mask)])
        ids = write_synthetic_samples(run, part, rows)
        write_signals(run, "base", part, ids, {"logprob": base}, model_fingerprint="b")
        write_signals(run, "reference", part, ids, {"logprob": ref}, model_fingerprint="r")
    entry = tc.STAGE.run(run, tc.TokenCleaningParams(rho=rho, level=level))
    want = reference_selection(scores, rho, level)
    got = _stage_rows(run.root)
    assert len(got) == len(scores)
    for row, s, w in zip(got, scores, want, strict=True):
        assert row["token_score"] == s  # nll_base - nll_reference, exact on quarters, null where unscored
        assert {j for j, k in enumerate(row["token_keep"]) if k} == w
    assert entry["counts"]["kept_tokens"] == sum(len(w) for w in want)
    if level == "global":  # the docstring's claim: Rho-1 over the whole pool with the base as current
        from winnow.stages import excess_loss as ex

        ex.STAGE.run(run, ex.ExcessLossParams(current="base", k_ratio=rho, batch_size=0))
        rho1 = _rows(run.root, "scores/excess_loss", ["token_keep"])
        assert [r["token_keep"] for r in rho1] == [r["token_keep"] for r in got]


def test_two_toy_models_scores_and_selection(tmp_path):
    """Two fixed toy Llamas scored by the model pass: the stage's score equals ℓ_base − ℓ_reference of a
    float64 forward (within the fp32 of the stored log-probs), and both levels select what the
    reference rule selects on those float64 scores."""
    from transformers import AutoModelForCausalLM

    from model_pass_fixtures import make_model_dir, random_samples, reference, write_samples

    base_dir, ref_dir = make_model_dir(tmp_path, seed=0), make_model_dir(tmp_path, seed=1)
    seqs, masks = random_samples(14, seed=3, hi=40)
    run = write_samples(tmp_path / "run", seqs, masks, base_dir, shards=2)
    for alias, model in (("base", base_dir), ("reference", ref_dir)):
        code, _, err = run_cli("score", run.root, "--model", model, "--alias", alias, "--signals", "logprob")
        assert code == 0, err
    lp = {}
    for alias, model in (("base", base_dir), ("reference", ref_dir)):
        m = AutoModelForCausalLM.from_pretrained(model).eval()
        lp[alias] = [reference(m, s.astype(np.int64))[0] for s in seqs]
    want_scores = [  # ℓ_base − ℓ_reference = logprob_reference − logprob_base; index j-1 is token j
        [
            float(lp["reference"][i][j - 1] - lp["base"][i][j - 1]) if m[j] and j else None
            for j in range(len(m))
        ]
        for i, m in enumerate(masks)
    ]
    # each stored log-prob is within the model pass's stated 1e-5 + 1e-5·|lp| of float64 (test_model_pass),
    # so their difference is within the sum of both bounds
    bound = [
        [
            1e-5 * (2 + abs(lp["reference"][i][j - 1]) + abs(lp["base"][i][j - 1]))
            for j in range(1, len(m))
            if m[j]
        ]
        for i, m in enumerate(masks)
    ]
    for level in ("global", "sample"):
        code, _, err = run_cli(
            "select", run.root, "token_cleaning", "--set", "rho=0.6", "--set", f"level={level}"
        )
        assert code == 0, err
        got = _stage_rows(run.root)
        for row, s, b in zip(got, want_scores, bound, strict=True):
            have = [x is not None for x in row["token_score"]]
            assert have == [x is not None for x in s]
            a = np.array([x for x in row["token_score"] if x is not None])
            assert np.all(np.abs(a - [x for x in s if x is not None]) <= b), (a, s)
        want = reference_selection(want_scores, 0.6, level)
        sel = _selection(run.root)
        for i, w in enumerate(want):
            assert {j for j, x in enumerate(sel[f"s{i:04d}"]["token_weight"]) if x > 0} == w, (level, i)
    _train_with_empty_samples(run, base_dir)


def _train_with_empty_samples(run, base_dir):
    """rho=0.2 per sample leaves samples of under 5 scored tokens with nothing: select drops them and
    training (every batch) sees only weighted tokens: every logged loss is finite."""
    import json

    code, _, err = run_cli(
        "select", run.root, "token_cleaning", "--set", "rho=0.2", "--set", "level=sample", "--name", "sparse"
    )
    assert code == 0, err
    sel = _selection(run.root, "sparse")
    empty = [sid for sid, r in sel.items() if not any(w > 0 for w in r["token_weight"])]
    assert empty and all(sel[sid]["reason"] == "no_token_weight" and not sel[sid]["keep"] for sid in empty)
    code, _, err = run_cli(
        "train", run.root, "--selection", "sparse", "--model", base_dir,
        "--set", "max_steps=3", "--set", "tokens_per_batch=128", "--set", "max_seq_len=64",
        "--set", "eval_fraction=0", "--set", "progress=false",
    )  # fmt: skip
    assert code == 0, err
    lines = (run.root / "train" / "sparse" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)


def test_math_matches_reference_on_random_blocks():
    rng = np.random.default_rng(5)
    for shape in ((1, 9), (3, 17), (6, 5)):
        base = rng.uniform(0.01, 5, size=shape)
        ref = rng.uniform(0.01, 5, size=shape)
        base[:, ::3] = ref[:, ::3] + 0.5  # ties: equal scores at every third position
        mask = rng.random(shape) < 0.8
        scores = [
            [float(base[i, j] - ref[i, j]) if mask[i, j] else None for j in range(shape[1])]
            for i in range(shape[0])
        ]
        for level in ("global", "sample"):
            score, keep = token_cleaning_select(*map(torch.from_numpy, (base, ref, mask)), 0.6, level)
            np.testing.assert_allclose(score.numpy()[mask], (base - ref)[mask], rtol=0, atol=1e-12)
            want = reference_selection(scores, 0.6, level)
            assert [set(np.flatnonzero(r)) for r in keep.numpy()] == want


def test_user_errors(tmp_path):
    run = make_run(tmp_path / "run")
    code, _, err = run_cli("select", run.root, "token_cleaning", "--set", "rho=0.6")
    assert code == 2 and "signals/base" in err and "--alias base --signals logprob" in err
    # only the policy's own stage takes its parameters; anything else is still an unknown select parameter
    for args in (("all", "--set", "rho=0.6"), ("token_cleaning", "--set", "bogus=1")):
        code, _, err = run_cli("select", run.root, *args)
        assert code == 2 and "unknown parameter" in err, err
    with pytest.raises(UserError, match="base and reference are both"):
        build_params(tc.TokenCleaningParams, {"reference": "base"}, "token_cleaning")
    with pytest.raises(UserError, match="rho"):
        build_params(tc.TokenCleaningParams, {"rho": "1.5"}, "token_cleaning")
    with pytest.raises(UserError, match="level"):
        build_params(tc.TokenCleaningParams, {"level": "batch"}, "token_cleaning")
    code, _, err = run_cli(
        "select",
        run.root,
        "token_cleaning",
        "--set",
        "base=current",
        "--set",
        "rho=0.6",
        "--set",
        "reference=current",
    )
    assert code == 2 and "both 'current'" in err
