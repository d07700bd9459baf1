"""The synthetic run of test_sstoken.py (hand-computable signals in two shards), shared with the tests of
selection, resume, card, export and inspect."""

from __future__ import annotations

from winnow.pipeline.store import RunDir

from stage_fixtures import write_signals, write_synthetic_samples

# per sample: loss mask, REL at supervised positions (current log-prob = history log-prob -2 + REL), attention
CASES = {
    "a": (
        [0, 1, 1, 0, 0, 1, 1, 1],
        {1: 0.5, 2: -1.0, 5: 2.0, 6: 0.0, 7: 1.0},
        {1: 0.1, 2: 0.9, 5: 0.2, 6: 0.6, 7: 0.3},
    ),
    "b": ([0, 1, 1, 1], {1: 0.5, 2: 0.5, 3: 0.5}, {1: 0.2, 2: 0.2, 3: 0.4}),
    "c": ([0, 1], {1: 0.25}, {1: 0.7}),
    "d": ([0, 0, 0], {}, {}),
}
SHARDS = {0: ["a", "b"], 1: ["c", "d"]}


def _lists(name):
    mask, rel, attn = CASES[name]
    n = len(mask)
    his = [None] + [-2.0] * (n - 1)  # the history model also has values at prompt positions
    cur = [None] + [-2.0 + rel.get(i, 3.0) for i in range(1, n)]
    att = [None] + [attn.get(i, 0.99) for i in range(1, n)]
    return his, cur, att


def make_run(root, same_weights=False, anchor="query") -> RunDir:
    run = RunDir(root, create=True)
    for part, ids in SHARDS.items():
        rows = [
            {"sample_id": s, "input_ids": list(range(len(CASES[s][0]))), "loss_mask": CASES[s][0]}
            for s in ids
        ]
        write_synthetic_samples(run, part, rows)
        lists = [_lists(s) for s in ids]
        write_signals(run, "history", part, ids, {"logprob": [x[0] for x in lists]}, model_fingerprint="base")
        write_signals(
            run,
            "current",
            part,
            ids,
            {"logprob": [x[1] for x in lists], "attn_importance": [x[2] for x in lists]},
            model_fingerprint="base" if same_weights else "warm",
            attn_anchor=anchor,
        )
    return run
