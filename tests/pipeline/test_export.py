"""`winnow export`: kept samples as chat JSONL (re-ingests to the same sample ids) or tokenized rows with
-100 labels exactly where the selection gives no weight (parquet and a `datasets` folder)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import synthetic_runs.critical_tokens as test_critical_tokens
from cli_runner import ingest_demo, run_cli, sql_json

KEEP = "meta_corruption = 'none' and meta_domain = 'math'"


@pytest.fixture(scope="module")
def demo_selection(tmp_path_factory):
    run = ingest_demo(tmp_path_factory.mktemp("export") / "run")
    code, _, err = run_cli("select", run, "sql", "--keep", KEEP, "--name", "clean")
    assert code == 0, err
    return run


def test_jsonl_reingests_to_the_kept_samples(demo_selection, tmp_path):
    run = demo_selection
    out = tmp_path / "clean.jsonl"
    code, stdout, err = run_cli("export", run, "--format", "jsonl", "--out", out)
    assert code == 0, err
    kept = sql_json(
        run, f"select sample_id, meta_template, meta_junk_spans from samples where {KEEP} order by all"
    )
    assert f"selection/clean: {len(kept)} samples" in stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(kept) > 1000
    assert isinstance(lines[0]["junk_spans"], list)  # json meta decoded back to its original form
    code, _, err = run_cli("ingest", out, "--run", tmp_path / "again", "--model", "builtin:tiny")
    assert code == 0, err
    again = sql_json(
        tmp_path / "again",
        "select sample_id, meta_template, meta_junk_spans, meta_winnow_sample_id w from samples order by all",
    )
    assert [r["sample_id"] for r in again] == [r["sample_id"] for r in kept]
    assert all(r["w"] == r["sample_id"] for r in again)
    assert [(r["meta_template"], r["meta_junk_spans"]) for r in again] == [
        (r["meta_template"], r["meta_junk_spans"]) for r in kept
    ]
    man = json.loads((run / "manifest.json").read_text())["steps"]["export:clean"]
    assert (man["format"], man["rows"]) == ("jsonl", len(kept))


def test_parquet_and_hf_labels_follow_the_weights(demo_selection, tmp_path):
    from datasets import load_dataset, load_from_disk

    run = demo_selection
    assert run_cli("export", run, "--format", "parquet", "--out", tmp_path / "c.parquet")[0] == 0
    t = pq.read_table(tmp_path / "c.parquet")
    rows = sql_json(run, f"select sample_id, loss_mask from samples where {KEEP}")
    masks = {r["sample_id"]: r["loss_mask"] for r in rows}
    assert t.num_rows == len(masks)
    checked = 0
    for row in t.to_pylist():
        mask = masks[row["sample_id"]]
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == len(mask)
        assert row["labels"] == [x if m else -100 for x, m in zip(row["input_ids"], mask, strict=True)]
        assert row["token_weight"] == [float(m) for m in mask]
        assert row["loss_mask"] == mask
        checked += sum(mask) > 0
    assert checked == t.num_rows
    ds = load_dataset(
        "parquet", data_files=str(tmp_path / "c.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == t.num_rows and ds[0]["labels"] == t["labels"][0].as_py()

    assert run_cli("export", run, "--format", "hf", "--out", tmp_path / "c_hf")[0] == 0
    disk = load_from_disk(str(tmp_path / "c_hf"))
    assert disk.num_rows == t.num_rows and disk[5]["labels"] == t["labels"][5].as_py()
    # an existing output is kept unless --force
    code, _, err = run_cli("export", run, "--format", "hf", "--out", tmp_path / "c_hf")
    assert code == 2 and "--force" in err
    assert run_cli("export", run, "--format", "hf", "--out", tmp_path / "c_hf", "--force")[0] == 0


def test_fractional_weights_survive_and_zero_weights_become_minus_100(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("score", run.root, "critical_tokens")[0] == 0
    assert run_cli("select", run.root, "critical_tokens", "--tokens", "p_ce")[0] == 0
    assert run_cli("export", run.root, "--format", "parquet", "--out", tmp_path / "w.parquet")[0] == 0
    (row,) = pq.read_table(tmp_path / "w.parquet").to_pylist()  # only "r" (correct) is kept
    assert row["sample_id"] == "r"
    assert row["token_weight"] == [0.0, 0.75, 0.5] and row["labels"] == [-100, 1, 2]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--format", "csv"], "--format 'csv'"),
        (["--format", "jsonl", "--selection", "nope"], "no selection/nope"),
    ],
)
def test_user_errors(demo_selection, tmp_path, args, match):
    code, _, err = run_cli("export", demo_selection, *args, "--out", tmp_path / "x")
    assert code == 2 and match in err, err


def test_several_selections_need_a_name(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("select", run.root, "all")[0] == 0
    assert run_cli("select", run.root, "all", "--name", "second")[0] == 0
    code, _, err = run_cli("export", run.root, "--format", "jsonl", "--out", tmp_path / "x.jsonl")
    assert code == 2 and "2 selections" in err and "--selection" in err


def test_empty_and_replaced_exports_leave_nothing_behind(tmp_path):
    run = test_critical_tokens.make_run(tmp_path / "run")
    assert run_cli("select", run.root, "sql", "--keep", "false", "--name", "none")[0] == 0
    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("jsonl", "parquet", "hf"):
        code, _, err = run_cli("export", run.root, "--format", fmt, "--out", out / f"x.{fmt}")
        assert code == 2 and "keeps no samples" in err
    assert list(out.iterdir()) == []  # no temporary file or folder left
    # a file replaced by a folder (and back) with --force
    assert run_cli("select", run.root, "all")[0] == 0
    target = out / "kept"
    assert run_cli("export", run.root, "--selection", "all", "--format", "jsonl", "--out", target)[0] == 0
    assert (
        run_cli("export", run.root, "--selection", "all", "--format", "hf", "--out", target, "--force")[0]
        == 0
    )
    assert target.is_dir() and sorted(p.name for p in out.iterdir()) == ["kept"]
    assert (
        run_cli("export", run.root, "--selection", "all", "--format", "jsonl", "--out", target, "--force")[0]
        == 0
    )
    assert target.is_file() and sorted(p.name for p in out.iterdir()) == ["kept"]


def test_streamed_hf_folder_equals_the_datasets_route(demo_selection, tmp_path, monkeypatch):
    """The hf export is written shard by shard (issue 16); it must load to what `datasets` itself makes of
    the same rows (Dataset.from_parquet(...).save_to_disk), also when it rolls over to several files."""
    from datasets import Dataset, load_from_disk

    from winnow.pipeline import export

    run = demo_selection
    export.export_selection(run, "parquet", tmp_path / "c.parquet", "clean")
    ref_dir = tmp_path / "ref_hf"
    Dataset.from_parquet(str(tmp_path / "c.parquet"), cache_dir=str(tmp_path / "cache")).save_to_disk(
        str(ref_dir)
    )
    ref = load_from_disk(str(ref_dir))
    monkeypatch.setattr(export, "HF_SHARD_BYTES", 20_000)  # several data files
    export.export_selection(run, "hf", tmp_path / "c_hf", "clean")
    got = load_from_disk(str(tmp_path / "c_hf"))
    assert len(list((tmp_path / "c_hf").glob("data-*-of-*.arrow"))) > 2
    assert got.features == ref.features
    assert got.num_rows == ref.num_rows > 1000
    assert got.to_dict() == ref.to_dict()
