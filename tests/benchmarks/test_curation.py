"""The curation benchmark's logic: ``#### N`` parsing, the random pairing, the held-out loss, batched greedy
generation; and (slow, opt-in) ``benchmarks/curation.py --quick`` end to end, checking the table's shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(ROOT / "benchmarks"))
import curation_eval as ce  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


@pytest.mark.parametrize(
    "text, want",
    [
        ("So 20 - 9 = 11 people.\n#### 11", "11"),
        ("#### 1,200 dollars", "1200"),
        ("####-7", "-7"),
        ("#### 12.0", "12"),
        ("#### 12.50", "12.50"),
        ("first #### 3\nthen #### 4", "3"),
        ("the answer is 11", None),
        ("#### ", None),
        ("", None),
    ],
)
def test_final_answer(text, want):
    assert ce.final_answer(text) == want


def test_exact_match():
    ref = "He runs 9 * 5 = 45 km.\n#### 165"
    assert ce.exact_match("blah\n#### 165", ref)
    assert ce.exact_match("#### 165<|im_end|>", ref)
    assert not ce.exact_match("#### 166", ref)
    assert not ce.exact_match("#### 1650", ref)
    assert not ce.exact_match("165", ref)  # no #### line: wrong, whatever the number
    assert not ce.exact_match("#### 165", "no final line")


def _masks(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros(int(rng.integers(4, 40)), np.float32)
        m[int(rng.integers(1, len(m) - 1)) :] = 1
        if rng.random() < 0.1:
            m[:] = 0  # a sample with no supervised token is never drawn
        out.append(m)
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_pairing_equal_samples_and_tokens(seed):
    masks = _masks(seed)
    eligible = [i for i, m in enumerate(masks) if m[1:].any()]
    n_samples = len(eligible) // 2
    n_tokens = 3 * n_samples  # fewer than the drawn samples hold (about 10 supervised tokens each)
    pair = ce.random_pairing(masks, n_samples, n_tokens, seed)
    w = pair.weights
    assert len(w) == len(masks) and all(len(a) == len(m) for a, m in zip(w, masks, strict=True))
    assert sum(int(np.count_nonzero(a)) for a in w) == n_tokens == pair.tokens
    assert pair.shortfall == 0
    drawn = [i for i, a in enumerate(w) if a.any()]
    assert len(drawn) == pair.samples <= n_samples
    for a, m in zip(w, masks, strict=True):
        assert set(np.unique(a)) <= {0.0, 1.0}
        assert not (a > m).any()  # only supervised tokens
        assert a[0] == 0  # position 0 is never a target
    # all tokens of a sample-level budget: exactly n_samples samples, each with all its targets
    full = sum(int(masks[i][1:].sum()) for i in eligible)
    every = ce.random_pairing(masks, len(eligible), full, seed)
    assert every.samples == len(eligible) and every.tokens == full
    assert all(np.array_equal(a[1:], m[1:]) for a, m in zip(every.weights, masks, strict=True))


def test_random_pairing_is_seeded_and_uniform():
    masks = _masks(3, n=40)
    eligible = [i for i, m in enumerate(masks) if m[1:].any()]
    a = ce.random_pairing(masks, 10, 10**9, seed=5)
    b = ce.random_pairing(masks, 10, 10**9, seed=5)
    c = ce.random_pairing(masks, 10, 10**9, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.weights, c.weights, strict=True))
    # asking for more tokens than the drawn samples hold keeps all of them and reports the shortfall
    held = sum(int(masks[i][1:].sum()) for i, x in enumerate(a.weights) if x.any())
    assert a.samples == 10 and a.tokens == held and a.shortfall == 10**9 - held
    # uniform over eligible samples: each is drawn in about 10/len(eligible) of 400 draws
    hits = np.zeros(len(masks))
    for s in range(400):
        hits += [x.any() for x in ce.random_pairing(masks, 10, 10**9, seed=s).weights]
    p = 10 / len(eligible)
    assert hits[[i for i in range(len(masks)) if i not in eligible]].sum() == 0
    assert np.abs(hits[eligible] / 400 - p).max() < 5 * np.sqrt(p * (1 - p) / 400)
    with pytest.raises(ValueError):
        ce.random_pairing(masks, len(eligible) + 1, 5, 0)


@pytest.mark.parametrize("batch_tokens", [64, 100000])
def test_eval_loss_matches_per_sample_hf_loss(batch_tokens):
    from transformers import AutoModelForCausalLM

    from model_pass_fixtures import make_config, random_samples

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama")).eval()
    seqs, masks = random_samples(9, seed=4, lo=3, hi=40)
    total = count = 0.0
    with torch.no_grad():  # independent: HF's own shifted cross-entropy, one unpadded sample at a time
        for ids, m in zip(seqs, masks, strict=True):
            x = torch.as_tensor(ids, dtype=torch.long)[None]
            labels = torch.where(torch.as_tensor(m, dtype=torch.bool), x[0], -100)[None]
            n = int(m[1:].sum())
            if n:
                total += float(model(input_ids=x, labels=labels).loss) * n
                count += n
    got = ce.eval_loss(model, [s.astype(np.int64) for s in seqs], masks, batch_tokens=batch_tokens)
    assert got == pytest.approx(total / count, rel=2e-6)


def test_greedy_answers_batched_equals_one_by_one():
    from transformers import AutoModelForCausalLM

    from model_pass_fixtures import make_config, make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(make_config("llama")).eval()
    rng = np.random.default_rng(0)
    prompts = [
        [{"role": "user", "content": " ".join(f"w{int(t)}" for t in rng.integers(5, 300, int(n)))}]
        for n in rng.integers(1, 12, 7)
    ]
    batched = ce.greedy_answers(model, tok, prompts, max_new_tokens=6, batch=4)
    single = [ce.greedy_answers(model, tok, [p], max_new_tokens=6, batch=1)[0] for p in prompts]
    assert batched == single
    assert all(s.strip() for s in single)  # something was generated


@pytest.mark.slow
@pytest.mark.timeout(1800)  # under 5 minutes on an idle machine; the shared VM runs it several times slower
def test_quick_benchmark_table_is_well_formed(tmp_path):
    """``curation.py --quick`` end to end (builtin models; a few minutes): the table has its rows."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "curation.py"), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["row"]: r for r in res["rows"]}
    want = {"base (no training)", "full", "eu_plane", "excess_loss", "random~eu_plane", "random~excess_loss"}
    assert set(rows) == want
    for name, r in rows.items():
        assert np.isfinite(r["loss"]) and r["loss"] > 0, name
        assert 0.0 <= r["acc"] <= 1.0, name
    for pol in ("eu_plane", "excess_loss"):  # the random pair trains on as many samples and tokens
        assert rows[f"random~{pol}"]["samples"] <= rows[pol]["samples"]
        assert rows[f"random~{pol}"]["tokens"] <= rows[pol]["tokens"]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| data | budget | row |") and len(table) == 2 + len(want)
    assert all(line.count("|") == table[0].count("|") for line in table)


def _row(row, acc, sd, seeds=3, gt=False, paired=""):
    return {
        "dataset": "demo",
        "budget": 0.5,
        "row": row,
        "acc": acc,
        "acc_sd": sd,
        "seeds": seeds,
        "gt": gt,
        "lora": False,
        "paired": paired,
    }


def test_target_check_needs_a_margin_over_full_and_random_and_no_ground_truth():
    import curation

    rows = [
        _row("full", 0.30, 0.01),
        _row("a", 0.35, 0.02),
        _row("random~a", 0.31, 0.01, paired="a"),  # beats both by > 0.02: wins
        _row("b", 0.35, 0.02),
        _row("random~b", 0.34, 0.01, paired="b"),  # random within the spread
        _row("c", 0.50, 0.01, gt=True),
        _row("random~c", 0.30, 0.01, paired="c"),  # reads labels
        _row("d", 0.50, 0.00, seeds=1),
        _row("random~d", 0.30, 0.00, seeds=1, paired="d"),  # one seed
        _row("e", 0.315, 0.02),
        _row("random~e", 0.20, 0.01, paired="e"),  # full within the spread
        _row("f", 0.60, 0.01),  # no random pair
    ]
    assert curation.target_check(rows) == ["a"]
    assert curation.target_check(rows, budget=0.25) == []


def test_excess_samples_keeps_the_top_mean_excess_and_new_task_rows_hold_only_the_task():
    import curation as cu
    import duckdb

    rng = np.random.default_rng(3)
    ids, scores = list(range(40)), rng.normal(size=40)
    scores[5] = np.nan  # a sample with no supervised token: never kept first
    con = duckdb.connect()
    con.execute("create table scores_excess_loss (sample_id bigint, mean_excess double)")
    con.executemany(
        "insert into scores_excess_loss values (?, ?)",
        [(i, None if np.isnan(v) else float(v)) for i, v in zip(ids, scores, strict=True)],
    )
    con.execute("create table samples as select sample_id from scores_excess_loss")
    kept = {
        r[0]
        for r in con.execute(
            f"select sample_id from samples where {cu._sql_budget('excess_samples', 10)}"
        ).fetchall()
    }
    by_hand = {ids[k] for k in sorted(range(40), key=lambda k: -np.nan_to_num(scores[k], nan=-np.inf))[:10]}
    assert kept == by_hand and 5 not in kept

    task = ("math/wages", "math/ages")
    rows = cu._demo_rows(300, 99, set(), task)
    from winnow.pipeline.builtin.demo_data import generate_demo

    want = [r for r in generate_demo(300, 99) if r["corruption"] == "none" and r["template"] in task]
    assert [r["messages"] for r in rows] == [r["messages"] for r in want] and len(rows) > 5


def test_method_rows_train_the_whole_pool_with_their_parameters_and_score_old_templates(tmp_path):
    """``--methods``: each method row is a ``full`` job (no selection, no random pair) plus its ``--set``
    values, every job also scored on the old-template test run; the table has one line per row."""
    import curation as cu

    ctx = {
        "dataset": "demo",
        "base_model": "m",
        "workdir": tmp_path,
        "accuracy": True,
        "cfg": {},
        "lora_seeds": 0,
        "run_b": tmp_path / "run",
        "test_run": tmp_path / "t",
        "test_run_old": tmp_path / "old",
    }
    policies = [cu.POLICIES[0]] + [p for p in cu.METHODS if p.name in ("otr", "hft")]
    jobs = cu._jobs(ctx, 1.0, policies, {}, [0, 1], ())
    assert sorted((j["row"], j["seed"]) for j in jobs) == sorted(
        (r, s) for r in ("full", "otr", "hft") for s in (0, 1)
    )
    by = {(j["row"], j["seed"]): j for j in jobs}
    assert by[("otr", 1)]["train"] == {"loss": "otr", "otr.k": 256} and not by[("full", 0)].get("train")
    assert by[("hft", 0)]["train"] == {"hft.enabled": True}
    assert all(j["test_run_old"] == str(tmp_path / "old") and not j.get("selection") for j in jobs)
    results = [
        {**{k: by[(r, s)][k] for k in ("dataset", "row", "policy", "budget", "seed", "gt", "lora", "paired")},
         "eval_loss": 1.0 + s, "accuracy": 0.1 * s, "old_eval_loss": 0.5, "old_accuracy": 0.9 - 0.2 * s,
         "train_s": 1.0, "train_samples": 10, "weighted_tokens": 100}
        for r in ("full", "otr", "hft") for s in (0, 1)
    ]  # fmt: skip
    rows = cu.aggregate(results, {})
    assert [r["row"] for r in rows] == ["full", "otr", "hft"]
    assert rows[2]["old_acc"] == pytest.approx(0.8) and rows[2]["old_acc_sd"] == pytest.approx(0.2 / 2**0.5)
    table = cu.methods_markdown(rows).splitlines()
    assert len(table) == 5 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| demo | hft | 2 | 1.5000 ± 0.7071 | 5.0 ± 7.1 | 0.5000 ± 0.0000 | 80.0 ± 14.1 |" in table[4]
