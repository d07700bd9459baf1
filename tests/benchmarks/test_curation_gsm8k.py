"""benchmarks/curation_gsm8k.py: the GSM8K splits never leak even questions into evaluation, and the
ingest of the model-written solutions keeps every row. Expected values are recomputed here from the raw
files (question text, line counts), not from the module's own helpers."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli, sql_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cg():
    spec = importlib.util.spec_from_file_location("curation_gsm8k", ROOT / "benchmarks" / "curation_gsm8k.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["curation_gsm8k"] = mod  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(mod)
    return mod


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def raw(gsm8k_dir):
    return {
        "solutions": _lines(gsm8k_dir / "model_solutions_even.jsonl"),
        "test": _lines(gsm8k_dir / "test.jsonl"),
        "train": _lines(gsm8k_dir / "train.jsonl"),
    }


def _key(s: dict) -> tuple:
    return s["test_index"], s["solver"], s["prompt"], s["response"]


@pytest.mark.parametrize("questions", [None, 60])
def test_even_halves_are_disjoint_deterministic_and_cover_their_questions(cg, raw, questions):
    scored, contrast = cg.even_halves(raw["solutions"], questions)
    again = cg.even_halves(list(reversed(raw["solutions"])), questions)  # input order does not matter
    assert sorted(map(_key, scored)) == sorted(map(_key, again[0]))
    assert sorted(map(_key, contrast)) == sorted(map(_key, again[1]))
    q_scored = {s["test_index"] for s in scored}
    q_contrast = {s["test_index"] for s in contrast}
    assert not q_scored & q_contrast
    # by hand: every 4th test question from 0 (scored) and from 2 (contrast); 1,319 test rows -> 330 each
    n = 330 if questions is None else questions
    assert q_scored == set(range(0, 4 * n, 4))
    assert q_contrast == set(range(2, 4 * n + 2, 4))
    # each question keeps all of its solutions (4 solvers)
    assert Counter(s["test_index"] for s in scored) == dict.fromkeys(q_scored, 4)
    assert Counter(s["test_index"] for s in contrast) == dict.fromkeys(q_contrast, 4)
    if questions is None:  # the two halves are the whole file
        assert len(scored) + len(contrast) == len(raw["solutions"]) == 2640


def test_solutions_belong_to_even_questions_by_text(raw):
    """The data's own claim, checked from the text: every solution's prompt is an even test question."""
    positions: dict[str, set[int]] = {}
    for i, r in enumerate(raw["test"]):
        positions.setdefault(r["question"], set()).add(i)
    for s in raw["solutions"]:
        assert s["test_index"] in positions[s["prompt"]]
        assert s["test_index"] % 2 == 0


def test_eval_file_holds_exactly_the_odd_reference_answers(cg, raw, tmp_path, gsm8k_dir):
    files = cg._write_inputs(tmp_path, gsm8k_dir, cg.FULL)
    rows = _lines(files["eval"])
    even_questions = {r["question"] for i, r in enumerate(raw["test"]) if i % 2 == 0}
    expect = [(r["question"], r["answer"]) for i, r in enumerate(raw["test"]) if i % 2 == 1]
    assert [(r["question"], r["answer"]) for r in rows] == expect
    assert len(rows) == 659
    assert not {r["question"] for r in rows} & even_questions
    assert not {r["question"] for r in rows} & {s["prompt"] for s in raw["solutions"]}
    quick = _lines(cg._write_inputs(tmp_path / "q", gsm8k_dir, cg.QUICK)["eval"])
    assert [(r["question"], r["answer"]) for r in quick] == expect[: len(quick)]


def test_model_training_data_never_holds_scored_or_test_questions(cg, raw, tmp_path, gsm8k_dir):
    files = cg._write_inputs(tmp_path, gsm8k_dir, cg.FULL)
    parts = _lines(files["train_parts"])
    targets = _lines(files["targets"])
    train_questions = [r["question"] for r in raw["train"]]
    by_part: dict[str, set[int]] = {}
    for r in parts + [dict(t, part="targets") for t in targets]:
        assert train_questions[r["train_index"]] == r["question"]  # rows are GSM8K train, as indexed
        by_part.setdefault(r["part"], set()).add(r["train_index"])
    names = sorted(by_part)
    assert names == ["eval", "reference", "targets", "warm"]
    for a in names:
        for b in names:
            assert a == b or not by_part[a] & by_part[b]
    scored = {s["prompt"] for s in _lines(files["scored"])}
    contrast = {s["prompt"] for s in _lines(files["contrast"])}
    assert not scored & contrast
    test_questions = {r["question"] for r in raw["test"]}
    assert not test_questions & {r["question"] for r in parts + targets}


def test_ingest_of_the_scored_half_keeps_every_row(cg, tmp_path, gsm8k_dir):
    files = cg._write_inputs(tmp_path / "data", gsm8k_dir, cg.FULL)
    n_in = sum(1 for line in files["scored"].read_text(encoding="utf-8").splitlines() if line.strip())
    run = tmp_path / "run"
    code, _, err = run_cli("ingest", files["scored"], "--run", run, "--model", "builtin:tiny")
    assert code == 0, err
    samples = sql_json(run, "select count(*) n, count(*) filter (where meta_is_correct) c from samples")[0]
    rejects = sql_json(run, "select reason, count(*) n from rejects group by 1 order by 1")
    assert samples["n"] + sum(r["n"] for r in rejects) == n_in == 1320
    # what the rejects are, counted from the file: exact duplicate chats, one solution over 1,024 tokens
    rows = _lines(files["scored"])
    dups = len(rows) - len({(r["prompt"].strip(), r["response"].strip()) for r in rows})
    got = {r["reason"]: r["n"] for r in rejects}
    assert got.get("duplicate", 0) == dups
    assert set(got) <= {"duplicate", "too_long"}
    assert samples["c"] <= sum(r["is_correct"] for r in rows)


def test_final_answer_parsing(cg):
    assert cg.final_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert cg.final_answer("#### $1,250") == "1250"
    assert cg.final_answer("#### -3.5 dollars") == "-3.5"
    assert cg.final_answer("A: 26") is None


def test_length_stratified_auroc_pools_pairwise_counts_within_length_quintiles(cg, monkeypatch):
    rng = np.random.default_rng(3)
    ids = [f"s{i:03d}" for i in range(200)]
    length = dict(zip(ids, rng.permutation(np.arange(50, 250)).tolist(), strict=True))  # distinct lengths
    label = {s: bool(rng.random() < (0.8 if length[s] < 150 else 0.3)) for s in ids}  # long -> wrong
    scores = {
        "length": {s: float(length[s]) for s in ids},
        "noisy": {s: float(rng.normal(0.5 * (not label[s]))) for s in ids},
    }
    monkeypatch.setattr(cg, "_sample_scores", lambda run_dir: (label, length, scores))
    got = cg.length_stratified_auroc(Path("unused"))
    # by brute force: the 5 groups of 40 by length, every (incorrect, correct) pair, ties half
    order = sorted(ids, key=length.get)
    for name, sc in scores.items():
        wins = pairs = 0.0
        for k in range(5):
            group = order[40 * k : 40 * (k + 1)]
            for a in (s for s in group if not label[s]):
                for b in (s for s in group if label[s]):
                    wins += 1.0 if sc[a] > sc[b] else 0.5 if sc[a] == sc[b] else 0.0
                    pairs += 1
        assert got[name] == pytest.approx(wins / pairs, abs=1e-12)
    assert cg.sample_auroc(Path("unused"))["length"] > got["length"]  # stratifying removes most of it
