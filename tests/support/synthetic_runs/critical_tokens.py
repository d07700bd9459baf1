"""The synthetic run of test_critical_tokens.py (hand-computable signals in two shards), shared with the tests of
selection, resume, card, export and inspect."""

from __future__ import annotations

from winnow.pipeline.store import RunDir

from stage_fixtures import write_signals, write_synthetic_samples

# sample -> (loss mask, p_CE list, label); binary fractions so 1 - p is exact
DATA = {
    "w": ([0, 1, 1, 1, 0, 1], [None, 0.875, 0.25, 0.5, 0.0078125, 0.125], False),  # multi-turn, incorrect
    "r": ([0, 1, 1], [None, 0.75, 0.5], True),
    "u": ([0, 1], [None, 0.25], None),  # unlabelled
    "o": ([0, 1], [None, 0.0625], False),  # one-token incorrect answer
}
SHARDS = {0: ["w", "r"], 1: ["u", "o"]}


def make_run(root, labels=None, label_key="meta_is_correct") -> RunDir:
    run = RunDir(root, create=True)
    for part, ids in SHARDS.items():
        rows = [
            {
                "sample_id": s,
                "input_ids": list(range(len(DATA[s][0]))),
                "loss_mask": DATA[s][0],
                label_key: (labels or {}).get(s, DATA[s][2]),
                "meta_source_kind": "demo",
            }
            for s in ids
        ]
        write_synthetic_samples(run, part, rows)
        write_signals(run, "contrast", part, ids, {"p_ce": [DATA[s][1] for s in ids]})
    return run
