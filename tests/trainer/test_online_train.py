"""`winnow train` with online policies, Masked Thought and LoRA, end to end on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cli_runner import WINNOW, run_cli
from trainer_fixtures import export_parquet, model_dir

SETS = ["--set", "tokens_per_batch=256", "--set", "max_seq_len=128", "--set", "eval_fraction=0.2"]
SETS += ["--set", "lr=1e-2", "--set", "save_every=2", "--set", "keep_checkpoints=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_inputs")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=40), model_dir(root / "ref", seed=1)


def _train(inputs, out, *extra):
    m, d, _ = inputs
    return run_cli("train", "--data", d, "--model", m, "--out", out, *SETS, *extra)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _train_rows(inputs, out):
    """The training samples in the trainer's order (eval split and trimming as the trainer does them)."""
    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import load

    _, d, _ = inputs
    return load(TrainParams(data=str(d), out=str(out), eval_fraction=0.2, max_seq_len=128), None).train


def test_q_tuning_step_matches_an_independent_full_logit_eu_plane(inputs, tmp_path):
    """Step 1's kept samples/tokens equal eu_plane_select on float64 full-logit NLL and entropy of the
    same 8 samples: the online scoring forward, the shared mini-batch order and the shared formula."""
    from transformers import AutoModelForCausalLM

    from winnow.stages.eu_plane_math import eu_plane_select
    from winnow.stages.topk import minibatches

    out = tmp_path / "q"
    code, _, err = _train(inputs, out, "--set", "online=q_tuning", "--set", "q_tuning.r_sample=0.5")
    assert code == 0, err
    rows = [r for r in _metrics(out) if "loss" in r]
    tr = _train_rows(inputs, out)
    assert len(rows) == int(np.ceil(len(tr.ids) / 8))  # one mini-batch of 8 per step
    first = minibatches(len(tr.ids), 8, seed=0)[0]
    model = AutoModelForCausalLM.from_pretrained(str(inputs[0]), dtype=torch.float64).eval()
    width = max(len(tr.ids[k]) for k in first)
    nll = torch.full((8, width), float("nan"), dtype=torch.float64)
    ent, mask = torch.zeros_like(nll), torch.zeros((8, width), dtype=torch.bool)
    for r, k in enumerate(first):
        ids = torch.as_tensor(tr.ids[k], dtype=torch.long)[None]
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)  # (L, V) float64
        t = torch.arange(1, ids.shape[1])
        m = torch.as_tensor(tr.weights[k][1:] > 0)
        mask[r, t[m]] = True
        nll[r, t[m]] = -logp[t[m] - 1, ids[0, t[m]]]
        ent[r, t[m]] = -(logp[t[m] - 1].exp() * logp[t[m] - 1]).sum(-1)
    want = eu_plane_select(nll, ent, mask, 0.5, 0.5)
    assert rows[0]["online_kept_samples"] == int(want.keep_sample.sum()) == 4
    assert rows[0]["online_kept_tokens"] == int(want.token_keep.sum()) == rows[0]["weighted_tokens"]
    assert [rows[0][f"q{q}"] for q in (1, 2, 3, 4)] == [int((want.quadrant == q).sum()) for q in (1, 2, 3, 4)]
    assert rows[0]["topup"] == int((want.keep_sample & (want.kept_by != 1)).sum())


def test_rho1_keeps_k_ratio_of_the_mini_batch_tokens(inputs, tmp_path):
    out = tmp_path / "rho"
    ref = inputs[2]
    code, _, err = _train(inputs, out, "--set", "online=rho1", "--set", f"rho1.reference={ref}")
    assert code == 0, err
    tr = _train_rows(inputs, out)
    batches = __import__("winnow.stages.topk", fromlist=["minibatches"]).minibatches(len(tr.ids), 8, seed=0)
    rows = [r for r in _metrics(out) if "loss" in r]
    for rec, idx in zip(rows, batches, strict=True):
        supervised = sum(int((tr.weights[k][1:] > 0).sum()) for k in idx)
        assert rec["online_kept_tokens"] == int(np.floor(0.6 * supervised + 1e-9))
    code, _, err = _train(inputs, tmp_path / "noref", "--set", "online=rho1")
    assert code == 2 and "rho1.reference" in err


def _killed_and_resumed(inputs, tmp_path, extra: list[str], kill_after: int, ckpt_file: str) -> dict:
    """An uninterrupted run and one killed after step ``kill_after`` then rerun; asserts that the last
    checkpoint before the kill holds ``ckpt_file`` and that both end with the same weights bit for bit."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, _, err = _train(inputs, straight, *extra)
    assert code == 0, err
    m, d, _ = inputs
    args = [WINNOW, "train", "--data", d, "--model", m, "--out", killed]
    env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS=str(kill_after))
    proc = subprocess.run([str(a) for a in [*args, *SETS, *extra]], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    last = kill_after - kill_after % 2  # save_every=2 in SETS
    assert (killed / "checkpoints" / f"step-{last:08d}" / ckpt_file).is_file()
    assert _train(inputs, killed, *extra)[0] == 0
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


def test_sstoken_ema_run_resumes_bitwise(inputs, tmp_path):
    """Killed after step 3 and rerun: same weights and metrics as an uninterrupted run (EMA restored)."""
    extra = ["--set", "online=sstoken", "--set", "sstoken.history=ema", "--set", "sstoken.ema_decay=0.5"]
    extra += ["--set", "sstoken.gamma=0.8", "--set", "sstoken.rho=0.3", "--set", "epochs=2"]
    extra += ["--set", "masked_thought.p=0.3", "--set", "masked_thought.warmup=0"]
    a = _killed_and_resumed(inputs, tmp_path, extra, 3, "ema_history.safetensors")
    straight = tmp_path / "straight"
    rows = [r for r in _metrics(straight) if "loss" in r]
    assert all(r["masked_thought_p"] == 0.3 and r["online_kept_tokens"] > 0 for r in rows)
    # Masked Thought changed the training inputs: the same run without it ends elsewhere
    plain = tmp_path / "nomask"
    assert _train(inputs, plain, *extra[:12])[0] == 0
    assert not all(torch.equal(load_file(plain / "model.safetensors")[k], a[k]) for k in a)


def test_sstoken_start_run_with_the_history_cache_resumes_bitwise_in_epoch_two(inputs, tmp_path):
    """history=start with the cache (the default): 3 steps per epoch, killed after step 5, resumed from
    the checkpoint of step 4 (epoch 2's first; the rest of the epoch reads the cache it carries)."""
    extra = ["--set", "online=sstoken", "--set", "sstoken.gamma=0.8", "--set", "sstoken.rho=0.3"]
    extra += ["--set", "epochs=2"]
    _killed_and_resumed(inputs, tmp_path, extra, 5, "history_cache.safetensors")
    rows = [r for r in _metrics(tmp_path / "straight") if "loss" in r]
    assert len(rows) == 6 and all(r["online_kept_tokens"] > 0 for r in rows)


def test_lora_trains_only_adapters_saves_loadable_adapter_and_merged_model(inputs, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    full, out = tmp_path / "full", tmp_path / "lora"
    assert _train(inputs, full, "--set", "max_steps=1")[0] == 0
    code, _, err = _train(inputs, out, "--set", "lora_r=4", "--set", "merge=true", "--set", "lr=5e-2")
    assert code == 0, err
    ev = lambda o: [r["eval_loss"] for r in _metrics(o) if "eval_loss" in r]  # noqa: E731
    assert ev(out)[0] == pytest.approx(ev(full)[0], abs=1e-6)  # adapters start at zero effect
    assert ev(out)[-1] < ev(out)[0]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(inputs[0]).resolve())
    ids = torch.as_tensor(pq.read_table(inputs[1]).column("input_ids")[1].as_py())[None]
    tuned = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(inputs[0])).eval()
    with torch.no_grad():
        lt, lm, lb = (x(input_ids=ids).logits for x in (tuned, merged, base))
    assert torch.allclose(lt, lm, atol=1e-5) and not torch.allclose(lt, lb, atol=1e-4)
    adapters = load_file(out / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)


def test_model_pass_scores_with_an_adapter_directory(inputs, tmp_path):
    """`winnow score --model ADAPTER_DIR` loads the base, merges the adapter and scores exactly."""
    from peft import AutoPeftModelForCausalLM

    from winnow.pipeline.store import RunDir

    from trainer_fixtures import synthetic_run

    out = tmp_path / "lora"
    code, _, err = _train(inputs, out, "--set", "lora_r=4", "--set", "lr=5e-2", "--set", "max_steps=2")
    assert code == 0, err
    run = synthetic_run(tmp_path / "run", inputs[0]).root
    code, _, err = run_cli("score", run, "--model", out, "--alias", "tuned", "--signals", "logprob")
    assert code == 0, err
    signals = RunDir(run).table("signals/tuned").read().to_pylist()
    samples = {r["sample_id"]: r for r in RunDir(run).table("samples").read().to_pylist()}
    tuned = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float64).eval()
    checked = 0
    for row in signals:
        ids = torch.as_tensor(samples[row["sample_id"]]["input_ids"])[None]
        with torch.no_grad():
            logp = tuned(input_ids=ids).logits[0].double().log_softmax(-1)
        for i, lp in enumerate(row["logprob"]):
            if lp is not None:
                assert abs(lp - float(logp[i - 1, ids[0, i]])) < 1e-4
                checked += 1
    assert checked > 20


def test_lora_with_rho1_against_the_base_resumes_bitwise(inputs, tmp_path):
    """LoRA + online Rho-1 whose reference is the base itself (adapters off, no second model): a run killed
    after step 3 and rerun ends with the same adapter as an uninterrupted one."""
    extra = ["--set", "lora_r=4", "--set", "lr=5e-2", "--set", "online=rho1", "--set", "rho1.reference=base"]
    extra += ["--set", "epochs=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, _, err = _train(inputs, straight, *extra)
    assert code == 0, err
    rows = [r for r in _metrics(straight) if "loss" in r]
    # step 1: adapters start at zero effect, so excess loss is 0 everywhere and top-k still keeps k_ratio
    assert rows[0]["online_kept_tokens"] > 0 and len(rows) >= 4
    m, d, _ = inputs
    args = [WINNOW, "train", "--data", d, "--model", m, "--out", killed]
    env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS="3")
    proc = subprocess.run([str(a) for a in [*args, *SETS, *extra]], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert _train(inputs, killed, *extra)[0] == 0
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = _train(inputs, tmp_path / "nolora", "--set", "online=rho1", "--set", "rho1.reference=base")
    assert code == 2 and "lora.r" in err
