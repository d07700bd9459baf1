"""Benchmark: verified reads at the scale of a 100k-sample run (~25M tokens).

Input: GSM8K train (7,473 rows) repeated with a numbered suffix on each question until ``--samples``
rows (every sample unique), ingested with the ``builtin:tiny`` tokenizer (~240 tokens/sample).

Measured in one process, side by side:

* the ingest step itself (wall time, from scratch);
* the first verification of every shard (``winnow verify --full``: sha256 of every file streamed,
  footer row counts; the on-disk cache ignored) and the cached one (``winnow verify`` in a fresh
  process state: in-memory cache cleared, so the on-disk cache under ``$WINNOW_CACHE/verify`` answers);
* the query a user runs next (``winnow inspect --sql`` over ``samples``) with cached verification
  and with ``--no-verify``, best of ``--repeats``: the difference is what verification adds to it.

Run: ``python benchmarks/bench_verify.py [--samples 100000] [--keep DIR]``. Prints a table and writes
``benchmarks/out/bench_verify.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (main), or two levels up (a worktree under /work/wt/)
GSM8K = (
    next(
        (
            p
            for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared")
            if (p / "data/gsm8k/train.jsonl").exists()
        ),
        ROOT.parent / "shared",
    )
    / "data"
    / "gsm8k"
    / "train.jsonl"
)
QUERY = "select count(*) n, sum(n_tokens) tokens, sum(n_loss_tokens) supervised from samples"


def make_input(path: Path, n: int) -> None:
    base = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    with open(path, "w") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(json.dumps({"question": f"{r['question']} (#{i})", "answer": r["answer"]}) + "\n")


def cli(*args: str) -> tuple[int, float, str]:
    from winnow.pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved, sys.argv = sys.argv, ["winnow", *args]
    t0, code = time.perf_counter(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    finally:
        sys.argv = saved
    return code, time.perf_counter() - t0, out.getvalue() + err.getvalue()


def fresh_process_state() -> None:
    from winnow.core import store

    store.VERIFY.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", help="build the run here and keep it (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_verify.json"))
    args = ap.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    # $WINNOW_CACHE as set (the builtin:tiny model is built there once); `verify --full` ignores the
    # on-disk verify cache, so the first verification is cold whatever the cache holds
    os.environ["WINNOW_PROGRESS"] = "0"
    from winnow.core import store

    inp, run = work / "input.jsonl", work / "run"
    if not inp.exists():
        make_input(inp, args.samples)
    res: dict = {"samples": args.samples, "machine": platform.node(), "cpus": os.cpu_count()}
    built = work / "ingest_build_s.json"  # with --keep, a rerun reuses the run and its build time
    if not built.exists() and (run / "manifest.json").exists():
        entry = json.loads((run / "manifest.json").read_text())["steps"]["ingest"]
        if entry["shards"]["computed"] == entry["shards"]["total"]:
            built.write_text(json.dumps(entry["wall_s"]))
    code, res["ingest_s"], log = cli("ingest", str(inp), "--run", str(run), "--model", "builtin:tiny")
    assert code == 0, log[-2000:]
    if built.exists():
        res["ingest_s"] = json.loads(built.read_text())
    else:
        built.write_text(json.dumps(res["ingest_s"]))
    man = json.loads((run / "manifest.json").read_text())
    res["tokens"] = man["tables"] and cli("inspect", str(run), "--sql", QUERY, "--format", "json")[2]
    res["files"] = len(list(run.rglob("part-*.parquet")))
    res["bytes"] = sum(p.stat().st_size for p in run.rglob("part-*.parquet"))
    time.sleep(1.1)  # let the last shards leave the racy window (see store.VerifyCache)

    fresh_process_state()
    before = store.VERIFY.hashed
    code, res["verify_first_s"], log = cli("verify", str(run), "--full")
    assert code == 0, log
    res["verify_first_hashed"] = store.VERIFY.hashed - before
    cached, query_v, query_nv = [], [], []
    for _ in range(args.repeats):
        fresh_process_state()
        before = store.VERIFY.hashed
        code, t, log = cli("verify", str(run))
        assert code == 0 and store.VERIFY.hashed == before, log
        cached.append(t)
        fresh_process_state()
        query_v.append(cli("inspect", str(run), "--sql", QUERY, "--format", "json")[1])
        fresh_process_state()
        query_nv.append(cli("inspect", str(run), "--no-verify", "--sql", QUERY, "--format", "json")[1])
    res |= {
        "verify_cached_s": min(cached),
        "query_verified_s": min(query_v),
        "query_no_verify_s": min(query_nv),
    }
    res["cached_share_of_query"] = (res["query_verified_s"] - res["query_no_verify_s"]) / res[
        "query_no_verify_s"
    ]
    res["cached_share_of_ingest"] = res["verify_cached_s"] / res["ingest_s"]
    res["first_share_of_ingest"] = res["verify_first_s"] / res["ingest_s"]
    res["load_avg"] = os.getloadavg()[0]
    print(
        f"run: {args.samples} samples, {res['files']} shard files, {res['bytes'] / 1e6:.0f} MB; {res['tokens'].strip()}"
    )
    print(f"{'what':44s} {'seconds':>9s}")
    for k in ("ingest_s", "verify_first_s", "verify_cached_s", "query_no_verify_s", "query_verified_s"):
        print(f"{k:44s} {res[k]:9.3f}")
    print(f"cached verification / ingest:  {100 * res['cached_share_of_ingest']:.2f}%")
    print(f"cached verification added to the query: {100 * res['cached_share_of_query']:.2f}%")
    print(f"first verification / ingest:  {100 * res['first_share_of_ingest']:.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
