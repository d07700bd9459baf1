"""The streamed card (issue 16) gives the numbers an in-memory computation over the whole run gives.

A small real run: 240 rows of the builtin demo data (GSM8K-like) in 4 shards of 64 (tokenized by the builtin tiny tokenizer), random
logprob/entropy signals (null at index 0 and off the loss mask), the EU-plane stage and a selection
with EU-plane token weights (Q2 samples have pruned tokens at weight 0). References: the per-token
``tokens`` view joined in DuckDB (the card's former query), ``numpy.histogram`` over every value read
with pyarrow, and the full list of EU-plane points.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from winnow.pipeline.builtin.demo_data import write_demo_jsonl
from winnow.pipeline.card import reservoir_sample, sql_histogram, top_zeroed_tokens
from winnow.pipeline.inspect_run import open_views
from winnow.pipeline.store import RunDir

from cli_runner import run_cli
from stage_fixtures import write_signals


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("card_stream")
    inp = write_demo_jsonl(root / "in.jsonl", n=240)
    code, _, err = run_cli(
        "ingest", inp, "--run", root / "run", "--model", "builtin:tiny", "--set", "shard_rows=64"
    )  # fmt: skip
    assert code == 0, err
    run = RunDir(root / "run")
    rng = np.random.default_rng(7)
    for rec in run.table("samples").records():
        s = run.table("samples").read_part(rec.part, columns=["sample_id", "loss_mask"]).to_pylist()
        lp, en = [], []
        for r in s:
            ok = [bool(m) and i > 0 for i, m in enumerate(r["loss_mask"])]
            lp.append([float(-rng.gamma(1.5)) if o else None for o in ok])
            en.append([float(rng.gamma(2.0)) if o else None for o in ok])
        ids = [r["sample_id"] for r in s]
        write_signals(run, "current", rec.part, ids, {"logprob": lp, "entropy": en})
    assert len(run.table("samples").records()) == 4
    assert run_cli("score", run.root, "eu_plane", "--set", "r_sample=0.5")[0] == 0
    assert run_cli("select", run.root, "eu_plane", "--tokens", "eu_plane", "--name", "eu")[0] == 0
    return run


def test_top_zeroed_tokens_streamed_equal_the_tokens_view_join(run):
    con = open_views(str(run.root)).con
    want = con.sql(
        "select token, count(*) n from tokens t join selection_eu s using (sample_id) "
        "where s.keep and t.loss_mask = 1 and t.eu__token_weight = 0 group by 1 order by 2 desc, 1"
    ).fetchall()
    assert len(want) > 20 and want[0][1] > 10  # enough pruned tokens for the order to mean something
    got = top_zeroed_tokens(run, "selection/eu", len(want) + 5)
    assert got == [tuple(r) for r in want]
    assert top_zeroed_tokens(run, "selection/eu", 15) == [tuple(r) for r in want[:15]]


def test_share_histogram_in_duckdb_equals_numpy_histogram(run):
    con = open_views(str(run.root)).con
    sel = pq.read_table(run.table("selection/eu").paths()).to_pydict()
    shares = [
        w / s
        for w, s, k in zip(sel["n_weighted"], sel["n_supervised"], sel["keep"], strict=True)
        if k and s > 0
    ]
    sql = "select n_weighted / n_supervised from selection_eu where keep and n_supervised > 0"
    for bins, lo, hi in ((20, 0.0, 1.0), (7, 0.1, 0.9), (3, 0.5, 1.0)):
        counts, edges = sql_histogram(con, sql, bins, lo, hi)
        want, want_edges = np.histogram(shares, bins=bins, range=(lo, hi))
        np.testing.assert_array_equal(counts, want)
        np.testing.assert_array_equal(edges, want_edges)
    # values on the edges (k/20 and 1.0, where numpy's edge correction matters) and outside the range
    vals = [i / 20 for i in range(21)] + [i / 7 for i in range(8)] + [-0.5, 1.5, 0.15, 0.35]
    con.execute("create table v as select unnest(?::double[]) as x", [vals])
    for bins in (20, 7, 3):
        counts, _ = sql_histogram(con, "select x from v", bins, 0.0, 1.0)
        np.testing.assert_array_equal(counts, np.histogram(vals, bins=bins, range=(0.0, 1.0))[0])


def test_eu_scatter_is_a_bounded_sample_of_the_real_points(run):
    con = open_views(str(run.root)).con
    sql = "select error, uncertainty, quadrant from scores_eu_plane where error is not null"
    every = sorted(con.sql(sql).fetchall())
    assert len(every) > 200  # every ingested sample has supervised tokens, hence a point
    assert sorted(reservoir_sample(con, sql, 1000)) == every  # room for all: all of them
    few = reservoir_sample(con, sql, 50)
    assert len(few) == 50 and len(set(few)) == 50 and set(few) <= set(every)


def test_card_of_the_streamed_run_matches_sql(run):
    code, _, err = run_cli("card", run.root)
    assert code == 0, err
    card = (run.root / "card" / "README.md").read_text()
    con = open_views(str(run.root)).con
    (kept, n) = con.execute("select count_if(keep), count(*) from selection_eu").fetchone()
    assert f"Kept **{kept} of {n}** samples" in card
    first = top_zeroed_tokens(run, "selection/eu", 1)[0]
    assert f"| {json.dumps(first[0])} | {first[1]} |" in card
    assert "By `meta_" in card
    assert "(eu_plane.png)" in card and "(selection_eu.png)" in card  # plots linked, not just written
    assert sorted(p.name for p in (run.root / "card").iterdir()) == [
        "README.md",
        "eu_plane.png",
        "examples",
        "selection_eu.png",
    ]
