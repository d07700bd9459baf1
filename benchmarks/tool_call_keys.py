"""What TL-Training's key-token policy keeps on the tool-call demo (RESULTS.md, "TL-Training").

    python -P benchmarks/tool_call_keys.py [RUN_DIR]

Ingests ``builtin:tool_calls`` with ``builtin:tiny`` (into a temporary folder unless RUN_DIR is given), runs
``winnow select RUN python:winnow.stages.policies.tool_call_keys:policy`` through the console script, then
reports from the selection it wrote: samples kept by reason, assistant replies by role (call targets,
answers, calls masked by the error filter), |P| and w per call reply, the key tokens' share of each call
reply's weight, and the share of all weight the key tokens carry. The per-reply records come from the
policy's own bookkeeping (``sample_weights(..., replies=)``); the selection's weights are checked to be
what that bookkeeping implies.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from winnow.stages.policies import tool_call_keys as tk

WINNOW = str(Path(sys.executable).parent / "winnow")
SPEC = "python:winnow.stages.policies.tool_call_keys:policy"


def _replies(samples: list[dict], selection: dict[str, dict]) -> list[dict]:
    out = []
    for row in samples:
        records: list[dict] = []
        w, _ = tk.sample_weights(
            row["text"], row["offsets"], row["loss_mask"], json.loads(row["messages"]), records
        )
        assert np.array_equal(w, np.asarray(selection[row["sample_id"]]["token_weight"], np.float32))
        out += records
    return out


def report(run: Path, select_s: float) -> None:
    samples = pq.read_table(run / "samples").to_pylist()
    sel = {r["sample_id"]: r for r in pq.read_table(run / "selection" / "tool_call_keys.policy").to_pylist()}
    reasons = collections.Counter((r["keep"], r["reason"]) for r in sel.values())
    replies = _replies(samples, sel)
    calls = [r for r in replies if r["target"] and r["P"]]
    answers = [r for r in replies if r["target"] and not r["P"]]
    masked = [r for r in replies if r["error"]]
    print(f"samples {len(samples)}: {dict(reasons)}; select {select_s:.1f} s")
    print(
        f"assistant replies {len(replies)}: {len(calls)} call targets, {len(answers)} answers, {len(masked)} masked"
    )
    print("|P| per call reply:", dict(sorted(collections.Counter(r["P"] for r in calls).items())))
    print("w per call reply:", dict(sorted(collections.Counter(round(r["w"], 2) for r in calls).items())))
    share = [r["w"] * r["P"] / (r["w"] * r["P"] + r["R"] - r["P"]) for r in calls]
    print(f"key share per call reply: mean {np.mean(share):.3f}, min {min(share):.3f}, max {max(share):.3f}")
    key_mass = sum(r["w"] * r["P"] for r in calls)
    total = sum(float(np.sum(r["token_weight"])) for r in sel.values())
    sup = sum(r["n_supervised"] for r in sel.values())
    weighted = sum(r["n_weighted"] for r in sel.values())
    print(f"key tokens {sum(r['P'] for r in calls)} of {weighted} weighted ({sup} supervised) tokens carry "
          f"{key_mass / total:.1%} of the weight ({key_mass:.0f} of {total:.0f})")  # fmt: skip


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tool-calls-")) / "run"
    if not (root / "samples").exists():
        subprocess.run(
            [WINNOW, "ingest", "builtin:tool_calls", "--run", root, "--model", "builtin:tiny"], check=True
        )
    started = time.perf_counter()
    subprocess.run([WINNOW, "select", root, SPEC], check=True)
    report(root, time.perf_counter() - started)


if __name__ == "__main__":
    main()
