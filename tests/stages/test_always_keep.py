"""`winnow select --always-keep`: structural tokens the token half never drops (issue 15's ssToken finding).

A run whose samples carry a real tokenizer (the chatml test tokenizer, recorded as the ingest model) and
hand-written signals in which the structural tokens are predicted equally well by both models (REL 0) and
draw little attention, so ssToken drops them; the expected weights are worked out from the tokenizer's own
ids, the loss mask and the stage's token_keep with numpy, position by position.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.pipeline.render import tokenizer_fingerprint
from winnow.pipeline.store import RunDir

from cli_runner import run_cli, sql_json, write_model_dir
from stage_fixtures import write_signals
from tokenizers_fixtures import make_tokenizer

CHATS = {  # (prompt, answer): the answer is supervised, the prompt (with its own <|im_end|> and ####) is not
    "a": ("What is 2 plus 3? Say it after ####.", "2 plus 3 is 5.\n#### 5"),
    "b": ("Add 10 and 7.", "10 and 7 make 17.\n#### 17"),
    "c": ("Half of 8?", "Half of 8 is 4, so the answer follows.\n#### 4"),
}
FLOOR = "<|im_end|>,####"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("floor_model"), make_tokenizer("chatml"))


def _floor_ids(tok) -> set[int]:
    """The ids the texts stand for, straight from the tokenizer: one id for the special token, every id of
    the plain text."""
    ids = {tok.convert_tokens_to_ids("<|im_end|>")} | set(tok("####", add_special_tokens=False)["input_ids"])
    assert tok.unk_token_id not in ids and len(ids) >= 2
    return ids


def make_run(root, tok_dir) -> tuple[RunDir, dict[str, tuple[list[int], list[int]]]]:
    """Samples (one shard per chat pair, two shards) with winnow.model = tok_dir, and the signals ssToken
    reads: REL 0 and attention 0.01 on the floor tokens, REL > 0 and attention >= 0.5 everywhere else."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    floor = _floor_ids(tok)
    run = RunDir(root, create=True)
    rng = np.random.default_rng(7)
    data = {}
    for part, names in enumerate([["a", "b"], ["c"]]):
        rows = []
        for sid in names:
            prompt, answer = CHATS[sid]
            head = tok(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
            body = tok(f"{answer}<|im_end|>")["input_ids"]
            ids, mask = head + body, [0] * len(head) + [1] * len(body)
            data[sid] = (ids, mask)
            rows.append((sid, ids, mask))
        n = [len(r[1]) for r in rows]
        t = pa.table(
            {
                "sample_id": [r[0] for r in rows],
                "source": ["synthetic"] * len(rows),
                "row": pa.array(range(len(rows)), pa.int64()),
                "messages": ["[]"] * len(rows),
                "text": [""] * len(rows),
                "input_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
                "offsets": pa.array([[0] * k for k in n], pa.list_(pa.int32())),
                "loss_mask": pa.array([r[2] for r in rows], pa.list_(pa.uint8())),
                "n_tokens": pa.array(n, pa.int32()),
                "n_loss_tokens": pa.array([sum(r[2]) for r in rows], pa.int32()),
            }
        )
        meta = {
            b"winnow.tokenizer_fingerprint": tokenizer_fingerprint(tok).encode(),
            b"winnow.model": str(tok_dir),
        }
        run.table("samples").write(part, t.replace_schema_metadata(meta), fingerprint="synthetic", inputs={})
        his, cur, att = [], [], []
        for _, ids, _ in rows:
            is_floor = np.isin(ids, list(floor))
            h = -rng.uniform(1.0, 3.0, len(ids))
            rel = np.where(is_floor, 0.0, rng.uniform(0.5, 2.0, len(ids)))
            a = np.where(is_floor, 0.01, rng.uniform(0.5, 1.0, len(ids)))
            his.append([None, *h[1:].tolist()])
            cur.append([None, *(h + rel)[1:].tolist()])
            att.append([None, *a[1:].tolist()])
        write_signals(run, "history", part, names, {"logprob": his}, model_fingerprint="base")
        write_signals(
            run, "current", part, names, {"logprob": cur, "attn_importance": att}, model_fingerprint="warm"
        )
    return run, data


def _rows(run, view) -> dict[str, dict]:
    return {r["sample_id"]: r for r in sql_json(run, f"select * from {view}")}


def _select(run, *args):
    code, out, err = run_cli("select", run, *args)
    assert code == 0, err
    return out


def test_floor_forces_supervised_structural_tokens_in_kept_samples(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    floor = _floor_ids(AutoTokenizer.from_pretrained(str(tok_dir)))
    run, data = make_run(tmp_path / "run", tok_dir)
    assert run_cli("score", run.root, "sstoken", "--set", "rho=0.5")[0] == 0
    _select(run.root, "sstoken", "--name", "plain")
    _select(run.root, "sstoken", "--always-keep", FLOOR, "--name", "floor")
    # the same floor through the step's parameter (what a recipe's select step sets), a dropped sample too
    _select(run.root, "sql", "--keep", "sample_id <> 'b'", "--tokens", "sstoken", "--name", "sql_floor",
            "--set", f"always_keep={FLOOR}")  # fmt: skip
    scores, plain = _rows(run.root, "scores_sstoken"), _rows(run.root, "selection_plain")
    got, sql = _rows(run.root, "selection_floor"), _rows(run.root, "selection_sql_floor")
    forced = unsupervised_hits = 0
    for sid, (ids, mask) in data.items():
        ids, mask = np.asarray(ids), np.asarray(mask, bool)
        keep = np.asarray(scores[sid]["token_keep"], bool)
        hit = np.isin(ids, list(floor))
        want = (mask & (keep | hit)).astype(np.float64)
        assert got[sid]["token_weight"] == want.tolist(), sid
        assert got[sid]["n_weighted"] == int((want > 0).sum()) and got[sid]["weight_sum"] == want.sum()
        assert got[sid]["keep"] and got[sid]["reason"] == "token_level"
        # without the floor ssToken drops every structural token here (the failure the floor fixes)
        assert np.asarray(plain[sid]["token_weight"])[hit & mask].tolist() == [0.0] * int((hit & mask).sum())
        forced += int((hit & mask & ~keep).sum())
        unsupervised_hits += int((hit & ~mask).sum())
        assert sql[sid]["token_weight"] == (want.tolist() if sid != "b" else [0.0] * len(ids)), sid
    assert forced >= 6 and unsupervised_hits >= 3  # both cases occur: forced on, and left off the prompt
    assert (sql["b"]["keep"], sql["b"]["reason"], sql["b"]["n_weighted"]) == (False, "sql_drop", 0)
    for part in (0, 1):  # the ids used, in every shard's schema metadata
        meta = pq.read_schema(run.root / "selection" / "floor" / f"part-{part:05d}.parquet").metadata
        assert json.loads(meta[b"winnow.always_keep"]) == {"texts": FLOOR.split(","), "ids": sorted(floor)}


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["sstoken", "--always-keep", "<|im_end|>,<|eot_idd|>"],
            r"--always-keep.*'<\|eot_idd\|>'.*special token",
        ),
        (["sstoken", "--always-keep", "####,"], r"--always-keep.*text '' tokenizes to nothing"),
        (["all", "--always-keep", "####"], r"always_keep=####.*keeps every supervised token.*--tokens"),
    ],
)
def test_bad_always_keep_exits_2(tmp_path, tok_dir, args, match):
    run, _ = make_run(tmp_path / "run", tok_dir)
    assert run_cli("score", run.root, "sstoken")[0] == 0
    code, _, err = run_cli("select", run.root, *args)
    assert code == 2, err
    assert re.search(match, err), err
    assert not (run.root / "selection").exists()


def test_texts_map_to_every_id_and_special_tokens_to_one(tok_dir):
    from transformers import AutoTokenizer

    from winnow.pipeline.always_keep import always_keep_ids

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    # pieces read off the tokenizer's vocabulary by hand: 'Half of' -> H, al, fĠ, of; <think> is an added token
    pieces = ["H", "al", "fĠ", "of", "<think>", "<|im_end|>"]
    want = sorted(tok.convert_tokens_to_ids(pieces))
    assert len(set(want)) == 6
    assert always_keep_ids(tok, ["Half of", "<think>", "<|im_end|>"], "--always-keep") == want
