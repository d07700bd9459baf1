"""`winnow train` end to end on tiny models: output loads, reruns resume or do nothing, kill + rerun is
bitwise identical to an uninterrupted run, bad input exits 2 leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import WINNOW, run_cli
from trainer_fixtures import export_parquet, model_dir

SETS = [
    "--set",
    "tokens_per_batch=256",
    "--set",
    "max_seq_len=128",
    "--set",
    "eval_fraction=0.2",
    "--set",
    "lr=1e-2",
    "--set",
    "epochs=2",
    "--set",
    "save_every=2",
    "--set",
    "keep_checkpoints=1",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=40)


def _train(inputs, out, *extra):
    m, d = inputs
    return run_cli("train", "--data", d, "--model", m, "--out", out, *SETS, *extra)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_trains_saves_loadable_model_and_rerun_does_nothing(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, stdout, err = _train(inputs, out)
    assert code == 0, err
    rows = _metrics(out)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    steps = [r["step"] for r in rows if "loss" in r]
    assert rows[0] == {"step": 0, "eval_loss": evals[0]} and len(evals) == 2
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert evals[1] < evals[0] - 0.05  # it learned something
    for key in ("loss", "weight_sum", "tokens", "tokens_per_s", "lr", "grad_norm", "peak_rss_mb"):
        assert key in rows[1]
    model = AutoModelForCausalLM.from_pretrained(out)  # --out is a save_pretrained directory
    folder = out / "checkpoints" / f"step-{steps[-1]:08d}"
    mid = AutoModelForCausalLM.from_pretrained(folder)  # a checkpoint is a model directory too (issue 28)
    ckpt = load_file(folder / "model.safetensors")
    for (name, p), (name2, q) in zip(model.named_parameters(), mid.named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, ckpt[name]) and torch.equal(p, q), name
    assert (folder / "tokenizer.json").read_bytes() == (Path(inputs[0]) / "tokenizer.json").read_bytes()
    assert (out / "README.md").read_text().count("eval_loss") == 1 and (out / "tokenizer.json").exists()
    _check_card(out, inputs, tmp_path, "transformers")
    assert json.loads((out / "config.json").read_text())["use_cache"] is False  # as the base's config
    before = (out / "metrics.jsonl").read_text()
    code, stdout, _ = _train(inputs, out)
    assert code == 0 and "nothing to do" in stdout and (out / "metrics.jsonl").read_text() == before


def test_saved_config_keeps_the_base_use_cache(inputs, tmp_path):
    """Training switches the KV cache off (packed samples would attend to each other); the saved model
    gets the base's setting back, so generate() with a base that caches keeps caching."""
    import shutil

    m, d = inputs
    base = tmp_path / "base"
    shutil.copytree(m, base)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["use_cache"] is False  # the fixture's; this base differs from it
    (base / "config.json").write_text(json.dumps(cfg | {"use_cache": True}))
    out = tmp_path / "out"
    code, _, err = run_cli("train", "--data", d, "--model", base, "--out", out, *SETS, "--set", "max_steps=1")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_killed_run_resumes_bitwise(inputs, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _train(inputs, straight)[0] == 0
    m, d = inputs
    env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS="3")
    args = [
        WINNOW,
        "train",
        "--data",
        d,
        "--model",
        m,
        "--out",
        killed,
        *SETS,
    ]
    proc = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # SIGKILL right after optimizer step 3, before its log line
    assert [r["step"] for r in _metrics(killed)][-1] == 2 and not (killed / "model.safetensors").exists()
    code, stdout, _ = _train(inputs, killed)  # resumes from the step-2 checkpoint
    assert code == 0 and "resumed from step 2 (bitwise-identical on CPU)" in stdout
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("tokens_per_s", "weighted_tokens_per_s", "step_s", "peak_rss_mb")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(_metrics(straight)) == strip(_metrics(killed))
    # a changed parameter in the same --out is another run: refused, nothing changed
    code, _, err = _train(inputs, killed, "--set", "seed=1")
    assert code == 2 and "another training run" in err and "config" in err


def test_bad_export_inputs_exit_2_and_write_nothing(inputs, tmp_path):
    m, _ = inputs
    wide = export_parquet(tmp_path / "wide.parquet", n=10, vocab=5000)
    out = tmp_path / "o1"
    code, _, err = run_cli("train", "--data", wide, "--model", m, "--out", out)
    assert code == 2 and "does not cover token id" in err and not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _train(inputs, blocker / "out")
    assert code == 2 and "not a writable directory" in err
    code, _, err = _train(inputs, tmp_path / "o2", "--set", "lr=-1")
    assert code == 2 and "lr=-1" in err and not (tmp_path / "o2").exists()


def test_eval_loss_is_mean_over_every_supervised_held_out_token(inputs, tmp_path):
    """Step-0 eval_loss against full-logit float64 NLL averaged over loss_mask targets (not the weights)."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    m, d = inputs
    held = ["s0003", "s0010", "s0017", "s0024"]
    where = "sample_id in (" + ", ".join(f"'{s}'" for s in held) + ")"
    code, _, err = _train(inputs, tmp_path / "o", "--set", "max_steps=1", "--set", f"eval_where={where}")
    assert code == 0, err
    got = _metrics(tmp_path / "o")[0]["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(m).double()
    total, n = 0.0, 0
    for row in pq.read_table(d).to_pylist():
        if row["sample_id"] not in held:
            continue
        x = torch.tensor(row["input_ids"])[None]
        with torch.no_grad():
            lp = model(input_ids=x, use_cache=False).logits[0].log_softmax(-1)[:-1]
        nll = -lp.gather(-1, x[0, 1:, None]).squeeze(-1).numpy()
        mask = np.asarray(row["loss_mask"][1:], bool)
        assert mask.any() and not np.array_equal(mask, np.asarray(row["token_weight"][1:]) > 0)
        total, n = total + float(nll[mask].sum()), n + int(mask.sum())
    assert abs(got - total / n) < 1e-5, (got, total / n)


def test_lora_checkpoint_opens_with_peft_like_the_final_adapter(inputs, tmp_path):
    """A LoRA run's last checkpoint is peft's adapter layout: ``AutoPeftModelForCausalLM`` loads it, and its
    adapter tensors are the final adapter's (the last checkpoint is the final step)."""
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "lora"
    code, _, err = _train(inputs, out, "--set", "lora_r=4", "--set", "max_steps=2")
    assert code == 0, err
    folder = out / "checkpoints" / "step-00000002"
    assert not (folder / "config.json").exists()  # not a full model: AutoModel would misread it
    final, mid = load_file(out / "adapter_model.safetensors"), load_file(folder / "adapter_model.safetensors")
    assert final.keys() == mid.keys() and all(torch.equal(final[k], mid[k]) for k in final)
    _check_card(out, inputs, tmp_path, "peft")
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    got = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert got and any(v.abs().sum() > 0 for v in got.values())  # trained: B starts at zero
    for k, v in got.items():  # peft's loaded names carry the adapter name; the file's do not
        assert torch.equal(v, final[k.replace(".default", "")]), k


def _check_card(out: Path, inputs, tmp_path: Path, library: str) -> None:
    """The model card's Hub metadata, read back by huggingface_hub; no path of this machine in it."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    m, d = map(Path, inputs)
    assert (card.data.base_model, card.data.library_name) == (m.name, library)
    assert card.data.datasets == [d.name] and "winnow" in card.data.tags
    text = (out / "README.md").read_text()
    assert str(m.parent) not in text and str(tmp_path) not in text, text
