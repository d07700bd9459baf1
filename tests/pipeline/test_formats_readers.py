"""Record formats and row readers: every physical row yields exactly one record or one error."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.core.formats import RecordError, detect_format, merge_kinds, sample_id, to_messages
from winnow.core.readers import iter_rows
from winnow.core.store import UserError


@pytest.mark.parametrize(
    "record, fmt, roles",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "chat",
            ["user", "assistant"],
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            "sharegpt",
            ["user", "assistant"],
        ),
        ({"prompt": "p", "response": "r", "system": "s"}, "prompt_response", ["system", "user", "assistant"]),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca", ["user", "assistant"]),
        ({"question": "q", "answer": "a"}, "gsm8k", ["user", "assistant"]),
        ({"text": "t"}, "text", ["assistant"]),
    ],
)
def test_formats_detected_and_converted(record, fmt, roles):
    assert detect_format(record) == fmt
    msgs, meta = to_messages({**record, "extra": 1}, fmt)
    assert [m["role"] for m in msgs] == roles
    assert meta == {"extra": 1}


def test_alpaca_joins_instruction_and_input():
    msgs, _ = to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca")
    assert msgs[0]["content"] == "Add\n\n2 and 3"


def test_sample_id_recipe_is_exact():
    msgs = [{"role": "user", "content": "  Cafe\u0301 ", "name": "x"}, {"role": "assistant", "content": "ok"}]
    norm, _ = to_messages({"messages": msgs}, "chat")
    assert norm[0]["content"] == "Caf\u00e9"  # NFC + strip, extra keys dropped
    import hashlib

    blob = json.dumps(
        [{"role": "user", "content": "Caf\u00e9"}, {"role": "assistant", "content": "ok"}],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert sample_id(norm) == hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "bad_role"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            "empty_response",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing_field"),
        ({"question": "q", "answer": 5}, "bad_field_type"),
        ({"question": "q", "answer": None}, "missing_field"),
    ],
)
def test_record_errors_have_reason_codes(record, reason):
    with pytest.raises(RecordError) as e:
        to_messages(record, detect_format(record) or "chat")
    assert e.value.reason == reason


def test_meta_kinds_merge():
    assert merge_kinds({"int"}) == "int"
    assert merge_kinds({"int", "float"}) == "float"
    assert merge_kinds({"str", "int"}) == "json"
    assert merge_kinds({"json"}) == "json"


def test_jsonl_bad_lines_do_not_fail_the_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "trunc\n\xff\xfe{"text": "bad"}\n[1, 2]\n\n{"text": "last"}')
    rows = list(iter_rows(p))
    assert [r.row for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r.reason for r in rows] == [
        None,
        "malformed_json",
        "not_utf8",
        "not_an_object",
        "blank_line",
        None,
    ]
    assert rows[5].record == {"text": "last"}


def test_json_array_csv_parquet_and_save_to_disk(tmp_path):
    recs = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps({"data": recs}))
    assert [r.record for r in iter_rows(tmp_path / "a.json")] == recs
    (tmp_path / "b.csv").write_text("question,answer\nq0,a0\nq1,a1,extra\nq2,a2\n")
    rows = list(iter_rows(tmp_path / "b.csv"))
    assert [r.reason for r in rows] == [None, "malformed_csv", None]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "c.parquet")
    assert [r.record for r in iter_rows(tmp_path / "c.parquet")] == recs
    import datasets

    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "d"))
    assert [r.record for r in iter_rows(tmp_path / "d")] == recs


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("x.json", b'[{"a": 1}, ', "malformed JSON"),
        ("x.txt", b"hello", "unknown input type"),
        ("missing.jsonl", None, "does not exist"),
    ],
)
def test_unreadable_inputs_raise_user_error(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        list(iter_rows(p))
