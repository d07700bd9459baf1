"""The learning-rate schedule is transformers' warmup + cosine to ``lr * min_lr_ratio``
(``get_cosine_with_min_lr_schedule_with_warmup_lr_rate``), checked through `winnow train`'s metrics.jsonl
against the formula written out here; and why not ``get_cosine_with_min_lr_schedule_with_warmup``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_runner import run_cli
from trainer_fixtures import export_parquet, model_dir


def _by_hand(step: int, warmup: int, total: int, lr: float, floor: float) -> float:
    if step < warmup:  # linear from lr / warmup at step 0 to lr at the last warmup step
        return lr * (step + 1) / warmup
    progress = (step - warmup + 1) / (total - warmup)  # 1 at the last step: lr * floor exactly
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("warmup, total", [(2, 7), (0, 5), (3, 4)])
def test_train_steps_with_the_schedule_by_hand(tmp_path, warmup, total):
    m, d = model_dir(tmp_path / "model"), export_parquet(tmp_path / "data.parquet", n=24)
    sets = ["tokens_per_batch=256", "max_seq_len=128", "eval_fraction=0.2", "lr=0.003", "min_lr_ratio=0.25"]
    sets += [f"warmup_steps={warmup}", f"max_steps={total}", "epochs=1000"]
    args = [x for kv in sets for x in ("--set", kv)]
    code, _, err = run_cli("train", "--data", d, "--model", m, "--out", tmp_path / "o", *args)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    got = [r["lr"] for r in rows if "lr" in r]
    want = [_by_hand(s, warmup, total, 0.003, 0.25) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1] == pytest.approx(0.003 * 0.25, rel=1e-12)


def test_the_other_transformers_schedule_would_waste_the_first_step():
    """``get_cosine_with_min_lr_schedule_with_warmup`` starts warmup at 0 / warmup: the first optimizer
    step runs at lr 0 and AdamW moves no weight, a step of a 23-step quickstart training lost."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 2, 7, min_lr_rate=0.25)
    assert sched.get_last_lr() == [0.0]
    (w * w).sum().backward()
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w.detach(), before)
