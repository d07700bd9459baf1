"""No row can crash ingest: generated records (>= 2,000 per session, in batches of 5-8 lines, one
ingest shard each) through reader -> formats -> render -> Arrow, and the inputs the review found
crashing, end to end through the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from winnow.pipeline.formats import merge_kinds, unique_meta_names
from winnow.pipeline.ingest import IngestParams, _build_shard, _Ctx, samples_schema, scan_inputs
from winnow.pipeline.readers import iter_rows

from cli_runner import run_cli, sql_json

SEEN = {"records": 0}
BATCHES, MIN_BATCH = 400, 5

_odd = st.sampled_from(["\ud800", "a\udfffb", "\ufeff", "\x00", "\r", "<|im_end|>", " ", "é", "😀"])
text = st.one_of(st.text(max_size=30), _odd, st.tuples(st.text(max_size=10), _odd).map("".join))
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(),
    text,
)
value = st.recursive(
    scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8
)
deep = st.integers(min_value=60, max_value=3000).map(
    lambda d: json.loads("[" * d + "]" * d) if d < 900 else None
)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "wizard"]), value)


def _turn(role_key: str, content_key: str):
    return st.fixed_dictionaries({role_key: role, content_key: st.one_of(text, value)})


record = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.lists(_turn("role", "content"), max_size=4)}, optional={"m": value}
    ),
    st.fixed_dictionaries(
        {"conversations": st.lists(_turn("from", "value"), max_size=4)}, optional={"M": value}
    ),
    st.fixed_dictionaries({"question": text, "answer": text}, optional={"meta": value, "Meta": value}),
    st.fixed_dictionaries({"prompt": value, "response": value}, optional={"deep": deep}),
    st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": value}),
    st.dictionaries(text, value, max_size=4),
)
# a physical line: a JSON record, or raw bytes (no line ends), or nesting too deep for the parser
line = st.one_of(
    record.map(lambda r: json.dumps(r, ensure_ascii=True).encode()),
    record.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.integers(min_value=2000, max_value=20000).map(lambda d: b'{"a": ' + b"[" * d + b"]" * d + b"}"),
)


@pytest.fixture(scope="module")
def ctx_factory(chatml_model_dir):
    """What ingest builds once per run (tokenizer, limits), so each example costs a shard, not an ingest."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chatml_model_dir))

    def make(scan):
        meta_types = {k: merge_kinds(v) for k, v in scan.meta_kinds.items()}
        names = unique_meta_names(list(meta_types))
        schema = samples_schema(meta_types, "fp", "model", names)
        params = IngestParams(inputs=["x"], model=str(chatml_model_dir))
        return _Ctx(params, tok, scan.formats, meta_types, 512, schema, names)

    return make


@settings(max_examples=BATCHES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line, min_size=MIN_BATCH, max_size=MIN_BATCH + 3))
def test_every_generated_row_ends_as_a_sample_or_a_reject(ctx_factory, tmp_path_factory, lines):
    inp = tmp_path_factory.mktemp("fuzz") / "fuzz.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    # the two passes of ingest over one shard: scan (formats, meta types), then reader -> formats ->
    # render -> Arrow tables with the run's schemas
    scan = scan_inputs([inp], [str(inp)], "auto")
    rows = list(iter_rows(inp, str(inp)))
    samples, rejects, counts = _build_shard(ctx_factory(scan), rows, {})
    got = samples.column("row").to_pylist() + rejects.column("row").to_pylist()
    assert sorted(got) == list(range(len(lines))) == [r.row for r in rows]  # each line once
    assert counts["rows_in"] == scan.rows == len(lines)
    SEEN["records"] += len(lines)


def test_zz_fuzz_volume():
    """The property test above ran at least 2,000 generated records this session."""
    assert SEEN["records"] >= BATCHES * MIN_BATCH >= 2000


def _ingest(tmp_path, model, *inputs, expect=0):
    code, _, err = run_cli("ingest", *inputs, "--run", tmp_path / "run", "--model", model)
    assert code == expect, err
    return err


def test_reviewed_crashes_become_rejects_or_json_meta(tmp_path, chatml_model_dir):
    recs = [
        {"question": "a \ud800 b", "answer": "x"},  # lone surrogate in content -> bad_text
        {"question": "ok?", "answer": "yes.", "note": "z\udfff"},  # ... in meta -> kept, JSON text
        {"question": "big?", "answer": "yes.", "big": 2**64 - 1},  # beyond int64 -> kept, JSON text
        {"question": "deep?", "answer": "yes.", "d": json.loads("[" * 80 + "]" * 80)},  # too_deep
        {"question": "case?", "answer": "yes.", "Foo": 1, "foo": "two"},
    ]
    lines = [json.dumps(r).encode() for r in recs] + [b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))
    sharegpt = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]},  # bad_role
        {"conversations": [{"from": {"x": 1}, "value": "q"}, {"from": "gpt", "value": "a"}]},  # bad_role
    ]
    (tmp_path / "sg.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt))
    _ingest(tmp_path, chatml_model_dir, tmp_path / "in.jsonl", tmp_path / "sg.jsonl")
    run = tmp_path / "run"
    rejects = {
        (Path(r["source"]).name, r["row"]): r["reason"] for r in sql_json(run, "select * from rejects")
    }
    assert rejects == {
        ("in.jsonl", 0): "bad_text",
        ("in.jsonl", 3): "too_deep",
        ("in.jsonl", 5): "too_deep",
        ("sg.jsonl", 1): "bad_role",
        ("sg.jsonl", 2): "bad_role",
    }
    got = {r["row"]: r for r in sql_json(run, "select * from samples where source like '%in.jsonl'")}
    assert json.loads(got[1]["meta_note"]) == "z\udfff" and json.loads(got[2]["meta_big"]) == 2**64 - 1
    assert got[4]["meta_Foo"] == 1 and got[4]["meta_foo__2"] == "two"
    names = json.loads((run / "manifest.json").read_text())["steps"]["ingest"]["meta_column_names"]
    assert names["foo"] == "meta_foo__2" and names["Foo"] == "meta_Foo"


def test_parquet_uint64_max(tmp_path, chatml_model_dir):
    t = pa.table({"question": ["q?"], "answer": ["a."], "u": pa.array([2**64 - 1], pa.uint64())})
    pq.write_table(t, tmp_path / "in.parquet")
    _ingest(tmp_path, chatml_model_dir, tmp_path / "in.parquet")
    [r] = sql_json(tmp_path / "run", "select meta_u from samples")
    assert json.loads(r["meta_u"]) == 2**64 - 1


def test_text_quirks_bom_cr_big_csv_field(tmp_path, chatml_model_dir):
    big = "word " * 27_000  # 135,000 characters: over the csv module's default field limit
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a BOM
        w = csv.writer(f)
        w.writerows([["question", "answer"], ["csv one?", "yes."], ["csv big?", big]])
    (tmp_path / "b.jsonl").write_bytes(
        b"\xef\xbb\xbf"
        + b"\r".join(json.dumps({"question": f"cr {i}?", "answer": "ok."}).encode() for i in range(3))
    )
    (tmp_path / "c.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"question": "json?", "answer": "ok."}]).encode()
    )
    code, _, err = run_cli(
        "ingest",
        tmp_path / "a.csv",
        tmp_path / "b.jsonl",
        tmp_path / "c.json",
        "--run",
        tmp_path / "run",
        "--model",
        chatml_model_dir,
        "--set",
        "max_tokens=100000",
    )
    assert code == 0, err
    rows = sql_json(
        tmp_path / "run", "select source, row, length(messages) > 135000 big from samples order by 1, 2"
    )
    assert [(Path(r["source"]).name, r["row"]) for r in rows] == [
        ("a.csv", 0),
        ("a.csv", 1),
        ("b.jsonl", 0),
        ("b.jsonl", 1),
        ("b.jsonl", 2),
        ("c.json", 0),
    ]
    assert rows[1]["big"] is True
    assert sql_json(tmp_path / "run", "select count(*) n from rejects") == [{"n": 0}]


def test_duplicate_csv_header_and_repeated_input_exit_2(tmp_path, chatml_model_dir):
    (tmp_path / "d.csv").write_text("question,answer,answer\nq?,a.,b.\n")
    err = _ingest(tmp_path, chatml_model_dir, tmp_path / "d.csv", expect=2)
    assert "d.csv" in err and "['answer']" in err
    (tmp_path / "e.jsonl").write_text(json.dumps({"question": "q?", "answer": "a."}))
    err = _ingest(tmp_path, chatml_model_dir, tmp_path / "e.jsonl", str(tmp_path / "." / "e.jsonl"), expect=2)
    assert "given twice" in err
