"""The step registry: derived lists, the recipe order check, a toy stage added with one register()
call, the shared shard loop and one reject-error class."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from winnow.core.store import RunDir, UserError
from winnow.pipeline import steps
from winnow.pipeline.recipe import load_recipe, run_loaded

import toy_stage
from cli_runner import WINNOW, run_cli, sql_json
from stage_fixtures import write_synthetic_samples

# ---- a toy scoring stage (tests/support/toy_stage.py: what a new stage module holds) ---------------
ROWS = [
    {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},  # odd: kept
    {"input_ids": [4, 5, 6, 7], "loss_mask": [0, 1, 1, 1]},  # even: dropped
]
ROWS_1 = [{"input_ids": [8, 9, 10, 11, 12], "loss_mask": [0, 0, 1, 1, 1]}]  # odd: kept


@pytest.fixture
def toy():
    spec = steps.register_stage(toy_stage.STAGE, "toy_stage")
    yield spec
    steps.unregister("toy")


def _run(path) -> RunDir:
    run = RunDir(path, create=True)
    write_synthetic_samples(run, 0, ROWS)
    write_synthetic_samples(run, 1, ROWS_1)
    return run


def test_a_registered_stage_reaches_cli_select_recipe_check_and_card(tmp_path, toy):
    from winnow.pipeline.card import write_card

    run = _run(tmp_path / "run")
    assert "toy" in steps.score_stages() and "toy" in steps.token_sources()
    assert "toy" in steps.selection_policies()
    code, _, err = run_cli("score", run.root, "toy")
    assert code == 0, err
    entry = run.manifest()["steps"]["stage:toy"]
    assert entry["shards"] == {"total": 2, "computed": 2, "skipped": 0, "by_rank": [2]}
    assert entry["counts"] == {"kept_tokens": 1 + 1 + 2}  # positions 2 | 2 | 2, 4
    code, _, err = run_cli("select", run.root, "toy", "--tokens", "toy")
    assert code == 0, err
    got = sql_json(run.root, "select sample_id, keep, token_weight from selection_toy order by sample_id")
    # by hand: sample kept when its length is odd; weight 1 on supervised tokens at even positions
    assert [(r["keep"], r["token_weight"]) for r in got] == [
        (True, [0, 0, 1]),
        (False, [0, 0, 0, 0]),
        (True, [0, 0, 1, 0, 1]),
    ]
    card = write_card(run.root).read_text()
    section = card[card.index("### toy") :]
    assert "toy stage: every other supervised token" in section
    assert "| 3 | 2 | 8 | 4 |" in section  # samples, kept, supervised tokens (2 + 3 + 3), kept tokens
    # the recipe check knows what the toy stage writes and who provides it
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "select"\npolicy = "all"\ntokens = "toy"\n')
    fresh = _fresh_samples(tmp_path / "fresh")
    with pytest.raises(UserError, match=r"select reads scores/toy.*add a toy step before it"):
        run_loaded(load_recipe(recipe), str(fresh.root))
    recipe.write_text(
        '[[steps]]\nstep = "toy"\n\n[[steps]]\nstep = "select"\npolicy = "all"\ntokens = "toy"\n'
    )
    results = run_loaded(load_recipe(recipe), str(fresh.root))
    assert set(results) == {"stage:toy", "select:all"}


def test_stage_entry_point(tmp_path):
    """A plugin: a stage module plus ``toy-0.0.dist-info/entry_points.txt`` (group ``winnow.stages``) on a
    subprocess's PYTHONPATH, no install: the stage is in `score --help`, `select --tokens`, the recipe
    check and the card."""
    site = tmp_path / "site"
    (site / "toy-0.0.dist-info").mkdir(parents=True)
    (site / "winnow_toy_plugin.py").write_text(Path(toy_stage.__file__).read_text())
    (site / "toy-0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy\nVersion: 0.0\n")
    (site / "toy-0.0.dist-info" / "entry_points.txt").write_text("[winnow.stages]\ntoy = winnow_toy_plugin\n")
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250"}  # the stage list on one line

    def winnow(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([WINNOW, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)

    got = winnow("score", "--help")
    assert got.returncode == 0 and "critical_tokens|dv4llm|token_cleaning|toy" in "".join(got.stdout.split()), got.stdout
    run = _run(tmp_path / "run")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "select"\npolicy = "all"\ntokens = "toy"\n')
    got = winnow("run", recipe, "--run-dir", run.root)  # the recipe check: nothing wrote scores/toy yet
    assert got.returncode == 2 and "select reads scores/toy: add a toy step before it" in got.stderr, (
        got.stderr
    )
    got = winnow("score", run.root, "toy", "--set", "every=1")
    assert got.returncode == 0, got.stderr
    got = winnow("select", run.root, "toy", "--tokens", "toy")
    assert got.returncode == 0, got.stderr
    rows = sql_json(run.root, "select keep, token_weight from selection_toy order by sample_id")
    # by hand, every=1: odd-length samples kept with weight 1 on every supervised token
    assert [(r["keep"], r["token_weight"]) for r in rows] == [
        (True, [0, 1, 1]),
        (False, [0, 0, 0, 0]),
        (True, [0, 0, 1, 1, 1]),
    ]
    assert "toy" not in steps.REGISTRY  # the plugin lives in the subprocesses only
    got = winnow("card", run.root)
    assert got.returncode == 0, got.stderr
    card = (run.root / "card" / "README.md").read_text()
    assert "### toy\n\ntoy stage: every other supervised token" in card
    assert "| 3 | 2 | 8 | 8 |" in card  # samples, kept, scored tokens, kept tokens (every=1: all 8)


def _fresh_samples(path) -> RunDir:
    run = RunDir(path, create=True)
    write_synthetic_samples(run, 0, ROWS)
    return run


def test_recipe_order_is_checked_before_any_step_runs(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[steps]]\nstep = "ingest"\ninputs = ["builtin:demo"]\n\n'
        '[[steps]]\nstep = "model_pass"\nmodel = "builtin:tiny"\nalias = "current"\n'
        'signals = ["logprob", "attention"]\n\n'
        '[[steps]]\nstep = "sstoken"\nhistory = "history"\n'
    )
    code, _, err = run_cli("run", recipe, "--run-dir", tmp_path / "run")
    assert code == 2
    assert "steps[2] sstoken reads signals/history: add a model_pass with alias = history before it" in err
    assert not (tmp_path / "run" / "samples").exists()  # nothing ran
    # a table the run already holds satisfies the check: here samples for a stage's recipe
    run = _fresh_samples(tmp_path / "held")
    recipe.write_text('[[steps]]\nstep = "eu_plane"\nalias = "base"\n')
    with pytest.raises(UserError, match=r"eu_plane reads signals/base: add a model_pass with alias = base"):
        run_loaded(load_recipe(recipe), str(run.root))
    # sstoken with gamma = 0 reads no history model
    recipe.write_text('[[steps]]\nstep = "sstoken"\ngamma = 0.0\n')
    with pytest.raises(UserError, match=r"sstoken reads signals/current: add a model_pass step before it"):
        run_loaded(load_recipe(recipe), str(run.root))
    with pytest.raises(UserError, match=r"reads samples: add an ingest step before it"):
        steps.check_order([("sstoken", load_recipe(recipe).steps[0][1])], [])


def test_dv4llm_reads_file_targets_through_the_store():
    """A file of targets is the ingest step's `targets/` table: the check names that step; sql: targets
    read nothing but samples."""
    from winnow.core.ingest import IngestParams
    from winnow.stages.dv4llm import DV4LLMParams

    file_targets = DV4LLMParams(targets="targets.jsonl")
    with pytest.raises(
        UserError, match=r"dv4llm reads targets: add an ingest with table = targets before it"
    ):
        steps.check_order([("dv4llm", file_targets)], ["samples"])
    ingest = IngestParams(inputs=["targets.jsonl"], table="targets")
    steps.check_order([("ingest", ingest), ("dv4llm", file_targets)], ["samples"])
    assert steps.spec("dv4llm").tables_read(DV4LLMParams(targets="sql:row = 1")) == ["samples"]


def test_shipped_quickstart_passes_the_order_check():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml")
    steps.check_order([(s.name, p) for s, p in recipe.steps], [])


def test_one_code_version_form():
    for name, s in steps.REGISTRY.items():
        version = importlib.import_module(s.module).__dict__.get("CODE_VERSION")
        if version is not None and name != "contrast_pass":  # the contrast pass shares model_pass's
            assert re.fullmatch(rf"{name}/\d+", version), (name, version)
    from winnow.core.render import RENDER_VERSION

    assert re.fullmatch(r"render/\d+", RENDER_VERSION)


def test_shard_loop_counts_fresh_shards_from_their_records(tmp_path, monkeypatch):
    from winnow.core import store
    from winnow.core.shards import Computed, ShardLoop

    hooks = []
    monkeypatch.setattr(store, "_fault_hook", lambda: hooks.append(1))
    run = RunDir(tmp_path / "run", create=True)
    outs = [run.table("a"), run.table("b")]

    def compute(part, n):
        t = pa.table({"x": list(range(n))})
        return Computed((t, t), counts={"rows": n})

    first = ShardLoop(outs, "fp", 3).run([(0, 2), (1, 3), (2, 4)], compute)
    assert (first.counts["rows"], len(hooks)) == (9, 3)  # the fault hook once per shard, not per table
    outs[1].uncommit(1)  # one output of shard 1 lost: that shard is not fresh
    again = ShardLoop(outs, "fp", 3).run([(0, 2), (1, 3), (2, 4)], compute)
    assert again.summary() == {"total": 3, "computed": 1, "skipped": 2, "by_rank": [1]}
    assert again.counts["rows"] == 9 and len(hooks) == 4
    other = ShardLoop(outs, "fp2", 3).run([(0, 2)], compute, inputs=lambda part: {"x": "1"})
    assert other.computed == [0]


def test_train_declares_the_online_tables_it_records():
    from winnow.pipeline.steps import spec as step_spec
    from winnow.trainer.config import TrainParams

    spec = step_spec("train")
    from winnow.trainer.online_params import OnlineParams

    recorded = OnlineParams(policy="q_tuning", record_weights=True)
    on = TrainParams(model="m", selection="keep", online=recorded, epochs=2)
    assert spec.tables_written(on) == ["selection/online-keep-epoch1", "selection/online-keep-epoch2"]
    named = TrainParams(model="m", name="run1", online=OnlineParams(policy="all", record_weights=True))
    assert spec.tables_written(named) == ["selection/online-run1-epoch1"]
    assert spec.tables_written(TrainParams(model="m", online=OnlineParams(policy="q_tuning"))) == []
