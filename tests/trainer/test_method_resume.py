"""Every training method of issue 26 through `winnow train`: a killed and resumed run is bitwise the
uninterrupted one (weights and metrics), and each method leaves its record (winnow_train.json, metrics)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer_fixtures import export_parquet, metrics_without_timings, model_dir, train_cli

SETS = ["tokens_per_batch=256", "max_seq_len=128", "eval_fraction=0.2", "lr=1e-2", "epochs=2", "save_every=2"]
METHODS = {
    "otr": ["loss=otr", "otr.k=16", "otr.tau=1.3"],
    "dft": ["loss=dft"],
    "hft": ["hft=true", "hft.seed=3"],
    "greentrainer": ["greentrainer.rho=0.7", "greentrainer.interval=1"],
    "caft": ["caft.heads=2", "caft.beta=0.3", "caft.train_heads=true"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_inputs")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=24)


def _train(inputs, out, sets, kill_after=0):
    m, d = inputs
    return train_cli(m, d, out, SETS + sets, kill_after)


_metrics = metrics_without_timings


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_resumes_bitwise(inputs, tmp_path, method):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _train(inputs, straight, METHODS[method])
    assert proc.returncode == 0, proc.stderr
    proc = _train(inputs, killed, METHODS[method], kill_after=3)
    assert proc.returncode == -9, proc.stderr
    proc = _train(inputs, killed, METHODS[method])
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight) == _metrics(killed)
    ident = json.loads((straight / "winnow_train.json").read_text())
    assert ident["base_model_dir"] == str(inputs[0])
    if method == "hft":
        assert ident["hft"]["seed"] == 3 and len(ident["hft"]["trained"]) > 0
        start = load_file(inputs[0] / "model.safetensors")
        frozen = [k for k in start if k not in ident["hft"]["trained"]]
        assert frozen and all(torch.equal(a[k], start[k]) for k in frozen)
    if method == "caft":  # --out stays a plain model; the heads are beside it, resumed bitwise too
        assert a.keys() == load_file(inputs[0] / "model.safetensors").keys()
        ha, hb = load_file(straight / "caft_heads.safetensors"), load_file(killed / "caft_heads.safetensors")
        assert len(ha) > 0 and ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
    if method == "greentrainer":
        picks = [r for r in _metrics(straight) if "greentrainer_trained" in r]
        assert len(picks) == 2 and all(0 < r["greentrainer_bp_ratio"] <= 1 for r in picks)


def test_caft_heads_phase_then_finetune_from_its_heads(inputs, tmp_path):
    heads, fine = tmp_path / "heads", tmp_path / "fine"
    proc = _train(inputs, heads, ["caft.heads=2", "caft.phase=heads", "max_steps=3"])
    assert proc.returncode == 0, proc.stderr
    start, after = load_file(inputs[0] / "model.safetensors"), load_file(heads / "model.safetensors")
    assert all(torch.equal(start[k], after[k]) for k in start)  # the trunk and LM head stayed frozen
    trained = load_file(heads / "caft_heads.safetensors")
    proc = _train(inputs, fine, ["caft.heads=2", f"caft.heads_from={heads}", "max_steps=2"])
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    kept = load_file(fine / "caft_heads.safetensors")  # frozen in the finetune phase: the loaded heads
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)
    proc = _train(inputs, tmp_path / "bad", ["caft.heads=3", f"caft.heads_from={heads}"])
    assert proc.returncode == 2 and "caft_heads.safetensors" in proc.stderr, proc.stderr
