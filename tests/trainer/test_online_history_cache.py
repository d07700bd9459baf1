"""ssToken's history=start losses cached per sample: right values, one history forward per sample, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_fixtures import export_parquet, model_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hcache_inputs")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=40)


def _loop(inputs, out: Path, **extra):
    from transformers import AutoModelForCausalLM

    from winnow.pipeline.params import build_params
    from winnow.trainer import data as data_mod
    from winnow.trainer.config import TrainParams
    from winnow.trainer.distributed import Dist
    from winnow.trainer.loop import Env, Loop

    m, d = inputs
    values = dict(
        model=str(m), data=str(d), out=str(out), online="sstoken", epochs=2, tokens_per_batch=256,
        max_seq_len=128, eval_fraction=0.2, lr=1e-2, layout="padded", progress=False,
    )  # fmt: skip
    values.update(extra)
    p = build_params(TrainParams, values, "test")
    lm = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32)
    lm.config.use_cache = False
    return Loop(p, data_mod.load(p, None), lm, Env(torch.device("cpu"), Dist(), out))


def _count_history_forwards(loop) -> list[int]:
    """A list that grows by one per forward of the history model's body."""
    from winnow.trainer.loss import body_and_head

    calls: list[int] = []
    body, _ = body_and_head(loop.online.history)
    body.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _reference_nll(model_path, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float64 NLL of the supervised targets (weight > 0, index >= 1) under the saved starting model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float64).eval()
    x = torch.as_tensor(np.asarray(ids, np.int64))[None]
    with torch.no_grad():
        logp = model(input_ids=x).logits[0].log_softmax(-1)  # (L, V) float64
    t = np.flatnonzero(np.asarray(weights)[1:] > 0) + 1
    return -logp[t - 1, x[0, t]].numpy()


@pytest.mark.parametrize("scoring", ["separate", "reuse"])
def test_history_forward_only_in_epoch_one_and_cached_values_are_the_start_models_nll(
    inputs, tmp_path, scoring
):
    loop = _loop(inputs, tmp_path / "out", online_scoring=scoring)
    calls = _count_history_forwards(loop)
    per_step = []
    for s in range(loop.total_steps):
        before = len(calls)
        loop.train_step(s)
        per_step.append(len(calls) - before)
    spe = loop.steps_per_epoch
    assert loop.total_steps == 2 * spe and spe >= 3
    assert all(c > 0 for c in per_step[:spe]) and per_step[spe:] == [0] * spe, per_step
    tr, cache = loop.data.train, loop.online.cache
    assert len(cache) == len(tr.ids)
    worst = 0.0
    for k in range(len(tr.ids)):
        want = _reference_nll(inputs[0], tr.ids[k], tr.weights[k])
        got = cache.get(k)
        assert got.dtype == np.float32 and got.shape == want.shape
        if len(want):
            worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
    assert 0.0 < worst < 1e-5  # float32 forward and storage against float64: close, not identical


def test_without_the_cache_the_history_forward_runs_every_epoch(inputs, tmp_path):
    loop = _loop(inputs, tmp_path / "out", **{"sstoken.cache_history": False})
    calls = _count_history_forwards(loop)
    assert loop.online.cache is None
    per_step = []
    for s in range(loop.total_steps):
        before = len(calls)
        loop.train_step(s)
        per_step.append(len(calls) - before)
    assert all(c > 0 for c in per_step)
    # one epoch (nothing would be read back) and the EMA history (it moves): no cache built
    assert _loop(inputs, tmp_path / "one", epochs=1).online.cache is None
    assert _loop(inputs, tmp_path / "ema", **{"sstoken.history": "ema"}).online.cache is None


def test_checkpoint_carries_the_cache_and_a_resumed_loop_reads_it(inputs, tmp_path):
    """Save in epoch 2, resume in a fresh Loop: the same cache bit for bit, no history forward after."""
    from winnow.trainer.online_history_cache import FILE

    first = _loop(inputs, tmp_path / "a")
    spe = first.steps_per_epoch
    for s in range(spe + 1):
        first.train_step(s)
    first.save(tmp_path / "ckpt", spe + 1)
    folder = next((tmp_path / "ckpt").glob("step-*"))
    assert (folder / FILE).is_file()
    second = _loop(inputs, tmp_path / "b")
    assert len(second.online.cache) == 0
    assert second.resume(tmp_path / "ckpt") == spe + 1
    a, b = first.online.cache, second.online.cache
    assert np.array_equal(a.filled, b.filled) and a.filled.all()
    assert np.array_equal(a.values.view(np.int32), b.values.view(np.int32))
    calls = _count_history_forwards(second)
    for s in range(spe + 1, second.total_steps):
        second.train_step(s)
        first.train_step(s)
    assert calls == []
    pairs = zip(first.loss_mod.named_parameters(), second.loss_mod.named_parameters(), strict=True)
    assert all(torch.equal(x, y) for (_, x), (_, y) in pairs)


@pytest.mark.slow
def test_exchange_gives_every_rank_every_filled_sample(tmp_path):
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "rank{}.json")
    from dist_online_worker import exchange_history_cache

    mp.spawn(exchange_history_cache, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    want = {"0": [0.25, 1.25, 2.25], "2": [21.25, 22.25], "3": [30.25, 31.25, 32.25, 33.25]}
    got = [json.loads(Path(out.format(rank)).read_text()) for rank in (0, 1)]
    assert got[0]["first"] == got[1]["first"] == want
    assert got[0]["second"] == {**want, "4": [7.5]} and got[1]["second"]["4"] == [7.5]


def test_auto_scoring_reuses_for_sstoken_only():
    from winnow.pipeline.params import build_params
    from winnow.trainer.config import TrainParams

    def mode(**kw):  # the pre-group names, through their aliases
        return build_params(TrainParams, {"model": "m", **kw}, "test").scoring_mode

    assert mode(online="sstoken") == "reuse"
    assert mode(online="q_tuning") == "separate" and mode(online="rho1") == "separate"
    assert mode(online="sstoken", online_scoring="separate") == "separate"
    assert mode(online="q_tuning", online_scoring="reuse") == "reuse"
    assert mode(online="sstoken", **{"masked_thought.p": "0.1"}) == "separate"
    assert mode(online="sstoken", lora_r=4) == "separate"
