"""The step registry: derived lists, the recipe order check, a toy stage added with one register()
call, the shared shard loop and one reject-error class."""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from winnow.pipeline import steps
from winnow.pipeline.recipe import load_recipe, run_loaded
from winnow.pipeline.store import RunDir, UserError
from winnow.stages import stage_io as io

from cli_runner import run_cli, sql_json
from stage_fixtures import write_synthetic_samples

# ---- a toy scoring stage: what a new stage module holds ------------------------------------------


@dataclass
class ToyParams:
    every: int = 2  # keep supervised tokens at positions divisible by this


def run_toy(run: RunDir, p: ToyParams) -> dict:
    parts = io.samples_parts(run)
    st = io.StageOutput(run, "toy", p, "toy/1", time.time())
    for part in parts:
        inputs = io.part_inputs(run, [io.SAMPLES], part)
        if st.skip_if_fresh(part, inputs):
            continue
        shard = io.read_shard(run, part, {})
        pos = np.arange(shard.loss_mask.shape[1])[None, :]
        keep_tok = shard.loss_mask & (pos % p.every == 0)
        keep = shard.n_tokens % 2 == 1  # odd-length samples are kept
        table = pa.table(
            {
                "sample_id": shard.sample_id,
                "keep": pa.array(keep),
                "reason": pa.array(["odd" if k else "even" for k in keep]),
                "token_keep": io.to_list_array(keep_tok, shard.loss_mask, shard.n_tokens, pa.bool_()),
            }
        )
        st.commit(part, table, inputs, counts={"kept_tokens": int(keep_tok.sum())})
    return st.finish(len(parts))


STEP = steps.Step(name="toy", params=ToyParams, run=run_toy)
TOY = steps.StepSpec(
    "toy",
    "stage",
    __name__,
    reads=("samples",),
    writes=("scores/toy",),
    columns=("keep", "reason", "token_keep"),
    help="toy stage: every other supervised token",
)

ROWS = [
    {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},  # odd: kept
    {"input_ids": [4, 5, 6, 7], "loss_mask": [0, 1, 1, 1]},  # even: dropped
]
ROWS_1 = [{"input_ids": [8, 9, 10, 11, 12], "loss_mask": [0, 0, 1, 1, 1]}]  # odd: kept


@pytest.fixture
def toy():
    steps.register(TOY)
    yield TOY
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


def test_shipped_quickstart_passes_the_order_check():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml")
    steps.check_order([(s.name, p) for s, p in recipe.steps], [])


def test_lists_derived_from_the_registry():
    assert steps.score_stages() == ["eu_plane", "excess_loss", "sstoken", "critical_tokens", "dv4llm"]
    assert steps.SCORE_STAGES == tuple(steps.score_stages())
    assert steps.token_sources() == [
        "loss_mask",
        "eu_plane",
        "excess_loss",
        "sstoken",
        "critical_tokens",
        "p_ce",
    ]
    assert steps.selection_policies()[-2:] == ["all", "sql"]
    keys = {name: s.key for name, s in steps.REGISTRY.items()}
    assert set(keys) >= {"ingest", "model_pass", "select"}


def test_one_code_version_form():
    for name, s in steps.REGISTRY.items():
        version = importlib.import_module(s.module).__dict__.get("CODE_VERSION")
        if version is not None and name != "contrast_pass":  # the contrast pass shares model_pass's
            assert re.fullmatch(rf"{name}/\d+", version), (name, version)
    from winnow.pipeline.render import RENDER_VERSION

    assert re.fullmatch(r"render/\d+", RENDER_VERSION)


def test_shard_loop_counts_fresh_shards_from_their_records(tmp_path, monkeypatch):
    from winnow.pipeline import store
    from winnow.pipeline.shards import Computed, ShardLoop

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


def test_one_reject_error_class():
    from winnow.pipeline.errors import RejectError
    from winnow.pipeline.formats import RecordError
    from winnow.pipeline.render import RenderError

    assert RecordError is RejectError and RenderError is RejectError
    e = RejectError("bad_role", "role 'wizard'")
    assert (e.reason, e.detail, str(e)) == ("bad_role", "role 'wizard'", "role 'wizard'")


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
