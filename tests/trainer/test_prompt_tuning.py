"""Prompt tuning through peft: the trainer's gathered, padded loss equals peft's own forward.

References are computed independently of the trainer's loss path: peft's ``PeftModel`` forward in
float64 with full logits (each sample alone, or one right-padded batch with ``attention_mask`` and
``labels``, peft's own loss), against the trainer's float32 path. Tolerance 1e-5 absolute on the loss
and on the prompt gradient (entries O(0.01-1)); the prompt embedding is the only trainable tensor.
"""

from __future__ import annotations

import copy

import numpy as np
import peft  # noqa: F401  (a dev dependency: a missing peft fails here, never skips)
import pytest
import torch

from winnow.trainer import lora
from winnow.trainer.loss import WeightedLMLoss
from winnow.trainer.packing import layout_batch, plan, prepare
from winnow.trainer.prompt_tuning import PromptTuningParams, apply_prompt_tuning, shift_gather

from cli_runner import WINNOW
from trainer_fixtures import tiny_llama, weighted_samples

CPU = torch.device("cpu")
TOL = 1e-5


def _prompted(n_virtual: int, tied: bool, init: str = "random"):
    """A tiny Llama under a prompt of random fractional entries (not peft's init: a generic point)."""
    model = apply_prompt_tuning(tiny_llama(tied=tied), PromptTuningParams(num_virtual_tokens=n_virtual, init=init), CPU, "unused")
    emb = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return model


def _prompt_grad(model) -> torch.Tensor:
    return model.prompt_encoder["default"].embedding.weight.grad


def _trainer(model, ids, ws, tokens_per_batch: int, n_virtual: int):
    """The trainer's path: trim, plan with the prompt counted, padded layout, gathered weighted loss."""
    prep = prepare(ids, ws, [str(i) for i in range(len(ids))], max_seq_len=tokens_per_batch - n_virtual)
    loss_mod = WeightedLMLoss(model)
    batches = [
        layout_batch([prep.ids[i] for i in mb], [prep.weights[i] for i in mb], "padded")
        for mb in plan(prep.lengths + n_virtual, tokens_per_batch, "padded")
    ]
    wsum, total = sum(b.weight_sum for b in batches), 0.0
    for b in batches:
        assert b.input_ids.shape[0] * (b.input_ids.shape[1] + n_virtual) <= tokens_per_batch
        t = torch.as_tensor
        part = loss_mod(t(b.input_ids), t(b.gather), t(b.targets), t(b.weights))
        part.backward()
        total += float(part.detach())
    return total / wsum, _prompt_grad(model) / wsum, batches


def _reference_alone(model, ids, ws, n_virtual: int):
    """Σ w_i·(-log p(x_i | prompt, x_<i)) / Σ w over samples run one by one through peft in float64."""
    ref = copy.deepcopy(model).double()
    total, wsum = 0.0, 0.0
    for x, w in zip(ids, ws, strict=True):
        logits = ref(input_ids=torch.as_tensor(x)[None]).logits[0]
        assert logits.shape[0] == n_virtual + len(x)  # peft returns the virtual positions' logits too
        lp = torch.log_softmax(logits[n_virtual:], -1)[:-1].gather(-1, torch.as_tensor(x)[1:, None])[:, 0]
        wt = torch.as_tensor(w[1:], dtype=torch.float64)
        total = total + (wt * -lp).sum()
        wsum += float(wt.sum())
    loss = total / wsum
    loss.backward()
    return float(loss.detach()), _prompt_grad(ref)


@pytest.mark.parametrize(
    ("n_virtual", "tied", "tokens_per_batch", "seed"),
    [(1, False, 64, 1), (5, True, 96, 2), (8, False, 200, 3)],
)
def test_loss_and_prompt_gradient_equal_a_float64_peft_forward(n_virtual, tied, tokens_per_batch, seed):
    ids, ws = weighted_samples(18, seed=seed, hi=40)
    ours, g_ours, batches = _trainer(_prompted(n_virtual, tied), ids, ws, tokens_per_batch, n_virtual)
    prep = prepare(ids, ws, [str(i) for i in range(len(ids))], tokens_per_batch)
    ref, g_ref = _reference_alone(_prompted(n_virtual, tied), prep.ids, prep.weights, n_virtual)
    assert len(batches) > 2 and max(b.n_samples for b in batches) > 1  # rows of different lengths share
    assert abs(ours - ref) < TOL, (ours, ref)
    assert float((g_ours.double() - g_ref).abs().max()) < TOL
    assert float(g_ref.abs().max()) > 1e-3 and g_ref.shape[0] == n_virtual  # not vacuous


def test_equals_peft_labels_loss_on_a_right_padded_batch_with_attention_mask():
    """0/1 weights: the trainer's Σwℓ/Σw is peft's own ``labels`` loss (virtual labels -100), given the
    label of token 0 is -100 too (winnow never weighs token 0; under peft it would be predicted by the
    prompt)."""
    n_virtual = 4
    ids, ws = weighted_samples(10, seed=5, lo=6, hi=30)
    ws = [(w > 0).astype(np.float32) for w in ws]
    prep = prepare(ids, ws, [str(i) for i in range(len(ids))], 64)
    width = max(len(x) for x in prep.ids)
    inp = torch.zeros((len(prep.ids), width), dtype=torch.long)
    mask, labels = torch.zeros_like(inp), torch.full_like(inp, -100)
    for r, (x, w) in enumerate(zip(prep.ids, prep.weights, strict=True)):
        inp[r, : len(x)], mask[r, : len(x)] = torch.as_tensor(x), 1
        keep = torch.as_tensor(w > 0) & (torch.arange(len(x)) > 0)
        labels[r, : len(x)] = torch.where(keep, torch.as_tensor(x), -100)
    ref = copy.deepcopy(_prompted(n_virtual, False)).double()
    want = ref(input_ids=inp, attention_mask=mask, labels=labels).loss
    want.backward()
    ours, g_ours, _ = _trainer(_prompted(n_virtual, False), prep.ids, prep.weights, 4096, n_virtual)
    assert abs(ours - float(want)) < TOL, (ours, float(want))
    assert float((g_ours.double() - _prompt_grad(ref)).abs().max()) < TOL


def test_shift_gather_skips_the_virtual_positions_of_every_row():
    w, n = 7, 3
    flat = torch.tensor([0, 5, 7, 13, 20])  # rows 0, 0, 1, 1, 2
    want = [r * (n + w) + n + c for r, c in [(0, 0), (0, 5), (1, 0), (1, 6), (2, 6)]]
    assert shift_gather(flat, w, n).tolist() == want


def test_only_the_prompt_trains_and_the_saved_adapter_reloads(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    base_dir = tmp_path / "base"
    base = tiny_llama(tied=True)
    base.save_pretrained(str(base_dir), safe_serialization=True)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_prompt_tuning(base, PromptTuningParams(num_virtual_tokens=6), CPU, base_dir)
    emb = model.prompt_encoder["default"].embedding.weight
    vocab = lora.base_causal_lm(model).get_input_embeddings().weight
    # sample_vocab: every virtual token starts as a row of the model's own embedding matrix
    assert all(bool((vocab == row).all(-1).any()) for row in emb.detach())
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    start = emb.detach().clone()
    ids, ws = weighted_samples(6, seed=4, lo=8)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=0.05)
    loss_mod = WeightedLMLoss(model)
    for _ in range(2):
        prep = prepare(ids, ws, [str(i) for i in range(len(ids))], 64)
        b = layout_batch(prep.ids, prep.weights, "padded")
        t = torch.as_tensor
        loss_mod(t(b.input_ids), t(b.gather), t(b.targets), t(b.weights)).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(emb.detach(), start)
    base_now = lora.base_causal_lm(model).state_dict()
    assert all(torch.equal(base_now[k], v) for k, v in frozen.items())
    out = tmp_path / "out"
    lora.save_adapter(model, out, base_dir)
    assert list(load_file(out / "adapter_model.safetensors")) == ["prompt_embeddings"]
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    x = torch.as_tensor(np.stack([s[:8] for s in prep.ids]))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


# ------------------------------------------------------------------------------------- `winnow train`
SETS = ["--set", "tokens_per_batch=256", "--set", "max_seq_len=128", "--set", "eval_fraction=0.2"]
SETS += ["--set", "lr=0.1", "--set", "save_every=2", "--set", "keep_checkpoints=1", "--set", "epochs=2"]
SETS += ["--set", "prompt_tuning.num_virtual_tokens=4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from trainer_fixtures import export_parquet, model_dir

    root = tmp_path_factory.mktemp("prompt_inputs")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=40)


def _cli_args(inputs, out, *extra):
    m, d = inputs
    return ["train", "--data", d, "--model", m, "--out", out, *SETS, *extra]


def _eval_loss_of_saved_adapter(inputs, out) -> float:
    """eval_loss recomputed from the saved adapter alone: peft in float64, each held-out sample alone,
    full logits, loss_mask weights (token 0 never counts)."""
    from peft import AutoPeftModelForCausalLM

    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import load

    ev = load(TrainParams(data=str(inputs[1]), out=str(out), eval_fraction=0.2, max_seq_len=128), None).eval
    model = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float64).eval()
    total, wsum = 0.0, 0.0
    with torch.no_grad():
        for x, w in zip(ev.ids, ev.weights, strict=True):
            lp = model(input_ids=torch.as_tensor(x)[None]).logits[0, 4:].log_softmax(-1)
            nll = -lp[:-1].gather(-1, torch.as_tensor(x)[1:, None])[:, 0]
            total += float((torch.as_tensor(w[1:], dtype=torch.float64) * nll).sum())
            wsum += float(w[1:].sum())
    return total / wsum


def test_train_saves_a_prompt_that_reloads_resumes_bitwise_and_is_refused_where_unsupported(inputs, tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    from cli_runner import run_cli

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, _, err = run_cli(*_cli_args(inputs, straight))
    assert code == 0, err
    metrics = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    assert len([r for r in metrics if "loss" in r]) >= 4 and evals[-1] != evals[0]
    cfg = json.loads((straight / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4
    assert cfg["base_model_name_or_path"] == str(Path(inputs[0]).resolve())
    prompt = load_file(straight / "adapter_model.safetensors")
    assert list(prompt) == ["prompt_embeddings"]
    vocab = load_file(Path(inputs[0]) / "model.safetensors")["model.embed_tokens.weight"]
    # it trained: no virtual token is still the vocabulary row sample_vocab started it from
    assert not any(bool((vocab == row).all(-1).any()) for row in prompt["prompt_embeddings"])
    assert not (straight / "model.safetensors").exists()  # the base is not copied
    assert abs(_eval_loss_of_saved_adapter(inputs, straight) - evals[-1]) < 1e-5
    # killed after step 3 and rerun: the same prompt as the uninterrupted run, bit for bit
    env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS="3")
    args = [WINNOW, *map(str, _cli_args(inputs, killed))]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert run_cli(*_cli_args(inputs, killed))[0] == 0
    a, b = (load_file(o / "adapter_model.safetensors")["prompt_embeddings"] for o in (straight, killed))
    assert torch.equal(a, b)
    for extra, named in [
        (["--set", "layout=packed"], "layout=packed"),
        (["--set", "online=rho1"], "online=rho1"),
        (["--set", "lora_r=4"], "lora.r=4"),  # the alias; the message names the key now
    ]:
        code, _, err = run_cli(*_cli_args(inputs, tmp_path / "refused", *extra))
        assert code == 2 and named in err and "prompt_tuning.num_virtual_tokens=4" in err, err
    assert not (tmp_path / "refused").exists()
    from winnow.pipeline.errors import UserError
    from winnow.pipeline.models import load_causal_lm

    with pytest.raises(UserError, match="PROMPT_TUNING adapter"):
        load_causal_lm(straight)
