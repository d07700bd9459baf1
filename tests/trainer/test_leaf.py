"""The trainer is a leaf: a model directory and rows held in memory in, a trained model out; no run, no
recipe, no ``builtin:`` spec (the roof's `train` step does those; here nothing of winnow.pipeline runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer_fixtures import model_dir, weighted_samples


def test_the_leaf_trains_rows_without_a_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import Dataset, Rows
    from winnow.trainer.step import train

    m = model_dir(tmp_path / "model")
    ids, ws = weighted_samples(24, vocab=802, seed=3, lo=6, hi=40)
    masks = [(np.arange(len(x)) >= 2).astype(np.float32) for x in ids]
    rows = Rows([f"s{k}" for k in range(24)], [np.asarray(x, np.int64) for x in ids], ws, masks, [True] * 24)
    held = {"s0", "s1", "s2", "s3"}
    p = TrainParams(
        model="rows in memory", max_steps=3, tokens_per_batch=256, max_seq_len=128, progress=False
    )
    done = []
    res = train(p, m, Dataset(rows, "d0", {}, held_out=held), tmp_path / "out", "leaf", on_done=done.append)

    assert done == [res] and res["steps"] == 3 and (tmp_path / "out" / "model.safetensors").is_file()
    trainable = [k for k in range(4, 24) if (ws[k][1:] != 0).any()]  # held out or weightless: not trained
    assert res["counts"]["train_samples"] == len(trainable) and res["counts"]["eval_samples"] == 4
    assert res["counts"]["weighted_tokens"] == sum(int((ws[k][1:] != 0).sum()) for k in trainable)
    # eval_loss before training: every supervised target of the held-out samples at weight 1, by hand in float64
    lm = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float64).eval()
    nll, count = 0.0, 0
    for k in range(4):
        x = torch.as_tensor(ids[k])[None]
        with torch.no_grad():
            logp = lm(input_ids=x).logits[0].log_softmax(-1)
        t = [i for i in range(1, len(ids[k])) if masks[k][i]]
        nll -= float(sum(logp[i - 1, ids[k][i]] for i in t))
        count += len(t)
    assert res["eval_loss_before"] == pytest.approx(nll / count, rel=1e-5)
