"""`winnow lemo-fit` end to end on the demo run (16-token blocks: the demo's chats are ~80 tokens), its
output folder and guards, `winnow steps lemo_fit`, then `winnow train --set lemo.predictors=DIR` with LoRA
on q,k,v,o (the paper's setting)."""

from __future__ import annotations

import json

import pytest

from cli_runner import ingest_demo, run_cli

FIT = [
    "--set",
    "block=16",
    "--set",
    "steps=40",
    "--set",
    "lr=1e-3",
    "--set",
    "max_samples=40",
    "--set",
    "h2=64",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lemo")
    run = ingest_demo(root / "run")
    out = root / "pred"
    code, stdout, err = run_cli("lemo-fit", run, "--model", "builtin:tiny", "--out", out, *FIT)
    assert code == 0, err
    return run, out, stdout


def test_fit_writes_predictors_with_held_out_recall(fitted):
    from safetensors.torch import load_file

    run, out, stdout = fitted
    meta = json.loads((out / "lemo_predictors.json").read_text())
    assert meta["layers"] == [1, 2] and meta["block"] == 16 and meta["h2"] == 64  # 4 layers: n//2-1 .. n-2
    assert meta["n_heads"] * meta["head_dim"] == 128 and meta["held_out_samples"] >= 1
    assert set(meta["recall"]) == {"1", "2"} and all(0.0 <= r <= 1.0 for r in meta["recall"].values())
    assert meta["loss_last10"] < meta["loss_first"]  # the fit learned something
    state = load_file(str(out / "lemo_predictors.safetensors"))
    assert state["1.q.0.weight"].shape == (128, 16 * 32) and state["2.k.4.weight"].shape == (32, 64)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"]["lemo_fit"]["layers"] == [1, 2] and manifest["steps"]["lemo_fit"]["out"] == str(
        out
    )
    assert "held-out recall" in stdout


def test_fit_guards(fitted, tmp_path):
    run, out, _ = fitted
    code, _, err = run_cli("lemo-fit", run, "--model", "builtin:tiny", "--out", run / "lemo", *FIT)
    assert code == 2 and "inside the run" in err
    (tmp_path / "x.txt").write_text("mine")
    code, _, err = run_cli("lemo-fit", run, "--model", "builtin:tiny", "--out", tmp_path, *FIT)
    assert code == 2 and "x.txt" in err
    code, _, err = run_cli(
        "lemo-fit", run, "--model", "builtin:tiny", "--out", tmp_path / "n", "--set", "block=512"
    )
    assert code == 2 and "at least 1024 tokens" in err
    code, out_text, _ = run_cli("steps", "lemo_fit")
    assert code == 0 and "held_out = 0.2" in out_text and "block = 64" in out_text


def test_train_with_lemo_and_lora(fitted, tmp_path):
    run, out, _ = fitted
    sets = ["lora.r=4", "lora.target=q_proj,k_proj,v_proj,o_proj", f"lemo.predictors={out}", "lemo.block=16",
            "max_steps=2", "tokens_per_batch=1024", "max_seq_len=1024", "eval_max_samples=8"]  # fmt: skip
    args = ["train", run, "--selection", "all", "--model", "builtin:tiny", "--out", tmp_path / "t"]
    code, _, err = run_cli(*args, *[x for s in sets for x in ("--set", s)])
    assert code == 0, err
    recs = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    kept = [r["lemo_kept"] for r in recs if "lemo_kept" in r]
    assert len(kept) == 2 and all(0.3 < k < 0.95 for k in kept)
    ident = json.loads((tmp_path / "t" / "winnow_train.json").read_text())
    assert "lemo" in json.dumps(ident)
    code, _, err = run_cli(*args[:-1], tmp_path / "u", "--set", "lora.r=4", "--set", f"lemo.predictors={out}",
                           "--set", "lemo.block=16", "--set", "max_steps=1")  # fmt: skip
    assert code == 2 and "lora.target=q_proj,k_proj,v_proj,o_proj" in err
