"""EU plane (Q-Tuning): hand-computed quadrants, top-up and Eq. 7 token scores read back through
`winnow score` + `winnow inspect --sql`, and property tests of Algorithm 1's invariants."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.pipeline.params import build_params
from winnow.pipeline.store import RunDir, UserError
from winnow.stages import eu_plane as eu

from cli_runner import run_cli, sql_json
from stage_fixtures import decimal_count, write_signals, write_synthetic_samples
from synthetic_runs.eu_plane import L2, S3_NLL, make_run


def _score(run, *sets):
    code, out, err = run_cli("score", run.root, "eu_plane", *[a for s in sets for a in ("--set", s)])
    assert code == 0, err


def _samples(run):
    return {
        r["sample_id"]: r
        for r in sql_json(run.root, "SELECT * EXCLUDE (token_score, token_keep) FROM scores_eu_plane")
    }


def test_hand_computed_quadrants_with_ties(tmp_path):
    run = make_run(tmp_path / "run")
    _score(run, "r_sample=0.4")
    got = _samples(run)
    # target = round(0.4 * 5) = 2. α=0.245 keeps only s0 (Q4); α=0.3675 puts the tied PPL=2 samples s1, s2
    # exactly on ppl_lo = 2 (-> low band), s3 in Q2 and s4 in Q1: 2 kept = target, bisection stops.
    want = {
        "s0": ("Q4", True, "kept_q4"),
        "s1": ("Q3", False, "dropped_q3"),
        "s2": ("middle", False, "dropped_middle"),
        "s3": ("Q2", True, "kept_q2"),
        "s4": ("Q1", False, "dropped_q1"),
        "s5": ("unscored", False, "no_supervised_tokens"),
    }
    assert {k: (v["quadrant"], v["keep"], v["reason"]) for k, v in got.items()} == want
    assert got["s3"]["alpha"] == pytest.approx(0.3675)
    assert got["s3"]["error"] == pytest.approx(math.exp(1.6), rel=1e-6)
    assert got["s3"]["uncertainty"] == pytest.approx(2.0)
    assert got["s1"]["error"] == got["s2"]["error"] == pytest.approx(2.0, rel=1e-6)
    assert got["s5"]["error"] is None and got["s5"]["batch"] == -1
    # supp = |PPL^ - Ent^| with PPL^ = (PPL-1)/7, Ent^ = (Ent-1)/4
    assert got["s4"]["supp"] == pytest.approx(0.25, rel=1e-6)
    assert got["s3"]["supp"] == pytest.approx(abs((math.exp(1.6) - 1) / 7 - 0.25), rel=1e-6)
    assert [got[s]["n_token_keep"] for s in ("s0", "s1", "s3")] == [1, 0, 2]


def test_hand_computed_token_scores_at_span_edges(tmp_path):
    run = make_run(tmp_path / "run")
    _score(run, "r_sample=0.4")
    rows = sql_json(
        run.root,
        "SELECT pos, loss_mask, eu_plane__token_score AS s, eu_plane__token_keep AS k "
        "FROM tokens WHERE sample_id = 's3' ORDER BY pos",
    )
    v = {i: math.exp(x) for i, x in S3_NLL.items()}
    # Eq. 7 with λ = 0.5, no 1/2; a neighbour off the supervised spans is replaced by the token itself
    want = {
        2: 0.5 * v[2] + 0.5 * (v[2] + v[3]),
        3: 0.5 * v[3] + 0.5 * (v[2] + v[4]),
        4: 0.5 * v[4] + 0.5 * (v[3] + v[4]),
        7: 0.5 * v[7] + 0.5 * (v[7] + v[8]),
        8: 0.5 * v[8] + 0.5 * (v[7] + v[8]),
    }
    assert len(rows) == 10
    for r in rows:
        if r["pos"] in want:
            assert r["s"] == pytest.approx(want[r["pos"]], rel=1e-6)
        else:
            assert r["s"] is None and r["k"] is None  # null, never 0, off the supervised tokens
    # k = max(1, floor(0.5 * 5)) = 2 lowest scores: positions 4 (5.34) and 3 (5.88)
    assert [r["pos"] for r in rows if r["k"]] == [3, 4]
    assert [r["pos"] for r in rows if r["k"] is False] == [2, 7, 8]
    one = sql_json(
        run.root,
        "SELECT eu_plane__token_score AS s, eu_plane__token_keep AS k FROM tokens "
        "WHERE sample_id = 's0' ORDER BY pos",
    )
    assert one == [{"s": None, "k": None}, {"s": pytest.approx(1.5), "k": True}]  # one-token response kept


def test_topup_by_supp_then_middle(tmp_path):
    run = make_run(tmp_path / "run")
    _score(run, "r_sample=0.6")  # target 3: quadrants keep 2 at every α; top-up takes s4 (supp 0.25 > 1/7)
    got = _samples(run)
    assert {k for k, v in got.items() if v["keep"]} == {"s0", "s3", "s4"}
    assert got["s4"]["reason"] == "topup_q1" and got["s1"]["reason"] == "dropped_q3"
    assert got["s0"]["alpha"] == pytest.approx(0.49 * (1 - 2**-10))  # all 10 steps kept < target
    assert got["s4"]["n_token_keep"] == 3  # a top-up sample keeps all its tokens
    counts = run.manifest()["steps"]["stage:eu_plane"]["counts"]
    assert counts["kept_by"] == {"Q2": 1, "Q4": 1, "topup_Q1": 1, "topup_Q3": 0, "topup_middle": 0}
    assert "warnings" not in counts  # 1 of 3 from the top-up
    code, _, err = run_cli("score", run.root, "eu_plane", "--set", "r_sample=1.0")
    assert code == 0 and "warning: eu_plane: 3 of the 5 kept samples came from the top-up" in err
    got = _samples(run)
    assert got["s2"]["reason"] == "topup_middle" and got["s1"]["reason"] == "topup_q3"
    assert sum(v["keep"] for v in got.values()) == 5
    counts = run.manifest()["steps"]["stage:eu_plane"]["counts"]
    assert counts["kept_by"] == {"Q2": 1, "Q4": 1, "topup_Q1": 1, "topup_Q3": 1, "topup_middle": 1}
    assert len(counts["warnings"]) == 1


def test_simulated_batches_each_meet_their_target(tmp_path):
    run = make_run(tmp_path / "run")
    _score(run, "r_sample=0.5", "batch_size=2", "seed=3")
    rows = sql_json(
        run.root,
        "SELECT batch, count(*) AS n, count(*) FILTER (WHERE keep) AS kept FROM scores_eu_plane "
        "WHERE batch >= 0 GROUP BY batch ORDER BY batch",
    )
    # batches of 2, 2, 1 scored samples; round(0.5 * 2) = 1 and round(0.5 * 1) = 1 (half up)
    assert [(r["n"], r["kept"]) for r in rows] == [(2, 1), (2, 1), (1, 1)]


def test_rerun_skips_and_changed_input_recomputes_every_shard(tmp_path):
    run = make_run(tmp_path / "run")
    p = eu.EUPlaneParams(r_sample=0.4)
    assert eu.STEP.run(run, p)["shards"]["computed"] == 2
    again = eu.STEP.run(run, p)
    assert again["shards"]["computed"] == 0 and again["shards"]["skipped"] == 2
    assert again["reasons"]["kept_q2"] == 1
    # one signals shard changes: global quantiles -> both shards are recomputed
    write_signals(
        run,
        "current",
        0,
        ["s0", "s1", "s2"],
        {
            "logprob": [[None, 0.0], [None, -L2, -L2], [None, -L2, -L2]],
            "entropy": [[None, 5.0], [None, 1.0, 1.0], [None, 3.5, 3.5]],
        },
        model_fingerprint="m-current",
    )
    assert "scores/eu_plane" in run.stale_tables()
    first = run.manifest()["steps"]["stage:eu_plane"]["fingerprint"]
    assert eu.STEP.run(run, p)["shards"]["computed"] == 2
    assert run.stale_tables() == {}
    # the fingerprint follows the parameters, not the inputs: same here, different for another r_sample
    assert run.manifest()["steps"]["stage:eu_plane"]["fingerprint"] == first
    assert eu.STEP.run(run, eu.EUPlaneParams(r_sample=0.6))["fingerprint"] != first


def test_missing_signals_is_a_user_error_naming_the_command(tmp_path):
    run = make_run(tmp_path / "run")
    code, _, err = run_cli("score", run.root, "eu_plane", "--set", "alias=warm")
    assert code == 2 and "--alias warm --signals entropy,logprob" in err


def test_params_are_validated_with_the_key_named():
    with pytest.raises(UserError, match="r_sample=1.5"):
        build_params(eu.EUPlaneParams, {"r_sample": "1.5"}, "eu_plane")
    with pytest.raises(UserError, match="neighbour_fill"):
        build_params(eu.EUPlaneParams, {"neighbour_fill": "zero"}, "eu_plane")


# ---- array functions ------------------------------------------------------------------------------
def _ref_token_scores(nll, mask, lam, fill, mean, measure):
    """Plain-Python Eq. 7 in float64, one token at a time."""
    out = np.full(nll.shape, np.nan)
    v = np.exp(nll) if measure == "ppl" else nll.copy()
    for b in range(nll.shape[0]):
        for i in range(nll.shape[1]):
            if not mask[b, i]:
                continue
            neigh = [v[b, j] for j in (i - 1, i + 1) if 0 <= j < nll.shape[1] and mask[b, j]]
            if fill == "self":
                neigh += [v[b, i]] * (2 - len(neigh))
            total = sum(neigh) / max(len(neigh), 1) if mean else sum(neigh)
            out[b, i] = (1 - lam) * v[b, i] + lam * total
    return out


@pytest.mark.parametrize("fill", ["self", "omit"])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("measure", ["ppl", "nll"])
def test_token_scores_match_reference(fill, mean, measure):
    rng = np.random.default_rng(7)
    nll = rng.uniform(0.05, 4.0, size=(6, 13)).astype(np.float32)  # float32 in, float64 reference
    mask = rng.random((6, 13)) < 0.6
    nll_in = np.where(mask, nll, np.nan)  # values off the mask must not leak in
    got = eu.eu_token_scores(
        torch.from_numpy(nll_in),
        torch.from_numpy(mask),
        0.3,
        neighbour_fill=fill,
        neighbour_mean=mean,
        token_measure=measure,
    )
    want = _ref_token_scores(nll.astype(np.float64), mask, 0.3, fill, mean, measure)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, equal_nan=True)  # float32 arithmetic


def test_sample_stats_match_reference():
    rng = np.random.default_rng(3)
    nll = rng.uniform(0.01, 5, size=(5, 11))
    ent = rng.uniform(0.01, 3, size=(5, 11))
    mask = rng.random((5, 11)) < 0.5
    mask[2] = False
    err, unc, n = eu.eu_sample_stats(torch.from_numpy(nll), torch.from_numpy(ent), torch.from_numpy(mask))
    for b in range(5):
        if mask[b].any():
            assert err[b].item() == pytest.approx(math.exp(np.mean(nll[b][mask[b]])), rel=1e-12)
            assert unc[b].item() == pytest.approx(np.mean(ent[b][mask[b]]), rel=1e-12)
        else:
            assert math.isnan(err[b].item()) and math.isnan(unc[b].item()) and n[b] == 0


def test_sorted_quantile_is_numpy_linear_with_ties():
    x = np.array([1.0, 2.0, 2.0, 2.0, 4.0, 8.0])
    s = torch.from_numpy(np.sort(x))
    for q in np.linspace(0, 1, 41):
        assert eu.sorted_quantile(s, float(q)) == pytest.approx(np.quantile(x, q), abs=1e-12)
    assert eu.sorted_quantile(s, 0.3) == 2.0  # inside a run of ties: exactly the tied value


values = st.lists(st.integers(0, 4), min_size=1, max_size=40)  # few distinct values: many ties


@settings(max_examples=150, deadline=None)
@given(st.data(), st.floats(0.01, 1.0), st.integers(1, 12))
def test_quadrants_partition_and_topup_meets_target(data, r_sample, k_max):
    err_v = data.draw(values)
    n = len(err_v)
    unc_v = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    err = torch.tensor(err_v, dtype=torch.float64) + 1.0
    unc = torch.tensor(unc_v, dtype=torch.float64)
    q = eu.eu_quadrants(err, unc, r_sample, k_max=k_max)
    quad, by = q.quadrant.numpy(), q.kept_by.numpy()
    # the regions are those of the thresholds at the reported α (numpy quantiles), lower band on ties,
    # and every sample outside the four corners is in the middle band: a partition
    a = q.alpha
    e, u = err.numpy(), unc.numpy()
    e_hi, e_lo = e > np.quantile(e, 1 - a), e <= np.quantile(e, a)
    u_hi, u_lo = u > np.quantile(u, 1 - a), u <= np.quantile(u, a)
    corners = {eu.Q1: e_hi & u_hi, eu.Q2: e_hi & u_lo, eu.Q3: e_lo & u_lo, eu.Q4: e_lo & u_hi}
    for code, region in corners.items():
        assert np.array_equal(quad == code, region), code
    assert np.array_equal(quad == eu.MIDDLE, ~np.logical_or.reduce(list(corners.values())))
    assert q.target == decimal_count(r_sample, n, "ROUND_HALF_UP")
    assert ((by > 0).sum()) == q.target  # exactly the target after top-up
    assert np.array_equal(by == eu.BY_QUADRANT, (quad == 2) | (quad == 4))  # Q2 ∪ Q4 always kept
    extreme = (quad == 1) | (quad == 3)
    if (by == eu.BY_TOPUP_MIDDLE).any():  # the middle band is used only once Q1 ∪ Q3 is exhausted
        assert (by[extreme] == eu.BY_TOPUP_EXTREME).all()
    supp = q.supp.numpy()
    taken, left = supp[by == eu.BY_TOPUP_EXTREME], supp[extreme & (by == 0)]
    if len(taken) and len(left):
        assert taken.min() >= left.max()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8), st.integers(1, 12), st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.integers(0, 10**6)
)
def test_select_token_keep_invariants(b, t, r_sample, r_token, seed):
    rng = np.random.default_rng(seed)
    nll = torch.from_numpy(rng.uniform(0.01, 4, size=(b, t)))
    ent = torch.from_numpy(rng.uniform(0.01, 3, size=(b, t)))
    mask = torch.from_numpy(rng.random((b, t)) < 0.6)
    res = eu.eu_plane_select(nll, ent, mask, r_sample, r_token)
    keep, tk = res.keep_sample.numpy(), res.token_keep.numpy()
    m = mask.numpy()
    assert not (tk & ~m).any() and not tk[~keep].any()
    for row in range(b):
        if not keep[row]:
            continue
        if res.quadrant[row] == 2:
            k = max(1, math.floor(r_token * m[row].sum() + 1e-9))
            assert tk[row].sum() == k
            s = res.token_score[row].numpy()
            if (m[row] & ~tk[row]).any():
                assert s[tk[row]].max() <= s[m[row] & ~tk[row]].min()  # the lowest scores are kept
        else:
            assert np.array_equal(tk[row], m[row])  # Q4 and top-ups keep every supervised token


def _random_rows(rng, n):
    rows, lp, en = [], [], []
    for i in range(n):
        length = int(rng.integers(1, 9))
        mask = [0] + [int(x) for x in rng.random(length - 1) < 0.7]
        rows.append({"sample_id": f"r{i}", "input_ids": list(range(length)), "loss_mask": mask})
        lp.append([None if not m else float(-rng.uniform(0, 3)) for m in mask])
        en.append([None if not m else float(rng.uniform(0, 3)) for m in mask])
    return rows, lp, en


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 3))
def test_stage_lists_stay_aligned_with_input_ids(seed, batch_size):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp, create=True)
        for part in range(2):
            rows, lp, en = _random_rows(rng, int(rng.integers(1, 6)))
            rows = [dict(r, sample_id=f"p{part}{r['sample_id']}") for r in rows]
            ids = write_synthetic_samples(run, part, rows)
            write_signals(run, "current", part, ids, {"logprob": lp, "entropy": en})
        eu.STEP.run(run, eu.EUPlaneParams(r_sample=0.5, batch_size=batch_size))
        bad = sql_json(
            tmp,
            "SELECT count(*) AS n FROM scores_eu_plane e JOIN samples s USING (sample_id) WHERE "
            "len(e.token_score) <> len(s.input_ids) OR len(e.token_keep) <> len(s.input_ids) OR "
            "list_count(e.token_score) <> s.n_loss_tokens",
        )
        assert bad == [{"n": 0}]
