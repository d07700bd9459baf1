"""Exports that round-trip (issue 28 item 5): each export format re-ingests to the kept sample ids, the
hf folder trains like the parquet, chats are lists of structs, `completion_mask` marks the trained tokens,
and the dataset card (hf README.md, Parquet schema metadata) carries the provenance and counts."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from cli_runner import WINNOW, ingest_demo, run_cli, sql_json

KEEP = "meta_corruption = 'none' and meta_domain = 'math'"
FORMATS = {"jsonl": "kept.jsonl", "parquet": "kept.parquet", "hf": "kept_hf"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    run = ingest_demo(root / "run")
    assert run_cli("select", run, "sql", "--keep", KEEP, "--name", "clean")[0] == 0
    for fmt, name in FORMATS.items():
        code, _, err = run_cli("export", run, "--format", fmt, "--out", root / name)
        assert code == 0, err
    kept = sql_json(
        run, f"select sample_id, messages, loss_mask from samples where {KEEP} order by sample_id"
    )
    return root, run, kept


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_export_reingests_to_the_same_sample_ids(exported, fmt):
    root, _, kept = exported
    again = root / f"again_{fmt}"
    if fmt == "hf":  # once through the installed console script
        proc = subprocess.run(
            [WINNOW, "ingest", str(root / FORMATS[fmt]), "--run", str(again), "--model", "builtin:tiny"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "0 rejects" in proc.stdout + proc.stderr
    else:
        code, _, err = run_cli("ingest", root / FORMATS[fmt], "--run", again, "--model", "builtin:tiny")
        assert code == 0, err
    ids = [r["sample_id"] for r in sql_json(again, "select sample_id from samples order by sample_id")]
    assert ids == [r["sample_id"] for r in kept] and len(ids) > 1000
    assert sql_json(again, "select count(*) n from rejects")[0]["n"] == 0


def test_chats_are_lists_of_structs_and_completion_mask_marks_trained_tokens(exported):
    from datasets import load_from_disk

    root, _, kept = exported
    by_id = {r["sample_id"]: r for r in kept}
    tables = {"parquet": pq.read_table(root / FORMATS["parquet"]).to_pylist()}
    tables["hf"] = list(load_from_disk(str(root / FORMATS["hf"])))
    for fmt, rows in tables.items():
        assert len(rows) == len(kept), fmt
        for row in rows:
            ref = by_id[row["sample_id"]]
            assert row["messages"] == json.loads(ref["messages"]), fmt
            # the sql policy keeps every supervised token: trained exactly where loss_mask is 1
            assert row["completion_mask"] == [int(m) for m in ref["loss_mask"]], fmt
            assert row["completion_mask"] == [int(x != -100) for x in row["labels"]], fmt


def test_dataset_card_in_hf_readme_and_parquet_schema(exported):
    root, run, kept = exported
    weighted = sum(sum(r["loss_mask"]) for r in kept)  # sql policy: weight 1 on every supervised token
    from winnow.core.store import RunDir

    meta = json.loads(pq.read_schema(root / FORMATS["parquet"]).metadata[b"winnow"])
    assert meta["counts"] == {"rows": len(kept), "weighted_tokens": weighted, "run_samples": 1978}
    assert meta["policy"] == "sql" and meta["policy_config"]["keep"] == KEEP
    assert meta["selection"] == "clean"
    assert meta["selection_digest"] == RunDir(run).table("selection/clean").digest()
    assert meta["run_fingerprint"] == RunDir(run).table("samples").digest()
    card = (root / FORMATS["hf"] / "README.md").read_text()
    for key in ("run_fingerprint", "selection_digest", "policy", "counts"):
        assert f"  {key}: {json.dumps(meta[key], sort_keys=True)}" in card, key


def test_train_data_accepts_the_hf_folder_like_the_parquet(exported):
    from winnow.pipeline.train import read_export

    root, _, _ = exported
    a, b = read_export(root / FORMATS["parquet"]), read_export(root / FORMATS["hf"])
    assert a.sample_ids == b.sample_ids and len(a.ids) > 1000
    for x, y in zip(a.ids + a.weights + a.loss_mask, b.ids + b.weights + b.loss_mask, strict=True):
        assert (x == y).all()
    out = root / "trained"
    args = ["--set", "max_steps=1", "--set", "tokens_per_batch=256", "--set", "max_seq_len=128"]
    code, _, err = run_cli(
        "train", "--data", root / FORMATS["hf"], "--model", "builtin:tiny", "--out", out, *args
    )
    assert code == 0, err
    code, _, err = run_cli(
        "train", "--data", root / "run", "--model", "builtin:tiny", "--out", root / "t2", *args
    )
    assert code == 2 and "--data" in err, err
