"""`winnow select`: scores -> keep + token_weight, read back through `winnow inspect --sql`; the sample and
token halves combine; user errors exit 2 naming the fix; reruns skip and changed scores reselect."""

from __future__ import annotations

import json
import re

import pytest

import synthetic_runs.critical_tokens as test_critical_tokens
import synthetic_runs.eu_plane as test_eu_plane
from cli_runner import run_cli, sql_json


def _select(run, *args):
    code, out, err = run_cli("select", run, *args)
    assert code == 0, err
    return out


def _rows(run, view):
    return {r["sample_id"]: r for r in sql_json(run, f"select * from {view}")}


def test_eu_plane_policy_keeps_the_quadrants_and_their_tokens(tmp_path):
    run = test_eu_plane.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.4")[0] == 0
    out = _select(run.root, "eu_plane")
    assert "selection/eu_plane: kept 2 of 6 samples" in out
    sel = _rows(run.root, "selection_eu_plane")
    scores = _rows(run.root, "scores_eu_plane")
    assert {s: (r["keep"], r["reason"]) for s, r in sel.items()} == {
        "s0": (True, "kept_q4"),
        "s1": (False, "dropped_q3"),
        "s2": (False, "dropped_middle"),
        "s3": (True, "kept_q2"),
        "s4": (False, "dropped_q1"),
        "s5": (False, "no_supervised_tokens"),
    }
    checked = 0
    for sid, r in sel.items():
        mask = sql_json(run.root, f"select loss_mask from samples where sample_id = '{sid}'")[0]["loss_mask"]
        keep = scores[sid]["token_keep"]
        want = [float(m == 1 and r["keep"] and bool(k)) for m, k in zip(mask, keep, strict=True)]
        assert r["token_weight"] == want, sid
        assert r["n_weighted"] == sum(w > 0 for w in want) and r["weight_sum"] == sum(want)
        checked += sum(want) > 0
    assert checked == 2
    # Q2 prunes tokens: s3 keeps 2 of its 5 supervised tokens (k = floor(0.5 * 5))
    assert (sel["s3"]["n_supervised"], sel["s3"]["n_weighted"]) == (5, 2)


def test_tokens_view_names_follow_one_rule(tmp_path):
    """`<name>__<column>` for every table: selection/eu_plane beside scores/eu_plane is eu_plane__token_weight
    beside eu_plane__token_score (it was selection_eu_plane__token_weight), and a hyphen becomes '_' in both
    the view (selection_my_sel) and the column (my_sel__token_weight). Values by hand from the Parquet."""
    import pyarrow.parquet as pq

    run = test_eu_plane.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.4")[0] == 0
    _select(run.root, "eu_plane")
    _select(run.root, "sql", "--keep", "sample_id <> 's0'", "--name", "my-sel")
    want = {}
    for name in ("eu_plane", "my-sel"):
        for f in sorted((run.root / "selection" / name).glob("part-*.parquet")):
            for r in pq.read_table(f).to_pylist():
                want.update({(name, r["sample_id"], i): w for i, w in enumerate(r["token_weight"])})
    rows = sql_json(
        run.root,
        "select sample_id, pos, eu_plane__token_weight a, my_sel__token_weight b, eu_plane__token_score c "
        "from tokens",
    )
    assert len(rows) == len(want) // 2  # eu_plane__token_score (c) is there too: the query names it
    assert {(r["sample_id"], r["pos"]): (r["a"], r["b"]) for r in rows} == {
        (sid, i): (w, want[("my-sel", sid, i)]) for (n, sid, i), w in want.items() if n == "eu_plane"
    }
    assert sql_json(run.root, "select count(*) n from selection_my_sel")[0]["n"] == 6


def test_console_lines_are_key_value_pairs_without_python_reprs(tmp_path):
    """`score` and `select` print key=value (nested keys dotted), floats to 4 significant digits: no dict
    repr, no 16-digit float. The reasons by hand: one sample each (the quadrants of the test above)."""
    run = test_eu_plane.make_run(tmp_path / "run")
    code, out, err = run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.4")
    assert code == 0, err
    assert out.startswith("step=eu_plane shards.total=2 shards.computed=2 shards.skipped=0 "), out
    assert not re.search(r"[{}'\[]|\d\.\d{5,}", out), out
    assert all(re.fullmatch(r"[\w.]+=[\w.,:-]+", pair) for pair in out.split()), out
    out = _select(run.root, "eu_plane")
    pairs = dict(p.split("=") for p in out.strip().split("; reasons ")[1].split())
    assert pairs == dict.fromkeys(
        ["kept_q4", "dropped_q3", "dropped_middle", "kept_q2", "dropped_q1", "no_supervised_tokens"], "1"
    ), out
    from winnow.pipeline.cli import plain  # dv4llm's solver counts hold floats: 4 significant digits

    got = plain({"eps": 0.09331234567, "solver": {"by_rank": [1, 2], "converged": True}, "empty": {}})
    assert got == "eps=0.09331 solver.by_rank=1,2 solver.converged=true empty=none"


def test_critical_tokens_policy_with_p_ce_weights_and_sql(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    _select(run.root, "critical_tokens", "--tokens", "p_ce", "--name", "cdpo")
    sel = _rows(run.root, "selection_cdpo")
    assert {s: (r["keep"], r["reason"]) for s, r in sel.items()} == {
        "w": (False, "incorrect"),
        "r": (True, "correct"),
        "u": (False, "unlabelled"),
        "o": (False, "incorrect"),
    }
    assert sel["r"]["token_weight"] == [0.0, 0.75, 0.5]  # p_CE on the supervised tokens, 0 on the prompt
    assert sel["w"]["token_weight"] == [0.0] * 6 and sel["r"]["policy"] == "critical_tokens"
    # the tokens view carries the weights position by position
    tok = sql_json(
        run.root, "select pos, cdpo__token_weight w from tokens where sample_id = 'r' order by pos"
    )
    assert [t["w"] for t in tok] == [0.0, 0.75, 0.5]

    _select(run.root, "sql", "--keep", "meta_is_correct is not false")
    sql = _rows(run.root, "selection_sql")
    assert {s: (r["keep"], r["reason"]) for s, r in sql.items()} == {
        "w": (False, "sql_drop"),
        "r": (True, "sql_keep"),
        "u": (True, "sql_keep"),  # null label: `is not false` keeps it
        "o": (False, "sql_drop"),
    }
    assert sql["u"]["token_weight"] == [0.0, 1.0]  # default token half: every supervised token


def test_a_kept_sample_with_no_selected_token_is_dropped_with_a_reason(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    _select(run.root, "all", "--tokens", "p_ce")  # p_CE weights exist only on correct samples
    sel = _rows(run.root, "selection_all")
    assert {s: r["reason"] for s, r in sel.items()} == {
        "w": "no_token_weight",
        "r": "all",
        "u": "no_token_weight",
        "o": "no_token_weight",
    }
    assert [s for s, r in sel.items() if r["keep"]] == ["r"]


def test_rerun_skips_and_rescored_input_reselects(tmp_path):
    run = test_eu_plane.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.4")[0] == 0
    _select(run.root, "eu_plane")
    man = json.loads((run.root / "manifest.json").read_text())["steps"]["select:eu_plane"]
    assert (man["shards"]["computed"], man["counts"]["kept"]) == (2, 2)
    _select(run.root, "eu_plane")
    again = json.loads((run.root / "manifest.json").read_text())["steps"]["select:eu_plane"]
    assert (again["shards"]["computed"], again["shards"]["skipped"], again["counts"]) == (0, 2, man["counts"])
    assert run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.8")[0] == 0
    out = _select(run.root, "eu_plane")
    assert "kept 4 of 6" in out


def test_another_configuration_under_a_name_is_refused_without_force(tmp_path):
    """select --name X again: the same parameters are a no-op (0 shards computed); other ones exit 2 in one
    line naming the differing parameter and --force, leaving selection/X as it was; --force replaces it."""
    run = test_eu_plane.make_run(tmp_path / "run")
    _select(run.root, "sql", "--keep", "true", "--name", "x")
    shards = sorted((run.root / "selection" / "x").glob("part-*.parquet"))
    before = {f: f.read_bytes() for f in shards}
    out = _select(run.root, "sql", "--keep", "true", "--name", "x")
    assert "kept 5 of 6" in out  # the sixth has no supervised token: dropped as no_token_weight
    assert (
        json.loads((run.root / "manifest.json").read_text())["steps"]["select:x"]["shards"]["computed"] == 0
    )
    code, _, err = run_cli("select", run.root, "sql", "--keep", "false", "--name", "x")
    assert code == 2 and err.count("\n") == 1 and "differs in keep" in err and "--force" in err, err
    assert {f: f.read_bytes() for f in shards} == before
    out = _select(run.root, "sql", "--keep", "false", "--name", "x", "--force")
    assert "kept 0 of 6" in out


@pytest.mark.parametrize(
    "args, match",
    [
        (["nope"], "unknown policy"),
        (["sql"], "policy sql needs --set keep"),
        (["eu_plane", "--keep", "true"], "other policies take no keep"),
        (["all", "--tokens", "bogus"], "tokens='bogus'"),
        (["eu_plane"], "winnow score .* eu_plane"),
        (["all", "--tokens", "sstoken"], "winnow score .* sstoken"),
        (["sql", "--keep", "no_such_column > 1"], "bad SQL condition"),
        (["all", "--name", "../x"], "name='../x'"),
    ],
)
def test_user_errors_exit_2(tmp_path, args, match):
    run = test_critical_tokens.make_run(tmp_path / "run")
    code, _, err = run_cli("select", run.root, *args)
    assert code == 2
    assert re.search(match, err), err


def test_composed_policies_keep_what_every_one_keeps(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    out = _select(run.root, "sql,critical_tokens", "--keep", "sample_id in ('w', 'r')")
    assert "selection/sql_and_critical_tokens: kept 1 of 4 samples" in out
    sel = _rows(run.root, "selection_sql_and_critical_tokens")
    # a dropped sample carries the reason of the FIRST listed policy that dropped it
    assert {s: (r["keep"], r["reason"]) for s, r in sel.items()} == {
        "w": (False, "critical_tokens:incorrect"),
        "r": (True, "sql_keep+correct"),
        "u": (False, "sql:sql_drop"),
        "o": (False, "sql:sql_drop"),
    }
    assert sel["r"]["policy"] == "sql,critical_tokens" and sel["r"]["token_weight"] == [0.0, 1.0, 1.0]
    _select(
        run.root,
        "critical_tokens,sql",
        "--keep",
        "sample_id in ('w', 'r')",
        "--tokens",
        "p_ce",
        "--name",
        "c",
    )
    sel = _rows(run.root, "selection_c")
    assert {s: r["reason"] for s, r in sel.items()} == {
        "w": "critical_tokens:incorrect",
        "r": "correct+sql_keep",
        "u": "critical_tokens:unlabelled",
        "o": "critical_tokens:incorrect",
    }
    assert sel["r"]["token_weight"] == [0.0, 0.75, 0.5]


@pytest.mark.parametrize(
    "policy, match", [("critical_tokens,nope", "unknown policy 'nope'"), ("all,all", "lists a policy twice")]
)
def test_bad_compositions_exit_2(tmp_path, policy, match):
    run = test_critical_tokens.make_run(tmp_path / "run")
    code, _, err = run_cli("select", run.root, policy)
    assert code == 2 and re.search(match, err), err


def test_sql_errors_that_are_not_a_bad_condition_are_not_reported_as_one(tmp_path):
    from winnow.core.store import UserError
    from winnow.stages import select_policy as sp

    from stage_fixtures import write_signals

    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    keep = "sample_id in (select sample_id from scores_critical_tokens where keep)"
    # a stale table is hidden from the views: say so, not "bad SQL condition"
    ids = test_critical_tokens.SHARDS[0]
    write_signals(run, "contrast", 0, ids, {"p_ce": [[None, 0.5, 0.5, 0.5, 0.5, 0.5], [None, 0.5, 0.5]]})
    code, _, err = run_cli("select", run.root, "sql", "--keep", keep)
    assert code == 2 and "bad SQL condition" not in err and "stale table scores/critical_tokens" in err, err
    # a corrupt Parquet shard is caught by the checksum before any SQL runs: named as such, never as
    # "bad SQL condition"
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    path = run.table("scores/critical_tokens").part_path(1)
    data = path.read_bytes()
    path.write_bytes(data[:-8] + b"\0" * 8)  # same size, footer and magic gone
    with pytest.raises(UserError) as info:
        sp.STEP.run(run, sp.SelectParams(policy="sql", keep=keep))
    assert "checksum" in str(info.value) and "bad SQL condition" not in str(info.value)
