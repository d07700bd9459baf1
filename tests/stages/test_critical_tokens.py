"""Critical-token contrast (cDPO): hand-computed token scores for incorrect, correct and unlabelled samples
read back through `winnow score` + `winnow inspect --sql`; label parsing; user errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.pipeline.store import UserError
from winnow.stages import critical_tokens as ct

from cli_runner import run_cli, sql_json
from synthetic_runs.critical_tokens import make_run


def test_hand_computed_scores_and_sft_mapping(tmp_path):
    run = make_run(tmp_path / "run")
    code, _, err = run_cli("score", run.root, "critical_tokens")
    assert code == 0, err
    tok = {
        (r["sample_id"], r["pos"]): (r["p"], r["s"], r["c"], r["k"])
        for r in sql_json(
            run.root,
            "SELECT sample_id, pos, critical_tokens__token_p_ce AS p, "
            "critical_tokens__token_criticality AS s, "
            "critical_tokens__token_critical AS c, critical_tokens__token_keep AS k FROM tokens",
        )
    }
    # incorrect: p_CE and criticality 1 - p, critical where p < 0.5 (0.5 itself is not), never kept;
    # prompt position 4 ignored
    assert [tok[("w", p)] for p in range(6)] == [
        (None, None, None, None),
        (0.875, 0.125, False, False),
        (0.25, 0.75, True, False),
        (0.5, 0.5, False, False),
        (None, None, None, None),
        (0.125, 0.875, True, False),
    ]
    # correct: p_CE (the chosen-side weight), kept, no criticality and no critical flag
    assert [tok[("r", p)] for p in (1, 2)] == [(0.75, None, None, True), (0.5, None, None, True)]
    assert tok[("u", 1)] == (0.25, None, None, None)  # unlabelled: p_CE is the model's, but no verdict
    assert tok[("o", 1)] == (0.0625, 0.9375, True, False)  # one-token wrong answer
    per = {
        r["sample_id"]: r
        for r in sql_json(
            run.root,
            "SELECT * EXCLUDE (token_p_ce, token_criticality, token_critical, token_keep) "
            "FROM scores_critical_tokens",
        )
    }
    assert [(per[s]["is_correct"], per[s]["keep"], per[s]["reason"]) for s in "wruo"] == [
        (False, False, "incorrect"),
        (True, True, "correct"),
        (None, None, "unlabelled"),
        (False, False, "incorrect"),
    ]
    assert per["w"]["n_critical"] == 2 and per["r"]["n_critical"] is None
    assert per["w"]["mean_p_ce"] == pytest.approx((0.875 + 0.25 + 0.5 + 0.125) / 4)
    assert per["w"]["min_p_ce"] == 0.125
    assert run.manifest()["steps"]["stage:critical_tokens"]["reasons"] == {
        "incorrect": 2,
        "correct": 1,
        "unlabelled": 1,
    }
    bad = sql_json(
        run.root,
        "SELECT count(*) AS n FROM scores_critical_tokens c JOIN samples s USING (sample_id) WHERE "
        "len(c.token_p_ce) <> len(s.input_ids) OR len(c.token_criticality) <> len(s.input_ids) OR "
        "len(c.token_critical) <> len(s.input_ids) OR "
        "len(c.token_keep) <> len(s.input_ids)",
    )
    assert bad == [{"n": 0}]


def test_string_labels_and_threshold(tmp_path):
    labels = {"w": "WRONG", "r": " correct ", "u": "", "o": "0"}
    run = make_run(tmp_path / "run", labels, label_key="meta_verdict")
    code, _, err = run_cli(
        "score", run.root, "critical_tokens", "--set", "label=meta_verdict", "--set", "threshold=0.9"
    )
    assert code == 0, err
    per = sql_json(
        run.root, "SELECT sample_id, reason, n_critical FROM scores_critical_tokens ORDER BY sample_id"
    )
    assert per == [
        {"sample_id": "o", "reason": "incorrect", "n_critical": 1},
        {"sample_id": "r", "reason": "correct", "n_critical": None},
        {"sample_id": "u", "reason": "unlabelled", "n_critical": None},
        {"sample_id": "w", "reason": "incorrect", "n_critical": 4},  # every p < 0.9
    ]


def test_user_errors(tmp_path):
    run = make_run(tmp_path / "run")
    code, _, err = run_cli("score", run.root, "critical_tokens", "--set", "label=meta_correct")
    assert code == 2 and "meta_is_correct" in err and "meta_source_kind" in err
    code, _, err = run_cli("score", run.root, "critical_tokens", "--set", "contrast=cdpo")
    assert code == 2 and "--contrast --positive" in err
    bad = make_run(
        tmp_path / "bad", labels={"w": "maybe", "r": "yes", "u": "no", "o": "no"}, label_key="meta_grade"
    )
    with pytest.raises(UserError, match="'maybe', not a correctness label"):
        ct.STEP.run(bad, ct.CriticalTokensParams(label="meta_grade"))
    with pytest.raises(ValueError, match="meta_"):
        ct.CriticalTokensParams(label="is_correct")


def test_parse_labels_types():
    correct, labelled = ct.parse_labels(pa.chunked_array([[1, 0, None, 1]]), "x")
    assert correct.tolist() == [True, False, False, True] and labelled.tolist() == [True, True, False, True]
    with pytest.raises(UserError, match="row 0 holds 2"):
        ct.parse_labels(pa.chunked_array([[2]]), "x")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 10), st.floats(0.05, 1.0), st.integers(0, 10**6))
def test_array_function_invariants(b, t, threshold, seed):
    rng = np.random.default_rng(seed)
    p = torch.from_numpy(rng.uniform(0, 1, size=(b, t)))
    mask = torch.from_numpy(rng.random((b, t)) < 0.7)
    correct = torch.from_numpy(rng.random(b) < 0.5)
    labelled = torch.from_numpy(rng.random(b) < 0.8)
    res = ct.critical_token_scores(p, mask, correct, threshold, labelled)
    good = (correct & labelled)[:, None] & mask
    bad = (~correct & labelled)[:, None] & mask
    assert torch.equal(res.p_ce[mask], p[mask]) and res.p_ce[~mask].isnan().all()
    assert torch.equal(res.criticality[bad], 1 - p[bad]) and res.criticality[~bad].isnan().all()
    assert torch.equal(res.critical, bad & (p < threshold))
    assert not (res.token_keep & ~good).any() and torch.equal(
        res.token_keep, good
    )  # never an incorrect token
