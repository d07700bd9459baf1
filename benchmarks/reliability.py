"""Reliability figures for the README's "Reliability" section, from scratch, rerunnable by anyone.

Four trials on small runs (``builtin:tiny`` tokenizer and model, GSM8K-shaped rows; CPU only):

1. **Fuzz.** ``--fuzz-files`` input files (JSONL, JSON, CSV, Parquet) of hostile rows drawn from a
   seeded generator (lone surrogates in content and meta, integers beyond int64, nesting past the
   limit, roles that are lists or objects, byte-order marks, CR-only line ends, CSV fields over 131,072
   characters, binary garbage, blank lines, duplicates), each ingested through the CLI. Counted: cases,
   crashes (exit status other than 0, or 2 for the one intended user error), rows lost (input rows that
   end neither as a sample nor as a reject, checked row number by row number).
2. **SIGKILLs.** Each writing step in ``KILL_STEPS`` is started and SIGKILLed after a random delay (up
   to its measured clean duration), ``--kills-per-chain`` times in a row, then run to completion; its
   committed shards (table, part, sha256) must equal those of a run that was never interrupted. A
   step is a command line plus the tables it writes, so the trainer (``winnow train``) is one more
   entry in ``KILL_STEPS`` once it exists.
3. **Tampering.** On a finished run: single-bit flips at random offsets, truncations, deleted shards,
   stray shard files, garbage commit records, a commit record claiming other row counts, garbage
   ``plan.json`` / ``manifest.json``. Each must be detected (``winnow verify`` exits 1, naming the
   file) and repaired by rerunning the owning step (then ``verify`` exits 0 and every shard's sha256
   equals the untampered run's).
4. **Hostile SQL.** Statements that would write, delete, attach, install or read outside the run;
   each must be refused (exit 2) with every file of the run unchanged (sha256).
5. **Training, export and SQL (issue 24)**, in ``benchmarks/reliability_writes.py``: training SIGKILLs
   and checkpoint tamperings (resume bitwise to the clean run), hostile ``--out``/``--name`` and
   out-of-domain values for train, export and card, EXPLAIN-wrapped writes and smuggled statements.

Run: ``python benchmarks/reliability.py [--kills-per-chain 5] [--chains 7]``. Prints a table and
writes ``benchmarks/out/reliability.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

if str(Path(__file__).parent) not in sys.path:  # `python -P` leaves out the script's folder (not the root)
    sys.path.insert(0, str(Path(__file__).parent))
import reliability_writes as rw  # noqa: E402  issue 24's trials

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WINNOW_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
CMD = [str(Path(sys.executable).parent / "winnow")]  # the console script: never the checkout root on sys.path


def winnow(*args, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CMD, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"winnow {' '.join(map(str, args))}: {proc.stderr[-2000:]}")
    return proc


def committed(run: Path) -> dict[str, str]:
    """(table/part) -> sha256 of every commit record of the run."""
    out = {}
    for rec in sorted(run.rglob("_commits/part-*.json")):
        d = json.loads(rec.read_text())
        out[f"{rec.parent.parent.relative_to(run).as_posix()}/{rec.stem}"] = d["sha256"]
    return out


def file_hashes(run: Path) -> dict[str, str]:
    return {
        p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


# ---- 1. fuzz ------------------------------------------------------------------------------------


def _nest(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


def hostile_record(rng: random.Random, i: int) -> dict:
    q, a = f"Question {i}: what is {i} + {rng.randint(0, 99)}?", f"It is {i + rng.randint(0, 99)}."
    rec: dict = {"question": q, "answer": a}
    kind = rng.randrange(12)
    if kind == 0:
        rec["question"] = q + " \ud800"
    elif kind == 1:
        rec["note"] = "z\udfff"
    elif kind == 2:
        rec["big"] = rng.choice([2**63, 2**64 - 1, -(2**70)])
    elif kind == 3:
        rec["deep"] = _nest(rng.randint(65, 400))
    elif kind == 4:
        rec["answer"] = rng.choice([None, 5, ["x"], {"y": 1}])
    elif kind == 5:
        rec["Meta"], rec["meta"] = rng.randint(0, 9), "text"
    elif kind == 6:
        rec["question"] = ""
    elif kind == 7:
        rec["answer"] = "<|im_end|>" + a
    elif kind == 8:
        rec["mixed"] = rng.choice([1, "one", 1.5, None, [1]])
    return rec


def _raw_line(rng: random.Random, i: int) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return (
            bytes(rng.randrange(256) for _ in range(rng.randint(0, 30)))
            .replace(b"\n", b"")
            .replace(b"\r", b"")
        )
    if kind == 1:
        return b""
    if kind == 2:
        return b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    if kind == 3:
        return json.dumps(
            {"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]}
        ).encode()
    return json.dumps(hostile_record(rng, i)).encode()


def write_fuzz_file(path: Path, rng: random.Random, rows: int) -> tuple[int, int]:
    """Write one hostile input; returns (input rows, expected exit status)."""
    kind = path.suffix
    if kind == ".jsonl":
        sep = b"\r" if rng.random() < 0.2 else b"\n"
        lines = [_raw_line(rng, i) for i in range(rows)]
        bom = b"\xef\xbb\xbf" if rng.random() < 0.3 else b""
        path.write_bytes(bom + sep.join(lines) + sep)
        return rows, 0
    recs = [hostile_record(rng, i) for i in range(rows)]
    if kind == ".json":
        path.write_bytes(
            b"\xef\xbb\xbf" * (rng.random() < 0.3) + json.dumps(recs).encode("utf-8", "surrogatepass")
        )
        return rows, 0
    if kind == ".csv":
        with open(path, "w", newline="", encoding="utf-8-sig", errors="surrogatepass") as f:
            w = csv.writer(f)
            w.writerow(["question", "answer", "extra"])
            for r in recs:
                w.writerow(
                    [
                        r["question"],
                        r["answer"] if isinstance(r["answer"], str) else "",
                        "x" * rng.choice([1, 140_000]),
                    ]
                )
        return rows, 0
    cols = {
        "question": [r["question"].encode("utf-8", "replace").decode() for r in recs],
        "answer": [r["answer"] if isinstance(r["answer"], str) else None for r in recs],
        "u": pa.array([2**64 - 1 if i % 3 == 0 else i for i in range(rows)], pa.uint64()),
    }
    pq.write_table(pa.table(cols), path)
    return rows, 0


def fuzz_trial(work: Path, n_files: int, rows: int, seed: int) -> dict:
    rng = random.Random(seed)
    cases = crashes = lost = 0
    for k in range(n_files):
        path = work / f"fuzz{k}{rng.choice(['.jsonl', '.jsonl', '.json', '.csv', '.parquet'])}"
        n, expect = write_fuzz_file(path, rng, rows)
        run = work / f"fuzzrun{k}"
        proc = winnow("ingest", path, "--run", run, "--model", "builtin:tiny", "--set", "max_tokens=1000000")
        cases += n
        if proc.returncode != expect:
            crashes += 1
            print(f"  crash on {path}: {proc.stderr[-800:]}", file=sys.stderr)
            continue
        got = []
        for table in ("samples", "rejects"):
            for f in sorted((run / table).glob("part-*.parquet")):
                got += pq.read_table(f, columns=["row"]).column("row").to_pylist()
        lost += len(set(range(n)) - set(got)) + (len(got) - len(set(got)))
    return {"fuzz_files": n_files, "fuzz_rows": cases, "fuzz_crashes": crashes, "rows_lost": lost}


# ---- 2. SIGKILLs --------------------------------------------------------------------------------


def kill_steps(run: Path, inp: Path) -> list[dict]:
    """The writing steps killed at random times, in pipeline order: a command line and what it writes
    (under the run). The trainer (`winnow train`) is one more entry here once it exists."""
    tiny_pass = ["--model", "builtin:tiny", "--alias", "current", "--set", "signals=logprob,entropy"]
    return [
        {
            "name": "ingest",
            "args": ["ingest", inp, "--run", run, "--model", "builtin:tiny", "--set", "shard_rows=20"],
            "writes": ["samples", "rejects", "vocab", "plan.json"],
        },
        {
            "name": "model_pass",
            "args": ["score", run, *tiny_pass, "--set", "threads=1"],
            "writes": ["signals"],
        },
        {"name": "eu_plane", "args": ["score", run, "eu_plane"], "writes": ["scores"]},
    ]


def _run_killed(args: list, delay: float) -> int:
    proc = subprocess.Popen(
        [*CMD, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=delay)
        return 0  # finished before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return 1


def _reset(run: Path, step: dict) -> None:
    """Remove a step's outputs, so that the next kill interrupts real work again."""
    for name in step["writes"]:
        target = run / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _kill_step(run: Path, step: dict, rng: random.Random, kills: int, duration: float) -> int:
    """SIGKILL ``step`` ``kills`` times at random moments of its work (a run that finished first is
    reset and not counted), then run it to completion."""
    done = attempts = 0
    while done < kills and attempts < 4 * kills:
        attempts += 1
        killed = _run_killed(step["args"], rng.uniform(0.5, duration))
        done += killed
        if not killed:
            _reset(run, step)
    winnow(*step["args"], check=True)  # resume to completion
    return done


def kill_trial(work: Path, inp: Path, chains: int, kills_per_chain: int, seed: int) -> dict:
    rng = random.Random(seed)
    ref = work / "kill_ref"
    durations = {}
    for step in kill_steps(ref, inp):
        t0 = time.time()
        winnow(*step["args"], check=True)
        durations[step["name"]] = time.time() - t0
    want = committed(ref)
    kills = identical = 0
    for c in range(chains):
        run = work / f"kill{c}"
        for step in kill_steps(run, inp):
            kills += _kill_step(run, step, rng, kills_per_chain, durations[step["name"]])
        got = committed(run)
        identical += got == want
        if got != want:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            print(f"  chain {c}: {len(diff)} shards differ, e.g. {diff[:3]}", file=sys.stderr)
        print(f"  chain {c}: {kills} kills so far, identical {identical}", file=sys.stderr)
    return {
        "kills": kills,
        "kill_chains": chains,
        "kill_chains_identical": identical,
        "kill_steps": [s["name"] for s in kill_steps(ref, inp)],
        "clean_step_s": {k: round(v, 1) for k, v in durations.items()},
    }


# ---- 3. tampering -------------------------------------------------------------------------------


def _tamper(run: Path, rng: random.Random, kind: str) -> str:
    shards = sorted(run.rglob("part-*.parquet"))
    f = rng.choice(shards)
    if kind == "bit_flip":
        data = bytearray(f.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    elif kind == "truncate":
        f.write_bytes(f.read_bytes()[: rng.randrange(f.stat().st_size)])
    elif kind == "delete":
        f.unlink()
    elif kind == "stray_shard":  # a copy of a committed shard, with its record, beyond the plan
        stray = f.parent / "part-00900.parquet"
        stray.write_bytes(f.read_bytes())
        (f.parent / "_commits" / "part-00900.json").write_bytes(
            (f.parent / "_commits" / f"{f.stem}.json").read_bytes()
        )
        f = stray
    elif kind == "garbage_record":
        f = f.parent / "_commits" / f"{f.stem}.json"
        f.write_bytes(b"\x00\xff garbage")
    elif kind == "record_rows":
        f = f.parent / "_commits" / f"{f.stem}.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {"rows": 999}))
    elif kind in ("plan", "manifest"):
        f = run / f"{kind}.json"
        f.write_text("{garbage")
    return str(f.relative_to(run))


TAMPER_KINDS = (
    "bit_flip",
    "truncate",
    "delete",
    "stray_shard",
    "garbage_record",
    "record_rows",
    "plan",
    "manifest",
)


def owner(steps: list[dict], where: str) -> dict:
    top = where.split("/")[0]
    name = {"signals": "model_pass", "scores": "eu_plane"}.get(top, "ingest")
    return next(s for s in steps if s["name"] == name)


def tamper_trial(work: Path, inp: Path, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    run = work / "tamper"
    steps = kill_steps(run, inp)
    for step in steps:
        winnow(*step["args"], check=True)
    want = committed(run)
    tried = detected = repaired = 0
    for r in range(rounds):
        kind = TAMPER_KINDS[r % len(TAMPER_KINDS)]
        where = _tamper(run, rng, kind)
        tried += 1
        proc = winnow("verify", run)
        found = proc.returncode == 1 and Path(where).name in proc.stderr
        detected += found
        winnow(*owner(steps, where)["args"])  # the rerun of the step that owns the damaged file
        ok = winnow("verify", run).returncode == 0 and committed(run) == want
        repaired += ok
        if not (found and ok):
            print(f"  tamper {kind} at {where}: detected={found} repaired={ok}", file=sys.stderr)
    return {"tamperings": tried, "tamper_detected": detected, "tamper_repaired": repaired}


# ---- 4. hostile SQL -----------------------------------------------------------------------------


def hostile_sql(run: Path, other: Path) -> list[str]:
    """The statements the test suite refuses (one list: tests/pipeline/test_inspect_readonly.py)."""
    sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "tests" / "pipeline")]
    from test_inspect_readonly import _hostile

    return _hostile(run, other)


def sql_trial(work: Path) -> dict:
    run, other = work / "tamper", work / "kill_ref"
    before = file_hashes(run)
    cases = [["--sql", s] for s in hostile_sql(run, other)]
    cases.append(
        ["--sql", "select 1", "--format", "parquet", "--out", run / "samples" / "part-00000.parquet"]
    )
    refused = 0
    for case in cases:
        proc = winnow("inspect", run, *case)
        refused += proc.returncode == 2 and file_hashes(run) == before
    return {"hostile_sql": len(cases), "hostile_sql_refused": refused}


def make_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "question": f"What is {i} times {i % 7 + 2}?",
                        "answer": f"{i} times {i % 7 + 2} is {i * (i % 7 + 2)}.",
                    }
                )
                + "\n"
            )


def _train_trials(work: Path, args) -> dict:
    run = work / "tamper"
    res = rw.train_kill_trial(winnow, CMD, ENV, work, run, args.seed, args.train_chains, args.train_kills)
    return res | rw.ckpt_tamper_trial(winnow, CMD, ENV, work, run)


def _writes_trial(work: Path) -> dict:
    from winnow.pipeline.models import resolve_model

    run = work / "tamper"
    if not (run / "selection").is_dir():
        winnow("select", run, "eu_plane", check=True)
    return rw.hostile_write_trial(winnow, work, run, resolve_model("builtin:tiny"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100, help="rows of the kill/tamper runs")
    ap.add_argument("--fuzz-files", type=int, default=20)
    ap.add_argument("--fuzz-rows", type=int, default=120)
    ap.add_argument("--chains", type=int, default=7)
    ap.add_argument("--kills-per-chain", type=int, default=5, help="per step and chain")
    ap.add_argument("--tamper-rounds", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "reliability.json"))
    ap.add_argument("--work", default="", help="reuse this work folder (e.g. tamper's run for train)")
    ap.add_argument("--train-chains", type=int, default=2, help="training kill chains (issue 24)")
    ap.add_argument("--train-kills", type=int, default=3, help="SIGKILLs per training chain")
    ap.add_argument(
        "--only",
        nargs="*",
        default=["fuzz", "kills", "tamper", "sql", "train", "writes", "sql24"],
        help="trials to run (train, writes and sql24 need tamper's run)",
    )
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="winnow-reliability-"))
    inp = work / "input.jsonl"
    if not inp.exists():
        make_input(inp, args.samples)
    res: dict = {}
    for name, trial in (
        ("fuzz", lambda: fuzz_trial(work, args.fuzz_files, args.fuzz_rows, args.seed)),
        ("kills", lambda: kill_trial(work, inp, args.chains, args.kills_per_chain, args.seed)),
        ("tamper", lambda: tamper_trial(work, inp, args.tamper_rounds, args.seed)),
        ("sql", lambda: sql_trial(work)),
        ("train", lambda: _train_trials(work, args)),
        ("writes", lambda: _writes_trial(work)),
        ("sql24", lambda: rw.sql24_trial(winnow, work / "tamper")),
    ):
        if name not in args.only:
            continue
        t = time.time()
        res |= trial()
        res[f"{name}_s"] = round(time.time() - t, 1)
        print(f"[reliability] {name}: done in {res[f'{name}_s']}s {json.dumps(res)}", file=sys.stderr)
    res["total_s"] = round(time.time() - t0, 1)
    res["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
