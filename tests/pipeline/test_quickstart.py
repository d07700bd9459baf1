"""The README's main job end to end: `winnow run recipes/quickstart.toml` on the embedded demo data and
tiny models (builds the five tiny models on a fresh cache first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_runner import run_cli, sql_json

# The fixture builds the five tiny models on an empty cache (CI) and runs the whole recipe: measured 5-6 min
# at load 4 on 2 cores, over the suite's 300 s default (the timeout covers fixture setup).
pytestmark = pytest.mark.timeout(1800)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"
SCORES = ("eu_plane", "excess_loss", "sstoken", "critical_tokens")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    run = tmp_path_factory.mktemp("quickstart") / "run"
    code, out, err = run_cli("run", RECIPE, "--run-dir", run)
    assert code == 0, err[-3000:]
    return run, out


def _manifest(run):
    import json

    return json.loads((run / "manifest.json").read_text())


def test_every_step_ran_and_every_row_is_accounted_for(quickstart):
    run, out = quickstart
    man = _manifest(run)
    assert set(man["steps"]) == {
        "ingest",
        "model_pass:current",
        "model_pass:history",
        "model_pass:reference",
        "model_pass:contrast",
        *(f"stage:{s}" for s in SCORES),
        "stage:dv4llm",
        "select:quickstart",
        "select:quickstart_samples",
        "train:quickstart_samples",
    }
    counts = man["steps"]["ingest"]["counts"]
    assert counts["rows_in"] == 2000 == counts["samples"] + counts["rejects"]
    n = counts["samples"]
    for name, table in man["tables"].items():
        assert not table["stale"], name
        if name.startswith(("signals/", "scores/", "selection/")):
            assert table["rows"] == n, name
    assert "13 steps" in out
    train = man["steps"]["train:quickstart_samples"]
    assert train["steps"] > 0 and "train: eval_loss" in out
    # one epoch on the kept samples lowers the loss on held-out clean samples (1.0743 -> 1.0619 measured)
    assert train["eval_loss"] < train["eval_loss_before"]


def test_per_token_lists_align_with_input_ids(quickstart):
    run, _ = quickstart
    lists = {"critical_tokens": ["token_p_ce", "token_criticality"]}  # its two meanings, two columns
    for stage in SCORES:
        for col in lists.get(stage, ["token_score"]):
            bad = sql_json(
                run,
                f"select count(*) n from samples s join scores_{stage} t using (sample_id) "
                f"where len(t.{col}) != s.n_tokens",
            )
            assert bad == [{"n": 0}], (stage, col)
    bad = sql_json(
        run,
        "select count(*) n from samples s join signals_current c using (sample_id) "
        "where len(c.logprob) != s.n_tokens or len(c.entropy) != s.n_tokens",
    )
    assert bad == [{"n": 0}]


def test_scores_flag_the_planted_off_topic_samples(quickstart):
    """A sanity check that the scores mean something (benchmarks/quality_report.py measures more):
    off-topic answers are far from the tiny models' training text, so their PPL is high."""
    run, _ = quickstart
    rows = sql_json(
        run,
        "select s.meta_corruption k, e.error from samples s join scores_eu_plane e using (sample_id) "
        "where s.meta_corruption in ('none', 'off_topic')",
    )
    off = [r["error"] for r in rows if r["k"] == "off_topic"]
    clean = [r["error"] for r in rows if r["k"] == "none"]
    auroc = sum((o > c) + 0.5 * (o == c) for o in off for c in clean) / (len(off) * len(clean))
    assert len(off) > 50 and auroc > 0.9


def test_eu_plane_default_keeps_less_off_topic_than_clean(quickstart):
    """EU plane's default (seeded mini-batches of 8, as in the paper) keeps a smaller share of the planted
    off-topic samples than of the clean ones; one whole-dataset batch kept ~92% of them against ~18%."""
    run, _ = quickstart
    share = {
        r["k"]: r["kept"] / r["n"]
        for r in sql_json(
            run,
            "select s.meta_corruption k, count(*) n, count_if(e.keep) kept "
            "from scores_eu_plane e join samples s using (sample_id) group by 1",
        )
    }
    assert share["off_topic"] < share["none"], share
    entry = _manifest(run)["steps"]["stage:eu_plane"]
    assert entry["config"]["batch_size"] == 8
    # where the kept samples came from, as the manifest records it, matches the table's reasons
    kept_by, reasons = entry["counts"]["kept_by"], entry["reasons"]
    assert kept_by["Q2"] == reasons.get("kept_q2", 0) and kept_by["Q4"] == reasons.get("kept_q4", 0)
    for origin in ("Q1", "Q3", "middle"):
        assert kept_by[f"topup_{origin}"] == reasons.get(f"topup_{origin.lower()}", 0)


def test_rerun_skips_everything(quickstart):
    run, _ = quickstart
    before = _manifest(run)
    code, out, err = run_cli("run", RECIPE, "--run-dir", run)
    assert code == 0, err[-3000:]
    man = _manifest(run)
    for key, entry in man["steps"].items():  # every step's entry has one shape
        if key.startswith("train:"):  # no shards: a finished training run is left as it was
            assert entry == before["steps"][key], key
            continue
        assert entry["shards"]["computed"] == 0 and entry["shards"]["skipped"] > 0, key


@pytest.mark.parametrize(
    "policy, extra",
    [
        ("critical_tokens", ["--tokens", "excess_loss"]),
        ("eu_plane", []),
        ("dv4llm", []),
        ("sstoken", []),
        ("sql", ["--keep", "sample_id in (select sample_id from scores_excess_loss where mean_excess < 0)"]),
    ],
)
def test_selection_invariants_on_the_demo(quickstart, policy, extra):
    run, _ = quickstart
    code, _, err = run_cli("select", run, policy, *extra)
    assert code == 0, err
    view = f"selection_{policy}"
    (row,) = sql_json(
        run,
        "select count(*) n, count(distinct sample_id) ids, count_if(keep) kept, "
        "count_if(len(token_weight) != s.n_tokens) misaligned, "
        "count_if(list_sum(list_transform(list_zip(token_weight, loss_mask), lambda x: "
        "case when x[2] = 0 and x[1] != 0 then 1 else 0 end)) > 0) weight_off_mask, "
        "count_if((not keep) and weight_sum > 0) dropped_with_weight, "
        "count_if(keep and n_weighted = 0) kept_without_weight, "
        "sum(n_weighted)::bigint weighted, sum(n_supervised)::bigint supervised "
        f"from {view} join samples s using (sample_id)",
    )
    n = sql_json(run, "select count(*) n from samples")[0]["n"]
    assert row == {
        **row,
        "n": n,
        "ids": n,
        "misaligned": 0,
        "weight_off_mask": 0,
        "dropped_with_weight": 0,
        "kept_without_weight": 0,
    }
    # every policy prunes something; ssToken only tokens (it keeps every sample)
    assert 0 < row["weighted"] < row["supervised"]
    assert row["kept"] == n if policy == "sstoken" else 0 < row["kept"] < n
    if policy == "critical_tokens":  # cDPO for SFT: exactly the wrong answers go
        wrong = sql_json(
            run, f"select count(*) n from {view} join samples using (sample_id) where keep = meta_is_correct"
        )
        assert wrong == [{"n": n}]


def test_card_shows_what_the_quickstart_selection_dropped(quickstart):
    run, _ = quickstart
    code, _, err = run_cli("card", run)
    assert code == 0, err
    card = (run / "card" / "README.md").read_text()
    assert (
        "### `quickstart` (policy `dv4llm,critical_tokens,sql`)" in card and "By `meta_corruption`:" in card
    )
    # the composition's reasons name the policy that dropped each sample
    assert "| dv4llm:not_selected |" in card and "| critical_tokens:incorrect |" in card
    assert "| sql:sql_drop |" in card and "A composition:" in card and "Kept by origin (" in card
    kept = {
        r["k"]: r
        for r in sql_json(
            run,
            "select meta_corruption k, count(*) n, count_if(keep) kept from selection_quickstart "
            "join samples using (sample_id) group by 1",
        )
    }
    # the planted corruptions go: no off-topic sample, at most 5% of the junk-span ones (they were 99/99 and
    # 139/139 with critical_tokens alone), while a third or more of the clean samples stay
    assert kept["off_topic"]["kept"] == 0 and kept["off_topic"]["n"] > 50
    assert kept["junk_span"]["kept"] <= 0.05 * kept["junk_span"]["n"]
    assert kept["none"]["kept"] >= kept["none"]["n"] / 3
    # the card's breakdown matches SQL: both wrong-answer kinds are dropped entirely
    for kind in ("wrong_final_answer", "wrong_step"):
        (row,) = sql_json(
            run,
            "select count(*) n, count_if(keep) k from selection_quickstart join samples using (sample_id) "
            f"where meta_corruption = '{kind}'",
        )
        assert row["n"] > 100 and row["k"] == 0
        assert f"| {kind} | {row['n']} | 0 | 0 |" in card
