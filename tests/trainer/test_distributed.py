"""grad_accum g on 2 gloo ranks applies the same gradients as 2g micro-batches in one process.

Same plan, same seeded order: step s runs the same micro-batches either way; the gradients compared
are those handed to the optimizer (after the ``world / Σ w`` scaling). fp32; tolerance 1e-6 absolute
(gradients are O(0.01-1); the only difference is the order of a few float sums). FSDP2's ``fully_shard`` runs on CPU
with gloo here (torch 2.13), so both wrappers are checked in one spawned group. The epoch's last step
has fewer micro-batches than ranks x g: the ranks without one run an empty micro-batch, covered here.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from winnow.trainer.distributed import Dist

from dist_worker import capture_step_grads, make_loop, worker

G = 2


def _single(steps):
    loop = make_loop(2 * G, False, Dist())
    return capture_step_grads(loop, steps), len(loop.plan)


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_two_ranks_equal_one_process_ddp_and_fsdp2(tmp_path):
    torch.set_num_threads(1)
    ref, n_batches = _single(steps=2)
    assert n_batches % (2 * G) != 0 and n_batches > 2 * G  # a full step, then a ragged last one
    steps = -(-n_batches // (2 * G))
    assert steps == 2
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), G, str(out), steps), nprocs=2, join=True)
    for mode, got in torch.load(out, weights_only=True).items():
        _compare(ref, got, mode)


def _compare(ref, got, mode):
    assert len(got) == len(ref) == 2, mode
    for s in range(2):
        assert ref[s].keys() == got[s].keys()
        for name, g in ref[s].items():
            assert float(g.abs().max()) > 0 or "embed" in name
            diff = float((got[s][name] - g).abs().max())
            assert diff < 1e-6, (mode, s, name, diff)
