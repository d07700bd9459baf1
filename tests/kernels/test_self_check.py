"""The self-check behind ``WINNOW_KERNELS=auto`` (kernels/self_check.py), on the CPU interpreter: it
passes the real kernels, and pins the reference (warning once) when a kernel raises or returns a
perturbed value or gradient. The expected verdicts come from the injected faults, not from the check.
The switch's ``auto`` is admitted to the CPU by patching ``switch._eligible`` (on a GPU it is CUDA)."""

from __future__ import annotations

import warnings

import pytest
import torch

from winnow.kernels import self_check as sc
from winnow.kernels import switch

CPU = torch.device("cpu")
SMALL = (60, 1031, 40)  # N, V, D: ragged too (V and D off the block sizes); the real case costs ~5 s here


def _tk():
    from winnow.kernels import triton_linear_cross_entropy as tk

    return tk


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    sc.reset()
    monkeypatch.setenv("WINNOW_KERNELS", "auto")
    yield
    sc.reset()


def test_real_kernel_passes_the_full_case():
    """The documented case, N=200, V=4099, D=136, in bf16 (~2 s here; with bias and soft-cap ~7 s)."""
    assert sc.SHAPE == (200, 4099, 136)
    assert sc.run_check("linear_ce", CPU, torch.bfloat16, False, False) is None


@pytest.mark.parametrize("op", ["linear_ce", "logprob_entropy", "contrast"])
def test_real_kernels_pass_with_bias_and_softcap(monkeypatch, op):
    monkeypatch.setattr(sc, "SHAPE", SMALL)
    assert sc.run_check(op, CPU, torch.bfloat16, True, True) is None


def test_raising_kernel_pins_reference_and_warns_once(monkeypatch):
    tk = _tk()
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tk, "linear_cross_entropy_triton", boom)
    monkeypatch.setattr(switch, "_eligible", lambda dev: True)
    ref = []
    real_ref = switch.linear_cross_entropy_reference
    monkeypatch.setattr(
        switch, "linear_cross_entropy_reference", lambda *a, **k: (ref.append(1), real_ref(*a, **k))[1]
    )
    h, w = torch.randn(6, 8, dtype=torch.bfloat16), torch.randn(20, 8, dtype=torch.bfloat16)
    y, wt = torch.randint(0, 20, (6,)), torch.ones(6)
    with pytest.warns(
        RuntimeWarning, match=r"linear_ce kernel failed its self-check.*raised RuntimeError: CUDA error"
    ):
        switch.linear_cross_entropy(h, w, y, wt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither re-checks nor warns
        switch.linear_cross_entropy(h, w, y, wt)
    assert len(calls) == 1 and len(ref) == 2
    assert switch.backend(CPU, torch.bfloat16, False, False) == "reference"
    assert sc.report() == {
        "linear_ce/cpu/bfloat16/False/False": "raised RuntimeError: CUDA error: an illegal memory access was encountered"
    }


def test_perturbed_loss_fails(monkeypatch):
    monkeypatch.setattr(sc, "SHAPE", SMALL)
    tk = _tk()
    real = tk.linear_cross_entropy_triton
    monkeypatch.setattr(tk, "linear_cross_entropy_triton", lambda *a, **k: real(*a, **k) * 1.01)
    failure = sc.run_check("linear_ce", CPU, torch.bfloat16, False, False)
    assert failure is not None and failure.startswith("loss: max |diff|")


def test_perturbed_gradient_fails(monkeypatch):
    """The forward is exact; dL/dz comes back 10% too large: only the gradient comparison can see it."""
    monkeypatch.setattr(sc, "SHAPE", SMALL)
    tk = _tk()
    real = tk._grad_logits
    monkeypatch.setattr(tk, "_grad_logits", lambda *a, **k: real(*a, **k) * 1.1)
    failure = sc.run_check("linear_ce", CPU, torch.float32, True, False)
    assert failure is not None and failure.startswith("grad h:"), failure


def test_perturbed_split_merge_fails(monkeypatch):
    """A merge that drops the last vocabulary slice is right with one split and wrong with three."""
    monkeypatch.setattr(sc, "SHAPE", SMALL)
    tk = _tk()
    real = tk._merge
    monkeypatch.setattr(tk, "_merge", lambda state: real(state[:-1] if state.shape[0] > 1 else state))
    failure = sc.run_check("logprob_entropy", CPU, torch.bfloat16, False, True)
    assert failure is not None and "vocabulary splits: 3" in failure


def test_perturbed_logprob_fails(monkeypatch):
    monkeypatch.setattr(sc, "SHAPE", SMALL)
    tk = _tk()
    real = tk.logprob_entropy_triton
    monkeypatch.setattr(
        tk, "logprob_entropy_triton", lambda *a, **k: (lambda lp, e: (lp + 0.02, e))(*real(*a, **k))
    )
    failure = sc.run_check("logprob_entropy", CPU, torch.bfloat16, False, False)
    assert failure is not None and failure.startswith("log-prob")


def test_auto_checks_once_per_key_and_keeps_fp32_on_the_reference(monkeypatch):
    seen = []
    monkeypatch.setattr(sc, "run_check", lambda op, dev, dt, b, c: seen.append((op, dt, b, c)))
    monkeypatch.setattr(switch, "_eligible", lambda dev: True)
    assert switch.backend(CPU, torch.float32) == "reference"  # fp32: never checked, never Triton
    assert switch.backend(CPU, torch.bfloat16, True, False) == "triton"
    assert switch.backend(CPU, torch.bfloat16, True, False) == "triton"
    assert switch.backend(CPU, torch.bfloat16, True, True, op="logprob_entropy") == "triton"
    assert seen == [
        ("linear_ce", torch.bfloat16, True, False),
        ("logprob_entropy", torch.bfloat16, True, True),
    ]
    monkeypatch.setattr(switch, "_eligible", lambda dev: False)
    assert switch.backend(CPU, torch.bfloat16) == "reference"  # CPU tensors under auto: the reference


def test_reduce_pins_every_rank_when_one_fails(monkeypatch):
    """The agreed verdict wins over a local pass; ``reduce`` runs even for a key checked before."""
    monkeypatch.setattr(sc, "run_check", lambda *a: None)
    votes = []
    assert sc.passes("linear_ce", CPU, torch.bfloat16, False, False)  # checked lazily first
    with pytest.warns(RuntimeWarning, match="another rank"):
        ok = sc.passes(
            "linear_ce", CPU, torch.bfloat16, False, False, reduce=lambda v: votes.append(v) or False
        )
    assert not ok and votes == [True]
    assert not sc.passes("linear_ce", CPU, torch.bfloat16, False, False)


@pytest.mark.parametrize("op", ["linear_ce", "logprob_entropy"])
def test_caller_modes_do_not_change_the_verdict(monkeypatch, op):
    """The first auto call may come from no_grad evaluation, an inference-mode pass, or a forward under
    autocast: the check still runs its backward and its fp32/float64 reference."""
    monkeypatch.setattr(sc, "SHAPE", SMALL)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert sc.run_check(op, CPU, torch.bfloat16, True, False) is None
    with torch.no_grad():
        assert sc.run_check(op, CPU, torch.bfloat16, False, True) is None
