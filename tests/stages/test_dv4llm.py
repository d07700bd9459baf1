"""DV4LLM stage end to end on the demo data: SQL and file targets, off-topic samples ranked last."""

import json

import pytest

from cli_runner import ingest_demo, run_cli, sql_json
from stage_fixtures import decimal_count

TARGET_SQL = "sql:meta_corruption = 'none' and meta_domain = 'math' and row % 5 = 0"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return ingest_demo(tmp_path_factory.mktemp("dv") / "run")


def _auroc(pos, neg):
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_sql_targets_rank_off_topic_last(demo_run):
    code, _, err = run_cli("score", demo_run, "dv4llm", "--targets", TARGET_SQL, "--set", "budget=0.5")
    assert code == 0, err
    rows = sql_json(
        demo_run,
        "select s.meta_corruption k, d.role, d.calibrated_gradient g, d.rank, d.selected "
        "from scores_dv4llm d join samples s using (sample_id)",
    )
    targets = [r for r in rows if r["role"] == "target"]
    cands = [r for r in rows if r["role"] == "candidate"]
    n_targets = sql_json(demo_run, f"select count(*) n from samples where {TARGET_SQL[4:]}")[0]["n"]
    assert len(targets) == n_targets > 0 and all(r["g"] is None for r in targets)
    assert sorted(r["rank"] for r in cands) == list(range(len(cands)))
    # half up, computed exactly (Python's round() would round 0.5 * odd down to even)
    assert sum(r["selected"] for r in cands) == decimal_count(0.5, len(cands), "ROUND_HALF_UP")
    # the selected candidates are those with the most negative calibrated gradient (rank 0 first) ...
    chosen = [r["g"] for r in cands if r["selected"]]
    left = [r["g"] for r in cands if not r["selected"]]
    assert max(chosen) <= min(left)
    assert all(r["selected"] == (r["rank"] < len(chosen)) for r in cands)
    # ... so none of the planted off-topic samples is selected (99 of 99 would be, ranked the other way)
    assert not [r for r in cands if r["k"] == "off_topic" and r["selected"]]
    off = [r["g"] for r in cands if r["k"] == "off_topic"]
    rest = [r["g"] for r in cands if r["k"] != "off_topic"]
    assert _auroc(off, rest) >= 0.9  # off-topic pushes away from the math targets: largest gradients
    full = json.loads((demo_run / "manifest.json").read_text())
    man, n_parts = full["steps"]["stage:dv4llm"], full["tables"]["samples"]["shards"]
    assert man["counts"]["solver"]["converged"] and man["counts"]["solver"]["eps"] > 0
    assert man["counts"]["candidates"] == len(cands)
    assert (man["shards"]["computed"], man["shards"]["skipped"]) == (n_parts, 0)
    # a rerun with the same inputs writes nothing and keeps describing the output it left in place
    code, _, err = run_cli("score", demo_run, "dv4llm", "--targets", TARGET_SQL, "--set", "budget=0.5")
    assert code == 0, err
    again = json.loads((demo_run / "manifest.json").read_text())["steps"]["stage:dv4llm"]
    assert (again["shards"]["computed"], again["shards"]["skipped"]) == (0, n_parts)
    assert again["counts"] == man["counts"] and again["fingerprint"] == man["fingerprint"]


def test_file_targets_are_ingested_beside_samples(demo_run, tmp_path):
    tgt = tmp_path / "targets.jsonl"
    tgt.write_text(
        "\n".join(
            json.dumps(
                {
                    "question": f"Tom has {i} apples and buys {i + 2} more. How many?",
                    "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}",
                }
            )
            for i in range(30)
        )
    )
    code, _, err = run_cli("score", demo_run, "dv4llm", "--targets", tgt)
    assert code == 0, err
    assert sql_json(demo_run, "select count(*) n from targets")[0]["n"] == 30
    roles = sql_json(demo_run, "select role, count(*) n from scores_dv4llm group by 1")
    assert roles == [{"role": "candidate", "n": sql_json(demo_run, "select count(*) n from samples")[0]["n"]}]


def test_bad_targets_exit_2(demo_run):
    code, _, err = run_cli("score", demo_run, "dv4llm", "--targets", "sql:no_such_column = 1")
    assert code == 2 and "bad SQL condition" in err
    code, _, err = run_cli("score", demo_run, "dv4llm")
    assert code == 2 and "targets" in err
