"""Contrast pass (cDPO p_CE) against a direct full-logit computation on each sample alone."""

import numpy as np
import pytest
import torch

from winnow.core.store import UserError
from winnow.pipeline.steps import get_step, spec
from winnow.stages.passes.contrast_pass import ContrastParams, run_contrast_pass

from model_pass_fixtures import make_model_dir, random_samples, write_samples


def _direct(pos, neg, ids, beta):
    """The authors' recipe on full float64 logits: softmax((1+b) z_pos - b z_neg) at the observed token."""
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        zp = pos(input_ids=x).logits[0, :-1].double()
        zn = neg(input_ids=x).logits[0, :-1].double()
    t = x[0, 1:, None]
    p = ((1 + beta) * zp - beta * zn).softmax(-1).gather(-1, t).squeeze(-1)
    return (
        p.numpy(),
        zp.log_softmax(-1).gather(-1, t).squeeze(-1).numpy(),
        zn.log_softmax(-1).gather(-1, t).squeeze(-1).numpy(),
    )


@pytest.mark.parametrize("beta,positions", [(1.0, "supervised"), (0.5, "all")])
def test_contrast_matches_direct_full_logits(tmp_path, beta, positions):
    from transformers import AutoModelForCausalLM

    pos_dir = make_model_dir(tmp_path / "pos", "llama", seed=1)
    neg_dir = make_model_dir(tmp_path / "neg", "llama", seed=2)
    seqs, masks = random_samples(14, seed=9)
    run = write_samples(tmp_path / "run", seqs, masks, pos_dir, shards=2)
    p = ContrastParams(
        positive=str(pos_dir),
        negative=str(neg_dir),
        beta=beta,
        positions=positions,
        token_budget=200,
        head_chunk=16,
        threads=1,
    )
    entry = run_contrast_pass(run, p)
    assert entry["shards"]["computed"] == 2
    tbl = run.table("signals/contrast").read()
    assert tbl.column_names == ["sample_id", "p_ce", "logprob_pos", "logprob_neg"]
    pos, neg = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (pos_dir, neg_dir))
    spread = []
    for i, ids in enumerate(seqs):
        want = np.ones(len(ids), bool) if positions == "all" else masks[i] == 1
        want[0] = False
        ref = _direct(pos, neg, ids, beta)
        for col, r in zip(("p_ce", "logprob_pos", "logprob_neg"), ref, strict=True):
            got = np.array([np.nan if v is None else v for v in tbl[col][i].as_py()], dtype=np.float64)
            assert len(got) == len(ids)
            np.testing.assert_array_equal(~np.isnan(got), want)
            atol = 1e-7 if col == "p_ce" else 1e-5
            np.testing.assert_allclose(got[1:][want[1:]], r[want[1:]], rtol=1e-5, atol=atol)
        spread.append(ref[0][want[1:]])
    spread = np.concatenate(spread)
    assert spread.max() > 0.05 and spread.min() < 1e-4  # p_ce spans a wide range: the check can fail
    again = run_contrast_pass(run, p)
    assert again["shards"]["computed"] == 0 and "model_pass:contrast" in run.manifest()["steps"]


def test_contrast_refuses_other_tokenizer(tmp_path):
    pos_dir = make_model_dir(tmp_path, "llama", seed=1)
    # another vocabulary (same size, other words): a different tokenizer under every transformers 5.x (the
    # same files loaded as Qwen2's tokenizer fingerprint differently only from 5.8)
    neg_dir = make_model_dir(tmp_path, "qwen2", seed=2, word="v")
    seqs, masks = random_samples(3, seed=1)
    run = write_samples(tmp_path / "run", seqs, masks, pos_dir)
    with pytest.raises(UserError, match="negative model .* different tokenizer"):
        run_contrast_pass(run, ContrastParams(positive=str(pos_dir), negative=str(neg_dir), threads=1))


def test_contrast_params_and_step():
    with pytest.raises(ValueError, match="beta"):
        ContrastParams(positive="a", negative="b", beta=-1.0)
    with pytest.raises(ValueError, match="positive and negative"):
        ContrastParams(positive="a", negative="")
    step = get_step("contrast_pass")
    assert (
        step.params is ContrastParams
        and spec("contrast_pass").key(ContrastParams(positive="a", negative="b")) == "model_pass:contrast"
    )
