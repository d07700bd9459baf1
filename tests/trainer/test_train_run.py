"""`winnow train RUN --selection NAME`: the run path, its checks (stale, misaligned, empty selection,
other tokenizer), and the `train` step in the registry and a recipe."""

from __future__ import annotations

import json

import pytest

from winnow.core.store import RunDir

from cli_runner import run_cli
from trainer_fixtures import export_parquet, model_dir, synthetic_run

SETS = [
    "--set",
    "tokens_per_batch=256",
    "--set",
    "max_seq_len=128",
    "--set",
    "max_steps=2",
    "--set",
    "eval_fraction=0.2",
]


@pytest.fixture(scope="module")
def run_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    model = model_dir(root / "model")
    run = synthetic_run(root / "run", model)
    assert run_cli("select", run.root, "sql", "--keep", "meta_clean", "--name", "clean")[0] == 0
    assert run_cli("select", run.root, "sql", "--keep", "false", "--name", "none")[0] == 0
    return run, model


def test_trains_on_selection_into_run_and_records_manifest(run_and_model):
    run, model = run_and_model
    code, out, err = run_cli("train", run.root, "--selection", "clean", "--model", model, *SETS)
    assert code == 0, err
    res = json.loads((run.root / "train" / "clean" / "train_result.json").read_text())
    assert res["steps"] == 2 and res["eval_loss"] is not None
    assert RunDir(run.root).manifest()["steps"]["train:clean"]["steps"] == 2
    ident = json.loads((run.root / "train" / "clean" / "winnow_train.json").read_text())
    assert ident["config"]["selection"] == "clean"
    card = (run.root / "train" / "clean" / "README.md").read_text()
    assert "selection `clean`" in card
    # tied embeddings are saved once and tied again on load
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(run.root / "train" / "clean" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys and "model.norm.weight" in keys
    loaded = AutoModelForCausalLM.from_pretrained(str(run.root / "train" / "clean"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert (loaded.lm_head.weight.detach() == embed).all()
    code, _, err = run_cli("card", run.root, "--out", run.root / "card")  # the data card's training section
    assert code == 0, err
    data_card = (run.root / "card" / "README.md").read_text()
    assert "## Training" in data_card and "| train:clean | 2 |" in data_card
    assert (run.root / "card" / "training.png").stat().st_size > 1000


def test_steps_lists_train_parameters():
    code, out, _ = run_cli("steps")
    assert code == 0 and any(line.startswith("train ") for line in out.splitlines())
    for key in (
        "max_steps",
        "epochs",
        "lr",
        "warmup_steps",
        "tokens_per_batch",
        "max_seq_len",
        "grad_accum",
        "eval_fraction",
        "eval_where",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "seed",
    ):
        assert f"    {key} = " in out, key


def _refused(args, match, out):
    code, _, err = run_cli("train", *args, "--out", out, *SETS)
    assert code == 2 and match in err, err
    assert not out.exists()


def test_bad_selections_exit_2_and_write_nothing(run_and_model, tmp_path):
    run, model = run_and_model
    _refused([run.root, "--selection", "none", "--model", model], "nothing to train on", tmp_path / "a")
    _refused([run.root, "--selection", "nope", "--model", model], "no selection/nope", tmp_path / "b")
    other = tmp_path / "other_tok"  # same vocabulary size, another tokenizer
    model_dir(other)
    (other / "tokenizer.json").write_text(
        (model / "tokenizer.json").read_text().replace("<|im_end|>", "<|end|>")
    )
    _refused([run.root, "--selection", "clean", "--model", other], "different tokenizer", tmp_path / "c")
    # stale: the selection was computed from samples that have changed since
    rec = run.root / "selection" / "clean" / "_commits" / "part-00000.json"
    saved = rec.read_text()
    r = json.loads(saved)
    r["inputs"] = {k: "0" * 16 for k in r["inputs"]} or {"samples": "0" * 16}
    rec.write_text(json.dumps(r))
    try:
        _refused([run.root, "--selection", "clean", "--model", model], "is stale", tmp_path / "d")
    finally:
        rec.write_text(saved)


def test_misaligned_and_negative_weights_exit_2(run_and_model, tmp_path):
    import pyarrow.parquet as pq

    _, model = run_and_model
    path = export_parquet(tmp_path / "d.parquet", n=6)
    t = pq.read_table(path).to_pydict()
    t["token_weight"][3] = t["token_weight"][3][:-1]
    pq.write_table(__import__("pyarrow").table(t), tmp_path / "mis.parquet")
    _refused(["--data", tmp_path / "mis.parquet", "--model", model], "misaligned", tmp_path / "e")
    t["token_weight"][3] = [-0.5] * len(t["input_ids"][3])
    pq.write_table(__import__("pyarrow").table(t), tmp_path / "neg.parquet")
    _refused(["--data", tmp_path / "neg.parquet", "--model", model], "negative token weights", tmp_path / "f")


def test_eval_where_holds_out_a_sql_subset(run_and_model):
    import pyarrow.parquet as pq

    run, model = run_and_model
    code, _, err = run_cli(
        "train",
        run.root,
        "--selection",
        "clean",
        "--model",
        model,
        "--name",
        "ev",
        *SETS,
        "--set",
        "eval_where=not meta_clean",
        "--set",
        "max_steps=1",
    )
    assert code == 0, err
    res = json.loads((run.root / "train" / "ev" / "train_result.json").read_text())
    rows = [
        r for f in sorted((run.root / "samples").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    held = [r for r in rows if not r["meta_clean"] and any(r["loss_mask"][1:])]
    kept_clean = [r for r in rows if r["meta_clean"] and any(r["loss_mask"][1:])]
    assert res["counts"]["eval_samples"] == len(held) > 3
    assert res["counts"]["train_samples"] == len(kept_clean)  # the selection keeps exactly the clean ones


def test_without_selection_trains_every_supervised_token_into_train_all(run_and_model):
    run, model = run_and_model
    code, _, err = run_cli(
        "train", run.root, "--selection", "all", "--model", model, *SETS, "--set", "max_steps=1"
    )
    assert code == 0, err
    res = json.loads((run.root / "train" / "all" / "train_result.json").read_text())
    import pyarrow.parquet as pq

    masks = [
        m
        for f in sorted((run.root / "samples").glob("part-*.parquet"))
        for m in pq.read_table(f)["loss_mask"].to_pylist()
    ]
    with_target = sum(any(m[1:]) for m in masks)
    assert 10 < with_target < len(masks)
    assert res["counts"]["train_samples"] + res["counts"]["eval_samples"] == with_target


def test_a_run_without_selection_is_a_usage_error_naming_selection_all(run_and_model, tmp_path):
    """`winnow train RUN` without --selection exits 2 in one line naming `--selection all`, before the run
    is touched; a recipe's train step without one fails at load, before its first step runs."""
    run, model = run_and_model
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    code, out, err = run_cli("train", run.root, "--model", model, *SETS)
    assert code == 2 and err.count("\n") == 1 and "--selection all" in err, err
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'run_dir = "{tmp_path / "r"}"\n[[steps]]\nstep = "train"\nmodel = "{model}"\n')
    code, _, err = run_cli("run", recipe)
    assert code == 2 and 'selection = "all"' in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_the_name_all_is_only_the_selection_that_keeps_every_sample(run_and_model):
    """`--selection all` trains on every sample: a selection named `all` that drops some is refused."""
    run, _ = run_and_model
    code, _, err = run_cli("select", run.root, "sql", "--keep", "meta_clean", "--name", "all")
    assert code == 2 and "reserved for policy all" in err and err.count("\n") == 1, err
    assert not (run.root / "selection" / "all").exists()


def test_selection_all_reads_the_runs_selection_all_when_it_has_one(run_and_model):
    """`winnow select RUN all` writes selection/all; `--selection all` then trains on its weights (the model
    card names that table's digest, not the loss_mask stand-in)."""
    run, model = run_and_model
    assert run_cli("select", run.root, "all")[0] == 0
    code, _, err = run_cli("train", run.root, "--selection", "all", "--model", model, "--name", "sa", *SETS)
    assert code == 0, err
    digest = RunDir(run.root).table("selection/all").digest()
    assert f"selection `all` (digest `{digest}`)" in (run.root / "train" / "sa" / "README.md").read_text()
