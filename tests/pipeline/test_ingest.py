"""Ingest: nothing lost, exact supervised tokens through the CLI, resumable shards."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipeline.store import RunDir

from cli_runner import WINNOW, run_cli, sql_json

GOOD = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "2+2 = 4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "3+3 = 6."},
        ],
        "label": 1,
    },
    {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        "label": "x",
    },
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}]},
]


def _mixed_jsonl(path: Path) -> dict[int, str | None]:
    """Valid rows mixed with every bad case; returns the expected reason per line (None = sample)."""
    lines: list[tuple[bytes, str | None]] = [
        (json.dumps(GOOD[0]).encode(), None),
        (b'{"messages": [{"role": "user", "content": "broken', "malformed_json"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), "no_assistant_turn"),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]}
            ).encode(),
            "empty_response",
        ),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}
            ).encode(),
            "bad_role",
        ),
        (
            json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}).encode(),
            "missing_field",
        ),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not_utf8"),
        (json.dumps(GOOD[1]).encode(), None),
        (json.dumps(GOOD[0]).encode(), "duplicate"),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "long " * 10},
                        {"role": "assistant", "content": "word " * 400},
                    ]
                }
            ).encode(),
            "too_long",
        ),
        (b"", "blank_line"),
        (b"[1, 2, 3]", "not_an_object"),
        (json.dumps(GOOD[2]).encode(), None),
    ]
    path.write_bytes(b"\n".join(b for b, _ in lines) + b"\n")
    return {i: r for i, (_, r) in enumerate(lines)}


def test_every_row_accounted_with_reason_codes(tmp_path, chatml_model_dir):
    expected = _mixed_jsonl(tmp_path / "mixed.jsonl")
    run = tmp_path / "run"
    code, out, err = run_cli(
        "ingest", tmp_path / "mixed.jsonl", "--run", run, "--model", chatml_model_dir, "--set", "shard_rows=4"
    )
    assert code == 0, err
    rejects = {r["row"]: r for r in sql_json(run, "select * from rejects")}
    samples = {r["row"]: r for r in sql_json(run, "select row, sample_id, meta_label from samples")}
    assert set(rejects) | set(samples) == set(expected) and not set(rejects) & set(samples)
    for row, reason in expected.items():
        if reason is None:
            assert row in samples, row
        else:
            assert rejects[row]["reason"] == reason, (row, rejects[row])
    assert rejects[8]["duplicate_of"] == samples[0]["sample_id"]
    assert str(tmp_path / "mixed.jsonl") in rejects[1]["source"]
    # meta_label mixed int and str: one JSON-text column, never two types
    assert samples[0]["meta_label"] == "1" and samples[7]["meta_label"] == '"x"'
    man = json.loads((run / "manifest.json").read_text())["steps"]["ingest"]
    c = man["counts"]
    assert c["rows_in"] == len(expected) == c["samples"] + c["rejects"]
    assert c["rejects_by_reason"]["duplicate"] == 1 and c["samples"] == 3
    assert man["tokenizer_fingerprint"] and man["shards"]["total"] == 4


def _chatml_supervised_count(model_dir: Path, messages: list[dict]) -> int:
    """Supervised tokens of one ChatML conversation, found without winnow's renderer: each answer is
    located by its literal ``<|im_start|>assistant\\n{content}<|im_end|>`` block in the template's
    text, every token whose character span overlaps the content counts, plus the ``<|im_end|>`` after it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        block = f"<|im_start|>assistant\n{m['content']}<|im_end|>"
        start = text.index(block, pos) + len("<|im_start|>assistant\n")
        pos = start + len(m["content"])
        spans.append((start, pos))
    overlapping = sum(any(a < d and b > c for c, d in spans) for a, b in enc["offset_mapping"])
    return overlapping + len(spans)


def test_supervised_token_count_matches_independent_recount(tmp_path, chatml_model_dir):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(g) for g in GOOD))
    run = tmp_path / "run"
    assert run_cli("ingest", tmp_path / "d.jsonl", "--run", run, "--model", chatml_model_dir)[0] == 0
    [row] = sql_json(run, "select count(*) as n from tokens where loss_mask = 1")
    table = pq.read_table(run / "samples" / "part-00000.parquet")
    expected = sum(_chatml_supervised_count(chatml_model_dir, g["messages"]) for g in GOOD)
    assert row["n"] == expected > 0
    # the tokens view has one row per token, with text from the vocabulary table
    [t] = sql_json(run, "select count(*) as n, count(token) as with_text from tokens")
    assert t["n"] == sum(table.column("n_tokens").to_pylist()) == t["with_text"]
    # multi-turn: both answers are supervised, the second user turn is not
    [first] = [r for r in table.to_pylist() if r["row"] == 0]
    sup = "".join(
        first["text"][o : (first["offsets"][i + 1] if i + 1 < first["n_tokens"] else len(first["text"]))]
        for i, o in enumerate(first["offsets"])
        if first["loss_mask"][i]
    )
    assert "2+2 = 4." in sup and "3+3 = 6." in sup and "And 3+3?" not in sup


def test_every_input_kind_and_meta_types(tmp_path, chatml_model_dir):
    import datasets

    recs = [
        {
            "question": f"What is {i} plus {i}?",
            "answer": f"It is {2 * i}.",
            "level": i,
            "score": 0.5 * i,
            "tags": ["a", str(i)],
            "ok": i % 2 == 0,
        }
        for i in range(6)
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:2]))
    (tmp_path / "b.json").write_text(json.dumps(recs[2:3]))
    pq.write_table(pa.Table.from_pylist(recs[3:4]), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("prompt,response\nHello?,Hello back.\n")
    datasets.Dataset.from_list(recs[4:]).save_to_disk(str(tmp_path / "e"))
    (tmp_path / "f.jsonl").write_text(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}))
    inputs = [tmp_path / n for n in ("a.jsonl", "b.json", "c.parquet", "d.csv", "e", "f.jsonl")]
    run = tmp_path / "run"
    code, _, err = run_cli(
        "ingest", *inputs, "--run", run, "--model", chatml_model_dir, "--set", "shard_rows=3"
    )
    assert code == 0, err
    rows = sql_json(
        run, "select source, row, meta_level, meta_score, meta_tags, meta_ok from samples order by source"
    )
    assert len(rows) == 8
    schema = RunDir(run).table("samples").schema()
    assert schema.field("meta_level").type == pa.int64() and schema.field("meta_score").type == pa.float64()
    assert schema.field("meta_ok").type == pa.bool_() and schema.field("meta_tags").type == pa.string()
    plan = json.loads((run / "plan.json").read_text())
    assert plan["shards"] == 3 and [s["format"] for s in plan["sources"]] == [
        "gsm8k",
        "gsm8k",
        "gsm8k",
        "prompt_response",
        "gsm8k",
        "alpaca",
    ]


def test_truncate_option_and_unreadable_input(tmp_path, chatml_model_dir):
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 400}]}
    (tmp_path / "l.jsonl").write_text(json.dumps(long))
    run = tmp_path / "run"
    code, _, err = run_cli(
        "ingest",
        tmp_path / "l.jsonl",
        "--run",
        run,
        "--model",
        chatml_model_dir,
        "--set",
        "truncate=true",
        "--set",
        "max_tokens=64",
    )
    assert code == 0, err
    [r] = sql_json(run, "select n_tokens, n_loss_tokens from samples")
    assert r["n_tokens"] == 64 and r["n_loss_tokens"] > 0
    code, _, err = run_cli("ingest", tmp_path / "missing.jsonl", "--run", run, "--model", chatml_model_dir)
    assert code == 2 and "missing.jsonl" in err
    code, _, err = run_cli(
        "ingest", tmp_path / "l.jsonl", "--run", run, "--model", chatml_model_dir, "--set", "shard_rows=0"
    )
    assert code == 2 and "shard_rows" in err


def _ingest_subprocess(inp: Path, run: Path, model: Path, env_extra: dict) -> int:
    env = {**os.environ, **env_extra}
    cmd = [
        WINNOW,
        "ingest",
        str(inp),
        "--run",
        str(run),
        "--model",
        str(model),
        "--set",
        "shard_rows=5",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=240).returncode


def test_fault_kill_then_resume_gives_same_table(tmp_path, chatml_model_dir):
    rows = [{"question": f"What is {i} times 3?", "answer": f"{i} times 3 is {3 * i}."} for i in range(14)]
    rows.insert(9, rows[2])  # a duplicate whose original sits in a shard committed before the kill
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    assert _ingest_subprocess(inp, killed, chatml_model_dir, {"WINNOW_FAULT_KILL_AFTER_SHARDS": "2"}) == -9
    t = RunDir(killed).table("samples")
    assert [r.part for r in t.records()] == [0, 1]
    before = {p: (t.record(p).sha256, t.part_path(p).stat().st_mtime_ns) for p in (0, 1)}
    assert _ingest_subprocess(inp, killed, chatml_model_dir, {}) == 0
    assert _ingest_subprocess(inp, clean, chatml_model_dir, {}) == 0
    t = RunDir(killed).table("samples")
    assert [r.part for r in t.records()] == [0, 1, 2]
    assert {p: (t.record(p).sha256, t.part_path(p).stat().st_mtime_ns) for p in (0, 1)} == before
    a = RunDir(killed).table("samples").read().drop_columns(["source"])
    b = RunDir(clean).table("samples").read().drop_columns(["source"])
    assert a.equals(b)
    ra, rb = RunDir(killed).table("rejects").read(), RunDir(clean).table("rejects").read()
    assert ra.column("reason").to_pylist() == rb.column("reason").to_pylist() == ["duplicate"]
    man = json.loads((killed / "manifest.json").read_text())["steps"]["ingest"]
    assert man["shards"] == {"total": 3, "computed": 1, "skipped": 2, "by_rank": [1]}
    assert man["counts"]["rows_in"] == 15


def test_changed_config_recomputes_and_marks_downstream_stale(tmp_path, chatml_model_dir):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(g) for g in GOOD))
    run = tmp_path / "run"
    assert run_cli("ingest", tmp_path / "d.jsonl", "--run", run, "--model", chatml_model_dir)[0] == 0
    rd = RunDir(run)
    samples = rd.table("samples").read(columns=["sample_id", "n_tokens"])
    lists = pa.array([[0.5] * n for n in samples.column("n_tokens").to_pylist()], pa.list_(pa.float32()))
    sig = pa.table({"sample_id": samples.column("sample_id"), "logprob": lists})
    rd.table("signals/current").write(
        0, sig, fingerprint="m", inputs={"samples/part-00000": rd.table("samples").part_digest(0)}
    )
    [r] = sql_json(run, "select count(*) as n from tokens where current__logprob = 0.5")
    assert r["n"] == sum(samples.column("n_tokens").to_pylist())
    # same config again: nothing recomputed
    mtime = rd.table("samples").part_path(0).stat().st_mtime_ns
    assert run_cli("ingest", tmp_path / "d.jsonl", "--run", run, "--model", chatml_model_dir)[0] == 0
    assert rd.table("samples").part_path(0).stat().st_mtime_ns == mtime
    # changed config: samples recomputed, the signals computed from the old samples become stale
    assert (
        run_cli(
            "ingest",
            tmp_path / "d.jsonl",
            "--run",
            run,
            "--model",
            chatml_model_dir,
            "--loss-on",
            "last_turn",
        )[0]
        == 0
    )
    code, out, err = run_cli("inspect", run, "--sql", "select count(*) from samples", "--format", "csv")
    assert code == 0 and "hiding stale table signals/current" in err
    code, _, err = run_cli("inspect", run, "--sql", "select * from signals_current")
    assert code == 2 and "signals_current" in err
    man = json.loads((run / "manifest.json").read_text())
    assert man["tables"]["signals/current"]["stale"] is True


def test_gsm8k_train_supervises_exactly_the_answers(tmp_path, gsm8k_dir):
    """7473 rows -> 7473 samples; decoded supervised tokens hold the whole answer and none of the question."""
    from transformers import AutoTokenizer

    from winnow.pipeline.formats import normalize
    from winnow.pipeline.models import resolve_model

    model = resolve_model("builtin:tiny")
    run = tmp_path / "run"
    code, out, err = run_cli("ingest", gsm8k_dir / "train.jsonl", "--run", run, "--model", "builtin:tiny")
    assert code == 0, err
    assert "7473 rows -> 7473 samples" in out
    tok = AutoTokenizer.from_pretrained(str(model))
    src = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()]
    table = RunDir(run).table("samples").read(columns=["row", "input_ids", "loss_mask"])
    checked = 0
    for r in table.to_pylist():
        ids = [t for t, m in zip(r["input_ids"], r["loss_mask"], strict=True) if m]
        decoded = tok.decode(ids)
        answer, question = normalize(src[r["row"]]["answer"]), normalize(src[r["row"]]["question"])
        assert answer in decoded, r["row"]
        assert question not in decoded and len(decoded) <= len(answer) + len("<|im_end|>") + 2, r["row"]
        checked += 1
    assert checked == 7473
