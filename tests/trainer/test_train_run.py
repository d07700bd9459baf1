"""`winnow train RUN --selection NAME`: the run path, its checks (stale, misaligned, empty selection,
other tokenizer), and the `train` step in the registry and a recipe."""

from __future__ import annotations

import json
import re

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
    assert re.search(r"2 steps, eval_loss \d+\.\d{4} -> \d+\.\d{4}$", out.strip()), out  # not 16 digits
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


def test_a_copied_run_resumes_its_training(run_and_model, tmp_path):
    """A training killed after step 2 (checkpoints every step), its run directory copied elsewhere: training
    the copy resumes from the checkpoint (it was refused: `differs in ['out']`) and ends with the weights of
    an uninterrupted run; winnow_train.json and the manifest name the folder relative to the run, so the
    copy's card and verify find it. An identity file in the pre-issue-28 form (absolute `out` in the hash)
    still counts as the same training."""
    import os
    import shutil
    import subprocess

    import torch
    from safetensors.torch import load_file

    from winnow.core.store import stable_hash

    from cli_runner import WINNOW

    run, model = run_and_model
    args = ["--selection", "clean", "--model", model, "--name", "cp", *SETS, "--set", "max_steps=4"]
    args += ["--set", "save_every=1"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    for where in (killed, straight):  # fresh runs: the module's run holds the other tests' trainings
        synthetic_run(where, model)
        assert run_cli("select", where, "sql", "--keep", "meta_clean", "--name", "clean")[0] == 0
    env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS="2")
    proc = subprocess.run(
        [WINNOW, "train", str(killed), *map(str, args)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(killed, copy)
    shutil.rmtree(killed)  # nothing of the original is left to read
    code, out, err = run_cli("train", copy, *args)
    assert code == 0, err
    assert "resumed from step" in out  # the newest complete checkpoint
    assert run_cli("train", straight, *args)[0] == 0
    a, b = (
        load_file(copy / "train" / "cp" / "model.safetensors"),
        load_file(straight / "train" / "cp" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ident = json.loads((copy / "train" / "cp" / "winnow_train.json").read_text())
    assert ident["out"] == "train/cp"
    assert RunDir(copy).manifest()["steps"]["train:cp"]["out"] == "train/cp"
    _, _, err = run_cli("verify", copy)  # the synthetic run has no plan.json: only the training is checked
    assert "train_result.json" not in err and "train:cp" not in err, err
    assert run_cli("card", copy)[0] == 0
    assert "| train:cp | 4 |" in (copy / "card" / "README.md").read_text()
    # the pre-issue-28 identity: `out` (absolute, of wherever it was trained) inside the hash
    old = {k: ident[k] for k in ("model", "model_fingerprint", "data", "config")} | {
        "out": "/elsewhere/train/cp"
    }
    (copy / "train" / "cp" / "winnow_train.json").write_text(json.dumps(old | {"hash": stable_hash(old)}))
    code, out, err = run_cli("train", copy, *args)
    assert code == 0 and "already trained" in out, err


def test_card_compares_trainings_on_one_named_held_out_split(run_and_model, tmp_path, monkeypatch):
    """Each training row names its held-out split; training.png has one panel per training; the return-on-
    curation chart holds the trainings of the split most share (two here), at the share of supervised
    tokens their selection weights (counted here from the Parquet lists), and names the one left off."""

    import matplotlib.figure
    import pyarrow.parquet as pq

    run, model = run_and_model
    root = tmp_path / "run"  # a fresh run: the module's run holds the other tests' trainings
    synthetic_run(root, model)
    assert run_cli("select", root, "sql", "--keep", "meta_clean", "--name", "clean")[0] == 0
    assert run_cli("select", root, "sql", "--keep", "true", "--name", "every")[0] == 0
    split = "eval_where=row % 4 = 0"
    for selection, extra in (("clean", ["--set", split]), ("every", ["--set", split]), ("clean", [])):
        name = selection + ("_w" if extra else "_f")
        code, _, err = run_cli(
            "train", root, "--selection", selection, "--model", model, "--name", name, *SETS, *extra
        )
        assert code == 0, err
    axes = {}
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, buf, **kw: (axes.setdefault(len(axes), len(fig.axes)), real(fig, buf, **kw)),
    )
    code, out, err = run_cli("card", root)
    assert code == 0, err
    md = (root / "card" / "README.md").read_text()
    assert "| train:clean_f | 2 |" in md and "| eval_fraction: 0.2 | clean |" in md
    assert "| eval_where: row % 4 = 0 | every |" in md
    assert (
        "Held-out split: `eval_where: row % 4 = 0`." in md
        and "Not on the chart" in md
        and "train:clean_f." in md
    )
    assert (root / "card" / "return_on_curation.png").stat().st_size > 1000
    mask = {
        r["sample_id"]: r["loss_mask"]
        for f in (root / "samples").glob("part-*.parquet")
        for r in pq.read_table(f).to_pylist()
    }
    supervised = sum(sum(m) for m in mask.values())
    for selection in ("clean", "every"):
        weights = [
            w
            for f in (root / "selection" / selection).glob("part-*.parquet")
            for r in pq.read_table(f).to_pylist()
            for w in r["token_weight"]
        ]
        share = sum(w > 0 for w in weights) / supervised
        assert f"| train:{selection}_w | {selection} | {share:.4g} |" in md, (share, md)
    assert 3 in axes.values()  # training.png: one panel per training
