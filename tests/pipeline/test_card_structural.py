"""The card's structural-token alarm: a selection that weights under half of the supervised end-of-turn
tokens of the samples it keeps is named with its counts (counted here from the tables with the tokenizer's
own id for ``<|im_end|>``), and ``--always-keep`` silences it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from winnow.core.store import RunDir

from cli_runner import run_cli
from stage_fixtures import write_signals

ROWS = [
    {"question": f"What is {i} times {i + 2}?", "answer": f"{i} * {i + 2} = {i * (i + 2)}"} for i in range(10)
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, chatml_model_dir) -> tuple[RunDir, int]:
    root = tmp_path_factory.mktemp("structural") / "run"
    inp = root.parent / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    code, _, err = run_cli("ingest", inp, "--run", root, "--model", chatml_model_dir, "--set", "shard_rows=4")
    assert code == 0, err
    im_end = AutoTokenizer.from_pretrained(str(chatml_model_dir)).convert_tokens_to_ids("<|im_end|>")
    rd, rng = RunDir(root), np.random.default_rng(1)
    for rec in rd.table("samples").records():
        t = rd.table("samples").read_part(rec.part, ["sample_id", "input_ids"])
        cur, ref = [], []
        for ids in t["input_ids"].to_pylist():
            c = -rng.uniform(2.0, 4.0, len(ids))
            r = c + rng.uniform(0.5, 1.5, len(ids))  # the reference predicts every token better ...
            r[np.asarray(ids) == im_end] = c[np.asarray(ids) == im_end]  # ... but <|im_end|>: excess 0
            cur.append([None, *c[1:].tolist()])
            ref.append([None, *r[1:].tolist()])
        write_signals(
            rd, "current", rec.part, t["sample_id"].to_pylist(), {"logprob": cur}, model_fingerprint="c"
        )
        write_signals(
            rd, "reference", rec.part, t["sample_id"].to_pylist(), {"logprob": ref}, model_fingerprint="r"
        )
    for args in (
        ("score", root, "excess_loss", "--set", "k_ratio=0.6"),
        ("select", root, "excess_loss", "--name", "rho"),
        ("select", root, "excess_loss", "--name", "rho_floor", "--always-keep", "<|im_end|>"),
        ("card", root),
    ):
        code, _, err = run_cli(*args)
        assert code == 0, err
    return rd, im_end


def _im_end_counts(rd: RunDir, selection: str, im_end: int) -> tuple[int, int]:
    n = weighted = 0
    for path in sorted((rd.root / "selection" / selection).glob("part-*.parquet")):
        sel = {r["sample_id"]: r for r in pq.read_table(path).to_pylist()}
        for s in pq.read_table(rd.root / "samples" / path.name).to_pylist():
            r = sel[s["sample_id"]]
            if not r["keep"]:
                continue
            for tok, m, w in zip(s["input_ids"], s["loss_mask"], r["token_weight"], strict=True):
                if tok == im_end and m:
                    n, weighted = n + 1, weighted + (w > 0)
    return n, weighted


def test_the_card_names_a_selection_that_drops_end_of_turn_tokens(run):
    rd, im_end = run
    n, weighted = _im_end_counts(rd, "rho", im_end)
    assert n >= 5 and weighted < n / 2  # the fixture works: Rho-1's top 60% leaves the zero-excess tokens
    card = (rd.root / "card" / "README.md").read_text()
    assert (
        f"**Warning:** selection `rho` weights {weighted} of the {n} supervised `<|im_end|>` tokens" in card
    ), card
    assert '--always-keep "<|im_end|>"' in card


def test_always_keep_silences_it(run):
    rd, im_end = run
    n, weighted = _im_end_counts(rd, "rho_floor", im_end)
    assert n >= 5 and weighted == n
    card = (rd.root / "card" / "README.md").read_text()
    assert "selection `rho_floor` weights" not in card
