"""`winnow train --set always_keep=...`: the floor after an online policy's decision, on hand-built
mini-batches (expected weights by hand) and through a short training whose recorded weights show it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from winnow.core.store import RunDir
from winnow.trainer import online as ol
from winnow.trainer import online_params as opm

from trainer_fixtures import model_dir, synthetic_run

NAN = float("nan")
F = 42  # the floored token id in the hand-built batches


def _scored(ids, nll, mask, weight, **kw) -> ol.Scored:
    mask = torch.tensor(mask, dtype=torch.bool)
    nll = torch.where(mask, torch.tensor(nll, dtype=torch.float64), NAN)
    return ol.Scored(
        mask=mask, weight=torch.tensor(weight, dtype=torch.float64), nll=nll, ids=torch.tensor(ids), **kw
    )


def test_sstoken_floor_gives_the_selection_weight_to_dropped_floor_tokens():
    # ssToken gamma=1, rho=0.5 (as in test_online_policies): row0 REL 2.0, 0.5, 1.0 -> keeps pos1, pos3;
    # row1 REL 0.1, 0.5 -> keeps pos2. Floor id 42 sits at row0 pos2 (dropped), row1 pos1 (dropped) and
    # row1 pos3 (not supervised): the first two come back with their selection weight, the third stays 0.
    ids = [[1, 11, F, 12], [1, F, 13, F]]
    nll = [[0, 1.0, 1.0, 1.0], [0, 2.0, 2.0, 0]]
    his = torch.tensor([[0, 3.0, 1.5, 2.0], [0, 2.1, 2.5, 0]], dtype=torch.float64)
    mask = [[0, 1, 1, 1], [0, 1, 1, 0]]
    weight = [[0, 0.5, 0.25, 2.0], [0, 0.75, 1.5, 0]]
    s = _scored(ids, nll, mask, weight, nll_his=his)
    op = opm.OnlineParams(
        policy="sstoken", sstoken=opm.SSTokenOnline(gamma=1.0, rho=0.5), always_keep_ids=(F, 7)
    )
    d = ol.apply_policy(s, op)
    assert d.weight.tolist() == [[0, 0.5, 0.25, 2.0], [0, 0.75, 1.5, 0]]
    assert d.keep.tolist() == [True, True] and d.stats == {"kept_samples": 2, "kept_tokens": 5}
    plain = ol.apply_policy(
        s, opm.OnlineParams(policy="sstoken", sstoken=opm.SSTokenOnline(gamma=1.0, rho=0.5))
    )
    assert plain.weight.tolist() == [[0, 0.5, 0, 2.0], [0, 0, 1.5, 0]]  # what the floor starts from


def test_rho1_floor_leaves_a_sample_with_nothing_kept_dropped():
    # excess cur - ref: row0 1.0, 0.1, 2.5; row1 0.2, 3.0, -0.1; row2 0.0, 0.05. k_ratio 0.5 of 8 supervised
    # -> the 4 largest: row0 pos1, pos3, row1 pos1, pos2. The floor brings back row0 pos2 (id 42, excess 0.1)
    # at its weight 0.5; row2 kept nothing and stays dropped although its pos1 is id 42.
    ids = [[1, 5, F, 6], [1, 7, 8, 9], [1, F, 9, 9]]
    nll = [[0, 2.0, 1.0, 3.0], [0, 0.6, 4.0, 0.2], [0, 0.5, 0.5, 0.5]]
    ref = torch.tensor([[0, 1.0, 0.9, 0.5], [0, 0.4, 1.0, 0.3], [0, 0.5, 0.45, 0.6]], dtype=torch.float64)
    mask = [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0]]
    weight = [[0, 1, 0.5, 1], [0, 1, 1, 1], [0, 1, 1, 0]]
    s = _scored(ids, nll, mask, weight, nll_ref=ref)
    d = ol.apply_policy(
        s, opm.OnlineParams(policy="rho1", rho1=opm.Rho1Online(k_ratio=0.5), always_keep_ids=(F,))
    )
    assert d.weight.tolist() == [[0, 1, 0.5, 1], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert d.keep.tolist() == [True, True, False]


def test_q_tuning_floor_only_in_kept_samples():
    g = torch.Generator().manual_seed(5)
    b, t = 8, 10
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, 3:] = True
    ids = torch.randint(10, 20, (b, t), generator=g)
    ids[:, 4] = F  # a floor token in every sample, supervised
    ids[:, 1] = F  # and one in every prompt
    nll = torch.rand(b, t, generator=g, dtype=torch.float64) * 4 + 0.05
    nll[:, 4] += 6.0  # a high token score: Q2 pruning (lowest scores kept) drops the floor column
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 3 + 0.05
    weight = torch.where(mask, torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5, 0.0)
    s = ol.Scored(mask=mask, weight=weight, nll=torch.where(mask, nll, NAN), entropy=ent, ids=ids)
    q = opm.QTuningOnline(r_sample=0.5, r_token=0.3)
    plain = ol.apply_policy(s, opm.OnlineParams(policy="q_tuning", q_tuning=q))
    d = ol.apply_policy(s, opm.OnlineParams(policy="q_tuning", q_tuning=q, always_keep_ids=(F,)))
    kept = plain.keep.numpy()
    want = plain.weight.numpy().copy()
    want[kept, 4] = weight.numpy()[kept, 4]  # kept rows: the floor column at its selection weight
    np.testing.assert_array_equal(d.weight.numpy(), want)
    assert d.keep.tolist() == plain.keep.tolist() and 0 < kept.sum() < b
    assert (d.weight.numpy()[~kept] == 0).all() and (d.weight.numpy()[:, 1] == 0).all()
    pruned = (plain.weight.numpy()[kept, 4] == 0).sum()
    assert pruned > 0, "no Q2 row pruned the floor column: the case is not exercised"
    assert d.stats["kept_tokens"] == plain.stats["kept_tokens"] + pruned


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("floor") / "model")


def test_training_records_the_floor(model, tmp_path):
    """online=sstoken, rho 0.3, always_keep=<|im_end|>: in the epoch's recorded weights every supervised
    <|im_end|> of a trained sample carries weight 1 (the run trains on loss_mask weights), while the other
    supervised tokens are pruned to about 30%."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from winnow.core.params import build_params
    from winnow.pipeline.train import train
    from winnow.trainer.config import TrainParams

    run = synthetic_run(tmp_path / "run", model, per_shard=12)
    end = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids("<|im_end|>")
    samples = run.table("samples")
    rng = np.random.default_rng(3)
    for part in (0, 1):  # put <|im_end|> at a few positions of every sample, supervised or not
        t = samples.read_part(part)
        ids = [np.asarray(x) for x in t["input_ids"].to_pylist()]
        for x in ids:
            x[rng.choice(np.arange(1, len(x)), size=min(4, len(x) - 1), replace=False)] = end
        t = t.set_column(
            t.schema.get_field_index("input_ids"), "input_ids", pa.array(ids, pa.list_(pa.int32()))
        )
        samples.write(part, t, fingerprint="synthetic", inputs={})
    values = {
        "model": str(model),
        "selection": "all",
        "progress": "false",
        "tokens_per_batch": "256",
        "max_seq_len": "128",
        "eval_fraction": "0.2",
        "epochs": "1",
        "online": "sstoken",
        "sstoken.rho": "0.3",
        "record_weights": "true",
        "always_keep": "<|im_end|>",
    }
    train(build_params(TrainParams, values, "test"), run.root)
    rec = RunDir(run.root).table("selection/online-all-epoch1").read().to_pylist()
    s = {r["sample_id"]: r for r in samples.read().to_pylist()}
    floor_w, other = [], []
    for r in rec:
        if not r["keep"]:
            continue
        ids, mask, w = np.asarray(s[r["sample_id"]]["input_ids"]), np.asarray(s[r["sample_id"]]["loss_mask"]), np.asarray(r["token_weight"])  # fmt: skip
        sup = (mask == 1) & (np.arange(len(ids)) > 0)
        floor_w += w[sup & (ids == end)].tolist()
        other += w[sup & (ids != end)].tolist()
    assert len(floor_w) >= 10 and floor_w == [1.0] * len(floor_w)
    assert 0.2 < np.mean(np.asarray(other) > 0) < 0.45  # the policy still pruned the rest
