"""ssToken: hand-computed scores (multi-turn spans, all-equal REL, one-token response) read back through
`winnow score` + `winnow inspect --sql`; the identical-weights refusal; property tests."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.pipeline.store import RunDir, UserError
from winnow.stages import sstoken as ss

from cli_runner import run_cli, sql_json
from stage_fixtures import write_signals, write_synthetic_samples
from synthetic_runs.sstoken import CASES, SHARDS, _lists, make_run


def _tokens(run):
    rows = sql_json(
        run.root,
        "SELECT sample_id, pos, sstoken__rel AS rel, sstoken__token_score AS s, sstoken__token_keep AS k "
        "FROM tokens ORDER BY sample_id, pos",
    )
    return {(r["sample_id"], r["pos"]): (r["rel"], r["s"], r["k"]) for r in rows}


def test_hand_computed_scores_and_selection(tmp_path):
    run = make_run(tmp_path / "run")
    code, _, err = run_cli("score", run.root, "sstoken")
    assert code == 0, err
    got = _tokens(run)
    # a: REL [0.5, -1, 2, 0, 1] over two spans -> min-max [0.5, 0, 1, 1/3, 2/3]; score = (norm + attn) / 2
    norm = {1: 1.5 / (3 + 1e-8), 2: 0.0, 5: 3 / (3 + 1e-8), 6: 1 / (3 + 1e-8), 7: 2 / (3 + 1e-8)}
    for pos, value in norm.items():
        rel, s, _ = got[("a", pos)]
        assert rel == CASES["a"][1][pos]
        assert s == pytest.approx(0.5 * value + 0.5 * CASES["a"][2][pos], rel=1e-6)
    # k = ceil(0.6 * 5) = 3 highest: pos 5 (0.60), 7 (0.483), 6 (0.467); the attention of the prompt does not matter
    assert [p for (s, p), v in got.items() if s == "a" and v[2]] == [5, 6, 7]
    assert [p for (s, p), v in got.items() if s == "a" and v[2] is False] == [1, 2]
    assert got[("a", 0)] == got[("a", 3)] == got[("a", 4)] == (None, None, None)
    # b: all REL equal -> normalised 0 -> score = attn / 2; k = ceil(1.8) = 2: pos 3, then the earlier 0.2 tie
    assert [got[("b", p)][1] for p in (1, 2, 3)] == [
        pytest.approx(0.1),
        pytest.approx(0.1),
        pytest.approx(0.2),
    ]
    assert [p for (s, p), v in got.items() if s == "b" and v[2]] == [1, 3]
    # c: one-token response: k = ceil(0.6) = 1, kept
    assert got[("c", 1)][2] is True and got[("c", 1)][1] == pytest.approx(0.35)
    per = {
        r["sample_id"]: r
        for r in sql_json(run.root, "SELECT * EXCLUDE (rel, token_score, token_keep) FROM scores_sstoken")
    }
    assert (per["a"]["rel_min"], per["a"]["rel_max"], per["a"]["n_token_keep"]) == (-1.0, 2.0, 3)
    assert per["d"]["n_supervised"] == 0 and per["d"]["rel_min"] is None


def test_identical_weights_exit_2_with_explanation(tmp_path):
    run = make_run(tmp_path / "run", same_weights=True)
    code, _, err = run_cli("score", run.root, "sstoken")
    assert code == 2
    assert "same weights" in err and "attention alone" in err and "--alias current" in err
    # asking for attention-only explicitly is allowed (and reads no history)
    code, _, err = run_cli("score", run.root, "sstoken", "--set", "gamma=0")
    assert code == 0, err
    rows = sql_json(
        run.root,
        "SELECT sstoken__token_score AS s, sstoken__rel AS rel FROM tokens WHERE sample_id = 'b' AND pos = 3",
    )
    assert rows == [{"s": pytest.approx(0.4), "rel": None}]


def test_attention_requirements(tmp_path):
    run = make_run(tmp_path / "run", anchor="target")
    with pytest.raises(UserError, match="needs anchor 'query'"):
        ss.STEP.run(run, ss.SSTokenParams())
    # gamma = 1 needs no attention at all
    entry = ss.STEP.run(run, ss.SSTokenParams(gamma=1.0, current="current", history="history"))
    assert entry["shards"]["computed"] == 2
    ids = SHARDS[0]
    write_signals(run, "plain", 0, ids, {"logprob": [_lists(s)[1] for s in ids]}, model_fingerprint="w2")
    with pytest.raises(UserError, match="--alias plain --signals attention,logprob"):
        ss.STEP.run(run, ss.SSTokenParams(current="plain"))


def test_per_shard_freshness(tmp_path):
    run = make_run(tmp_path / "run")
    p = ss.SSTokenParams()
    assert ss.STEP.run(run, p)["shards"]["computed"] == 2
    assert ss.STEP.run(run, p)["shards"]["skipped"] == 2
    write_signals(
        run,
        "history",
        1,
        SHARDS[1],
        {"logprob": [[None, -1.0], [None, None, None]]},
        model_fingerprint="base",
    )
    entry = ss.STEP.run(run, p)
    assert (entry["shards"]["computed"], entry["shards"]["skipped"]) == (
        1,
        1,
    )  # per-sample maths: one shard redone


def _ref_select(his, cur, attn, mask, gamma, rho, attn_minmax):
    keep = np.zeros_like(mask)
    score = np.full(his.shape, np.nan)
    for b in range(his.shape[0]):
        pos = np.flatnonzero(mask[b])
        if not len(pos):
            continue
        rel = his[b, pos] - cur[b, pos]
        norm = (rel - rel.min()) / (rel.max() - rel.min() + 1e-8)
        a = attn[b, pos]
        if attn_minmax:
            a = (a - a.min()) / (a.max() - a.min() + 1e-8)
        score[b, pos] = gamma * norm + (1 - gamma) * a
        order = sorted(pos, key=lambda i: (-score[b, i], i))
        keep[b, order[: math.ceil(rho * len(pos) - 1e-9)]] = True
    return score, keep


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 12),
    st.floats(0.0, 1.0),
    st.floats(0.05, 1.0),
    st.booleans(),
    st.integers(0, 10**6),
)
def test_select_matches_reference(b, t, gamma, rho, attn_minmax, seed):
    rng = np.random.default_rng(seed)
    his = rng.uniform(0.01, 5, size=(b, t))
    cur = rng.uniform(0.01, 5, size=(b, t))
    attn = rng.uniform(0, 1, size=(b, t))
    mask = rng.random((b, t)) < 0.7
    tensors = (torch.from_numpy(x) for x in (his, cur, attn, mask))
    res = ss.sstoken_select(*tensors, gamma=gamma, rho=rho, attn_minmax=attn_minmax)
    want_score, want_keep = _ref_select(his, cur, attn, mask, gamma, rho, attn_minmax)
    np.testing.assert_allclose(res.score.numpy(), want_score, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.array_equal(res.keep.numpy(), want_keep)
    n = mask.sum(1)
    assert np.array_equal(res.keep.numpy().sum(1), [math.ceil(rho * x - 1e-9) for x in n])


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10**6))
def test_stage_lists_stay_aligned(seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp, create=True)
        rows, his, cur, att = [], [], [], []
        for i in range(int(rng.integers(1, 7))):
            n = int(rng.integers(1, 9))
            rows.append(
                {
                    "sample_id": f"x{i}",
                    "input_ids": list(range(n)),
                    "loss_mask": [0] + [int(x) for x in rng.random(n - 1) < 0.7],
                }
            )
            his.append([None] + rng.uniform(-4, 0, n - 1).tolist())
            cur.append([None] + rng.uniform(-4, 0, n - 1).tolist())
            att.append([None] + rng.uniform(0, 1, n - 1).tolist())
        ids = write_synthetic_samples(run, 0, rows)
        write_signals(run, "history", 0, ids, {"logprob": his}, model_fingerprint="h")
        write_signals(run, "current", 0, ids, {"logprob": cur, "attn_importance": att}, model_fingerprint="c")
        ss.STEP.run(run, ss.SSTokenParams())
        bad = sql_json(
            tmp,
            "SELECT count(*) AS n FROM scores_sstoken e JOIN samples s USING (sample_id) WHERE "
            "len(e.token_score) <> len(s.input_ids) OR len(e.token_keep) <> len(s.input_ids) OR "
            "len(e.rel) <> len(s.input_ids) OR list_count(e.token_score) <> s.n_loss_tokens OR "
            "n_token_keep <> ceil(0.6 * s.n_loss_tokens - 1e-9)",
        )
        assert bad == [{"n": 0}]


def test_identical_likelihoods_are_refused(tmp_path):
    """Different fingerprints but REL exactly 0 (re-saved weights): ssToken would rank by attention alone."""
    run = make_run(tmp_path / "run")
    for part, ids in SHARDS.items():
        lists = [_lists(s) for s in ids]
        write_signals(run, "history", part, ids, {"logprob": [x[1] for x in lists]}, model_fingerprint="copy")
    with pytest.raises(UserError, match="exactly 0 on all"):
        ss.STEP.run(run, ss.SSTokenParams())
    assert (
        ss.STEP.run(run, ss.SSTokenParams(gamma=0.0))["shards"]["computed"] == 2
    )  # attention only, asked for


def test_supervised_without_signal_counts_skipped_shards(tmp_path):
    run = make_run(tmp_path / "run")
    his, _, _ = _lists("a")
    his[5] = None  # one supervised token of shard 0 without a history value
    write_signals(run, "history", 0, SHARDS[0], {"logprob": [his, _lists("b")[0]]}, model_fingerprint="base")
    p = ss.SSTokenParams()
    assert ss.STEP.run(run, p)["counts"]["supervised_without_signal"] == 1
    write_signals(
        run, "history", 1, SHARDS[1], {"logprob": [[None, -1.0], [None] * 3]}, model_fingerprint="base"
    )
    entry = ss.STEP.run(run, p)  # shard 1 redone, shard 0 skipped: its missing token still counts
    assert entry["shards"]["computed"] == 1 and entry["counts"]["supervised_without_signal"] == 1
