"""LeMo through `winnow train` on packed rows with LoRA on q,k,v,o and the MLP's partial backward: a killed
and resumed run is bitwise the uninterrupted one (adapter and metrics), and the kept share is recorded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from winnow.trainer.lemo import save_predictors
from winnow.trainer.lemo_math import BlockPredictor

from trainer_fixtures import export_parquet, metrics_without_timings, model_dir, train_cli

SETS = ["tokens_per_batch=256", "max_seq_len=128", "eval_fraction=0.2", "lr=1e-2", "epochs=2", "save_every=2",
        "layout=packed", "lora.r=4", "lora.target=q_proj,k_proj,v_proj,o_proj", "lemo.block=8", "lemo.keep=0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lemo_inputs")
    torch.manual_seed(1)  # the tiny Llama: 2 layers (LeMo's default: layer 0), hidden 32, 4 heads of 8
    save_predictors(root, {0: BlockPredictor(4, 8, 8, h1=6, h2=10)},
                    {"block": 8, "n_heads": 4, "head_dim": 8, "h1": 6, "h2": 10, "layers": [0]})  # fmt: skip
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=24), root


def _train(inputs, out, kill_after=0):
    m, d, pred = inputs
    return train_cli(m, d, out, [*SETS, f"lemo.predictors={pred}"], kill_after)


_metrics = metrics_without_timings


def test_lemo_resumes_bitwise(inputs, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _train(inputs, straight)
    assert proc.returncode == 0, proc.stderr
    proc = _train(inputs, killed, kill_after=3)
    assert proc.returncode == -9, proc.stderr
    proc = _train(inputs, killed)
    assert proc.returncode == 0, proc.stderr
    a, b = (load_file(p / "adapter_model.safetensors") for p in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = _metrics(straight)
    assert rows == _metrics(killed) and len(rows) >= 4
    assert all(0.4 < r["lemo_kept"] < 1.0 for r in rows if "loss" in r)  # packed rows of short samples
    ident = json.loads((straight / "winnow_train.json").read_text())
    assert ident["lemo"] == {"layers": [0], "keep": 0.5, "mlp_keep": 0.2}
