"""`winnow card`: the data card says what each selection kept and why, with numbers that match SQL."""

from __future__ import annotations

import synthetic_runs.critical_tokens as test_critical_tokens
import synthetic_runs.eu_plane as test_eu_plane
from cli_runner import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_card_reports_selections_reasons_and_meta_breakdown(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    assert run_cli("select", run.root, "critical_tokens", "--tokens", "p_ce", "--name", "cdpo")[0] == 0
    code, out, err = run_cli("card", run.root)
    assert code == 0, err
    card = (run.root / "card" / "README.md").read_text()
    assert out.strip() == str(run.root / "card" / "README.md")
    # 4 samples, only "r" kept; its 2 supervised tokens weighted by p_CE; 8 supervised tokens in all (4+2+1+1)
    assert "Kept **1 of 4** samples; **2 of 8** supervised tokens carry weight (25.0%)." in card
    assert (
        "| incorrect | 2 | 0 |" in card and "| correct | 1 | 1 |" in card and "| unlabelled | 1 | 0 |" in card
    )
    assert "By `meta_is_correct`:" in card
    assert "| True | 1 | 1 | 1 |" in card  # weighted token share of the correct sample is 2/2
    assert "### critical_tokens: `min_p_ce` per sample" in card
    assert (run.root / "card" / "selection_cdpo.png").read_bytes()[:8] == PNG
    # rerunning replaces the card in place and leaves no temporary files behind
    assert run_cli("card", run.root)[0] == 0
    assert sorted(p.name for p in (run.root / "card").iterdir()) == ["README.md", "examples", "selection_cdpo.png"]


def test_card_without_selections_says_how_to_make_one(tmp_path):
    run = test_eu_plane.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.4")[0] == 0
    code, _, err = run_cli("card", run.root, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    card = (tmp_path / "elsewhere" / "README.md").read_text()
    assert f"None yet: `winnow select {run.root} POLICY`" in card
    assert "| Q2 | 1 | 1 |" in card  # s3 is the one Q2 sample, kept
    assert (tmp_path / "elsewhere" / "eu_plane.png").read_bytes()[:8] == PNG


def test_card_of_an_empty_run_is_a_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    code, _, err = run_cli("card", tmp_path / "run")
    assert code == 2 and "winnow ingest" in err


def test_a_stale_selection_is_named_not_silently_missing(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    assert run_cli("select", run.root, "critical_tokens", "--name", "cdpo")[0] == 0
    assert run_cli("score", run.root, "critical_tokens", "--set", "threshold=0.1")[0] == 0  # new flags
    assert run_cli("card", run.root)[0] == 0
    card = (run.root / "card" / "README.md").read_text()
    assert "## Not on this card" in card and "hiding stale table selection/cdpo" in card
