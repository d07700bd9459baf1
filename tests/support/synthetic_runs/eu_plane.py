"""The synthetic run of test_eu_plane.py (hand-computable signals in two shards), shared with the tests of
selection, resume, card, export and inspect."""

from __future__ import annotations

import math

from winnow.pipeline.store import RunDir

from stage_fixtures import write_signals, write_synthetic_samples

L2, L8 = math.log(2.0), math.log(8.0)
S3_NLL = {2: 1.0, 3: 2.0, 4: 0.5, 7: 1.5, 8: 3.0}  # the Q2 sample: two supervised spans


def _signals(n, sup, nll, ent, extra=None):
    """logprob/entropy lists: values at supervised positions, `extra` at unsupervised ones, null at 0."""
    lp = [None] * n
    en = [None] * n
    for i in sup:
        lp[i], en[i] = -nll[i], ent
    for i, v in (extra or {}).items():
        lp[i], en[i] = v, 9.0
    return lp, en


def make_run(root) -> RunDir:
    """Six samples over two shards; PPL [1, 2, 2, e^1.6, 8], entropy [5, 1, 3, 2, 4], s5 has no supervised token.

    s0 is a one-token response, s1/s2 tie on PPL, s3 has two supervised spans and prompt positions that
    carry (unsupervised) values, which must not enter its means or its neighbours.
    """
    run = RunDir(root, create=True)
    rows0 = [
        {"sample_id": "s0", "input_ids": [1, 2], "loss_mask": [0, 1]},
        {"sample_id": "s1", "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
        {"sample_id": "s2", "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
    ]
    rows1 = [
        {"sample_id": "s3", "input_ids": list(range(10)), "loss_mask": [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]},
        {"sample_id": "s4", "input_ids": [1, 2, 3, 4], "loss_mask": [0, 1, 1, 1]},
        {"sample_id": "s5", "input_ids": [1, 2], "loss_mask": [0, 0]},
    ]
    write_synthetic_samples(run, 0, rows0)
    write_synthetic_samples(run, 1, rows1)
    sig0 = [
        _signals(2, [1], {1: 0.0}, 5.0),
        _signals(3, [1, 2], {1: L2, 2: L2}, 1.0),
        _signals(3, [1, 2], {1: L2, 2: L2}, 3.0),
    ]
    sig1 = [
        _signals(10, S3_NLL, S3_NLL, 2.0, extra={1: -9.0, 5: -9.0, 6: -9.0, 9: -9.0}),
        _signals(4, [1, 2, 3], {i: L8 for i in (1, 2, 3)}, 4.0),
        ([None, -1.0], [None, 1.0]),
    ]
    for part, ids, sig in ((0, ["s0", "s1", "s2"], sig0), (1, ["s3", "s4", "s5"], sig1)):
        cols = {"logprob": [s[0] for s in sig], "entropy": [s[1] for s in sig]}
        write_signals(run, "current", part, ids, cols, model_fingerprint="m-current")
    return run
