"""The README's main job end to end: `winnow run recipes/quickstart.toml` on the embedded demo data and
tiny models (builds the four tiny variants on a fresh cache, about two minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, sql_json

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"
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
        "score:current",
        "score:history",
        "score:reference",
        "score:contrast",
        *SCORES,
        "dv4llm",
    }
    counts = man["steps"]["ingest"]["counts"]
    assert counts["rows_in"] == 2000 == counts["samples"] + counts["rejects"]
    n = counts["samples"]
    for name, table in man["tables"].items():
        assert not table["stale"], name
        if name.startswith(("signals/", "scores/")):
            assert table["rows"] == n, name
    assert "10 steps" in out


def test_per_token_lists_align_with_input_ids(quickstart):
    run, _ = quickstart
    for stage in SCORES:
        bad = sql_json(
            run,
            f"select count(*) n from samples s join scores_{stage} t using (sample_id) "
            "where len(t.token_score) != s.n_tokens",
        )
        assert bad == [{"n": 0}], stage
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


def test_rerun_skips_everything(quickstart):
    run, _ = quickstart
    code, out, err = run_cli("run", RECIPE, "--run-dir", run)
    assert code == 0, err[-3000:]
    man = _manifest(run)
    for key, entry in man["steps"].items():
        if "shards_written" in entry:  # scoring stages
            assert entry["shards_written"] == 0 and entry["shards_skipped"] > 0, key
        else:  # ingest and model passes
            assert entry["shards"]["computed"] == 0 and entry["shards"]["skipped"] > 0, key
