"""The synthetic run of test_excess_loss.py (hand-computable signals in two shards), shared with the tests of
selection, resume, card, export and inspect."""

from __future__ import annotations

from winnow.pipeline.store import RunDir

from stage_fixtures import write_signals, write_synthetic_samples

# current / reference log-probs; values are binary fractions so every excess loss is exact
CUR = {
    "a": [None, -1.0, -1.5, -0.25],
    "b": [None, -2.0, -0.5],
    "c": [None, -3.0, -1.25, -5.0, -5.0, -0.5, -1.0],
    "d": [None, -0.75],
}
REF = {
    "a": [None, -0.5, -0.5, -0.5],
    "b": [None, -1.0, -0.25],
    "c": [None, -1.0, -0.25, -1.0, -1.0, -0.5, None],  # position 6 supervised but no reference value
    "d": [None, -1.0],
}
MASK = {"a": [0, 1, 1, 1], "b": [0, 1, 1], "c": [0, 1, 1, 0, 0, 1, 1], "d": [0, 1]}
SHARDS = {0: ["a", "b"], 1: ["c", "d"]}
# excess = nll_cur - nll_ref at scored positions
EXCESS = {
    ("a", 1): 0.5,
    ("a", 2): 1.0,
    ("a", 3): -0.25,
    ("b", 1): 1.0,
    ("b", 2): 0.25,
    ("c", 1): 2.0,
    ("c", 2): 1.0,
    ("c", 5): 0.0,
    ("d", 1): -0.25,
}


def make_run(root) -> RunDir:
    run = RunDir(root, create=True)
    for part, ids in SHARDS.items():
        rows = [{"sample_id": s, "input_ids": list(range(len(MASK[s]))), "loss_mask": MASK[s]} for s in ids]
        write_synthetic_samples(run, part, rows)
        write_signals(run, "current", part, ids, {"logprob": [CUR[s] for s in ids]}, model_fingerprint="cur")
        write_signals(
            run, "reference", part, ids, {"logprob": [REF[s] for s in ids]}, model_fingerprint="ref"
        )
    return run
