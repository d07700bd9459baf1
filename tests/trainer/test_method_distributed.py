"""Every training method of issue 26 (and LeMo, issue 27) on 2 gloo ranks (DDP; FSDP2 for OTR, DFT and CAFT; grad_accum g) applies the gradients of one
process with 2g micro-batches: OTR's draws, HFT's draw and GreenTrainer's selection agree across ranks.
Steps 0 and the first of epoch 1 (GreenTrainer re-selects there with interval=1); fp32, tolerance 1e-6
absolute as test_distributed (only the order of a few float sums differs)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from dist_method_worker import FSDP2_METHODS, METHODS, method_loop, step_grads, worker

from winnow.trainer.distributed import Dist

G = 2


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_two_ranks_equal_one_process_for_every_method(tmp_path):
    torch.set_num_threads(1)
    first = method_loop("dft", 2 * G, Dist())
    steps = [0, first.steps_per_epoch]
    ref = {m: step_grads(method_loop(m, 2 * G, Dist()), steps) for m in METHODS}
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), G, str(out), steps), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert set(got) == set(METHODS) | {f"{m}-fsdp2" for m in FSDP2_METHODS}
    for mode in got:
        m = mode.removesuffix("-fsdp2")
        assert len(ref[m]) == len(got[mode]) == 2, mode
        for s in range(2):
            assert ref[m][s].keys() == got[mode][s].keys(), (mode, s)
            for name, g in ref[m][s].items():
                diff = float((got[mode][s][name] - g).abs().max())
                assert diff < 1e-6, (mode, s, name, diff)
    assert len(ref["hft"][0]) < len(ref["dft"][0]) and len(ref["greentrainer"][0]) < len(ref["dft"][0])
    assert len(ref["caft"][0]) > len(ref["dft"][0])  # the heads train too (caft.train_heads=true)
