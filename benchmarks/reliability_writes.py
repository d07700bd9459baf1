"""Issue 24's trials for ``benchmarks/reliability.py``: training, export and SQL, as a hostile or careless
user would try them (builtin:tiny, CPU only, a few minutes on the 2-core VM).

* **train kills**: ``winnow train`` SIGKILLed after a random optimizer step (the fault hook) or at a random
  moment (possibly mid-save), several times, then run to completion: the final weights must equal an
  uninterrupted run's (sha256 of ``model.safetensors``) and at most ``keep_checkpoints`` + 1 checkpoints
  may remain, with no ``.tmp-*`` / ``.final-*`` leftovers.
* **checkpoint tamperings**: the newest checkpoint of a killed run gets a flipped byte (``state.pt``,
  ``model.safetensors``), an edited step, a truncated file, garbage JSON or loses its checksum file; the
  resume must name it on stderr, fall back to the previous one and end bitwise equal to the clean run.
* **hostile outputs and names**: ``train --out`` on the model, the run, a table, the card, a foreign
  non-empty folder, a folder holding the run; ``--name`` ``..``, ``../../x``, 300 characters; ``export
  --out`` on the run, a table, a shard, its parent (with ``--force``); ``card --out`` on the run or a
  table: each must exit 2 leaving every file of the run, the model and the foreign folder unchanged.
* **hostile values**: ``lr=inf|nan|1e308``, ``max_grad_norm=nan``, ``weight_decay=inf``, ``seed=-1``, a
  20-digit seed, ``threads=100000``, ``device=meta``: exit 2, one line, nothing written.
* **hostile statements**: EXPLAIN around writes, several statements, and conditions (``select --keep``,
  ``train eval_where``) that close their query and add a COPY: exit 2, run unchanged.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

TRAIN_SETS = [
    *("--set", "max_steps=8", "--set", "epochs=50", "--set", "save_every=2", "--set", "keep_checkpoints=2"),
    *("--set", "tokens_per_batch=256", "--set", "max_seq_len=256", "--set", "threads=1"),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(*roots: Path) -> dict[str, str]:
    return {
        str(p): _sha(p)
        for r in roots
        for p in sorted(r.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _train_args(run: Path, out: Path) -> list:
    return ["train", run, "--selection", "all", "--model", "builtin:tiny", "--out", out, *TRAIN_SETS]


def _killed_train(winnow, cmd, env, run: Path, out: Path, rng: random.Random, kills: int) -> int:
    """SIGKILL the training ``kills`` times (fault hook after a random step, or a random moment)."""
    done = 0
    for k in range(kills):
        if k % 2 == 0:
            proc = subprocess.run(
                [*cmd, *map(str, _train_args(run, out))],
                env={**env, "WINNOW_FAULT_KILL_AFTER_STEPS": str(rng.randint(1, 3))},
                capture_output=True,
            )
            done += proc.returncode == -signal.SIGKILL
            continue
        p = subprocess.Popen(
            [*cmd, *map(str, _train_args(run, out))],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            p.wait(timeout=rng.uniform(4.0, 12.0))  # imports take most of the first seconds on this VM
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            done += 1
    winnow(*_train_args(run, out), check=True)
    return done


def train_kill_trial(winnow, cmd, env, work: Path, run: Path, seed: int, chains: int, kills: int) -> dict:
    rng = random.Random(seed)
    ref = work / "train_ref"
    winnow(*_train_args(run, ref), check=True)
    want = _sha(ref / "model.safetensors")
    identical = clean = total = 0
    for c in range(chains):
        out = work / f"train_kill{c}"
        total += _killed_train(winnow, cmd, env, run, out, rng, kills)
        identical += _sha(out / "model.safetensors") == want
        ck = out / "checkpoints"
        clean += (
            len(list(ck.glob("step-*"))) <= 3
            and not list(ck.glob(".tmp-*"))
            and not list(out.glob(".final-*"))
        )
    return {
        "train_kills": total,
        "train_kill_chains": chains,
        "train_kill_identical": identical,
        "train_kill_tidy": clean,
    }


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


CKPT_TAMPER = {
    "state_pt_byte": lambda c: _flip(c / "state.pt", -100),
    "weights_byte": lambda c: _flip(c / "model.safetensors", -7),
    "edited_step": lambda c: (c / "trainer_state.json").write_text(
        (c / "trainer_state.json").read_text().replace('"step": 4', '"step": 5')
    ),
    "truncated": lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:100]),
    "garbage_json": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "no_checksums": lambda c: (c / "checksums.json").unlink(),
}


def ckpt_tamper_trial(winnow, cmd, env, work: Path, run: Path) -> dict:
    ref, base = work / "train_ref", work / "train_tamper"
    want = _sha(ref / "model.safetensors")
    proc = subprocess.run(
        [*cmd, *map(str, _train_args(run, base))],
        env={**env, "WINNOW_FAULT_KILL_AFTER_STEPS": "5"},
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-500:]
    pristine = work / "train_tamper_pristine"
    shutil.copytree(base, pristine)
    named = repaired = 0
    for kind, fn in CKPT_TAMPER.items():
        shutil.rmtree(base)
        shutil.copytree(pristine, base)  # the identity names --out: resume in place
        fn(base / "checkpoints" / "step-00000004")
        p = winnow(*_train_args(run, base))
        said = "cannot be verified" if kind == "no_checksums" else "is damaged"  # an older winnow's: kept
        found = p.returncode == 0 and f"step-00000004 {said}" in p.stderr
        ok = p.returncode == 0 and _sha(base / "model.safetensors") == want
        named, repaired = named + found, repaired + ok
        if not (found and ok):
            print(f"  checkpoint {kind}: named={found} repaired={ok} {p.stderr[-300:]}", file=sys.stderr)
    return {"ckpt_tamperings": len(CKPT_TAMPER), "ckpt_tamper_named": named, "ckpt_tamper_repaired": repaired}


def hostile_write_trial(winnow, work: Path, run: Path, model: Path) -> dict:
    foreign = work / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "README.md").write_text("not winnow's")
    shard = sorted((run / "samples").glob("part-*.parquet"))[0]
    cases = [
        ["train", run, "--selection", "all", "--model", model, "--out", o, *TRAIN_SETS]
        for o in (model, run, run / "card", run / "samples", foreign, run.parent)
    ]
    cases += [
        ["train", run, "--selection", "all", "--model", model, "--name", n, *TRAIN_SETS]
        for n in ("..", "../../x", "x" * 300)
    ]
    cases += [
        ["export", run, "--format", f, "--out", o, "--force"]
        for f in ("parquet", "hf", "jsonl")
        for o in (run, run / "samples", shard, run.parent)
    ]
    cases += [["card", run, "--out", o] for o in (run, run / "samples", run.parent)]
    values = [
        "lr=inf",
        "lr=nan",
        "lr=1e308",
        "max_grad_norm=nan",
        "weight_decay=inf",
        "seed=-1",
        "seed=" + "9" * 20,
        "threads=100000",
        "device=meta",
    ]
    cases += [
        ["train", run, "--selection", "all", "--model", model, "--out", work / "v", *TRAIN_SETS, "--set", v]
        for v in values
    ]
    before = _tree(run, model, foreign)
    refused = silent = 0
    for case in cases:
        p = winnow(*case)
        ok = p.returncode == 2 and p.stderr.count("\n") == 1 and _tree(run, model, foreign) == before
        refused += ok
        silent += p.returncode == 0
        if not ok:
            print(f"  hostile {case[0]} {case[-3:]}: exit {p.returncode} {p.stderr[-200:]}", file=sys.stderr)
    return {"hostile_writes": len(cases), "hostile_writes_refused": refused, "hostile_writes_silent": silent}


def hostile_sql24(run: Path) -> list[list]:
    shard = sorted((run / "samples").glob("part-*.parquet"))[0]
    inspect = [
        f"EXPLAIN ANALYZE COPY (SELECT * FROM samples LIMIT 1) TO '{shard}' (FORMAT parquet)",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        f"EXPLAIN (FORMAT json) COPY samples TO '{shard}' (FORMAT parquet)",
        f"/* c */ explain analyze copy (select 1) to '{shard}'",
        "SELECT 1; SELECT 2",
    ]
    smuggle = f"true), false) FROM samples; COPY (SELECT 1) TO '{shard}'; SELECT sample_id, coalesce((true"
    cases: list[list] = [["inspect", run, "--sql", s] for s in inspect]
    cases.append(["select", run, "sql", "--keep", smuggle, "--name", "smuggle"])
    cases.append(
        [
            "train",
            run,
            "--selection",
            "all",
            "--model",
            "builtin:tiny",
            "--name",
            "ev",
            *TRAIN_SETS,
            "--set",
            f"eval_where=true; COPY (SELECT 1 AS x) TO '{shard}' (FORMAT parquet)",
        ]
    )
    return cases


def sql24_trial(winnow, run: Path) -> dict:
    before = _tree(run)
    cases = hostile_sql24(run)
    refused = sum(winnow(*c).returncode == 2 and _tree(run) == before for c in cases)
    return {"hostile_sql24": len(cases), "hostile_sql24_refused": refused}
