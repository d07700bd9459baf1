"""The trainer's CUDA path, checked on the CPU: the head under autocast gets the autocast dtype (and its
gradients reach the fp32 weights in fp32), every rank pins its own GPU, and the ranks agree on the
head's backend. Expected values: float64 full logits on the bf16-rounded operands (tolerance: the
reference's gradients come back in bf16, relative rounding 2^-8, so rtol 1e-2; the loss is fp32 sums
of exact products, rtol 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from winnow.kernels import self_check, switch
from winnow.trainer import distributed, kernel_agreement
from winnow.trainer.loss import WeightedLMLoss

from trainer_fixtures import tiny_llama

CPU = torch.device("cpu")


def _spy(monkeypatch):
    seen = []
    real = switch.linear_cross_entropy_reference

    def spy(h, w, *a):
        seen.append((h.dtype, w.dtype))
        return real(h, w, *a)

    monkeypatch.setattr(switch, "linear_cross_entropy_reference", spy)
    return seen


def test_head_under_autocast_runs_in_its_dtype_and_grads_reach_fp32(monkeypatch):
    seen = _spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 16, generator=g).requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    b = torch.randn(50, generator=g).requires_grad_()
    y, wt = torch.randint(0, 50, (12,), generator=g), torch.rand(12, generator=g)
    wt[::4] = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = switch.linear_cross_entropy(h, w, y, wt, b)
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    h64, w64, b64 = (x.detach().bfloat16().double().requires_grad_() for x in (h, w, b))
    z = h64 @ w64.T + b64
    want = (wt.double() * (torch.logsumexp(z, -1) - z.gather(-1, y[:, None]).squeeze(-1))).sum()
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) <= 1e-5 * abs(float(want.detach()))
    for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    seen.clear()
    switch.linear_cross_entropy(h, w, y, wt, b)  # no autocast: the fp32 operands as they are
    assert seen == [(torch.float32, torch.float32)]


def test_trainer_loss_under_cpu_autocast(monkeypatch):
    seen = _spy(monkeypatch)
    model = tiny_llama(tied=True)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    gather, targets = torch.tensor([0, 3, 10, 15]), torch.tensor([ids[0, 1], ids[0, 4], ids[1, 2], ids[1, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = WeightedLMLoss(model)(ids, gather, targets, torch.tensor([1.0, 0.5, 1.0, 2.0]))
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    head = model.get_output_embeddings().weight
    assert head.dtype == head.grad.dtype == torch.float32 and head.grad.abs().sum() > 0


def test_setup_pins_each_rank_to_its_local_gpu(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    d = distributed.setup("cuda")
    assert calls == [("set_device", 1), ("init", "nccl")] and d.local_rank == 1
    calls.clear()
    distributed.setup("cpu")
    assert calls == [("init", "gloo")]


@pytest.fixture
def auto_on_cpu(monkeypatch):
    self_check.reset()
    monkeypatch.setenv("WINNOW_KERNELS", "auto")
    monkeypatch.setattr(switch, "_eligible", lambda dev: True)
    monkeypatch.setattr(switch, "_has_triton", lambda: True)
    monkeypatch.setattr(self_check, "run_check", lambda *a: None)  # this rank's kernel passes
    yield
    self_check.reset()


def test_one_failing_rank_pins_the_reference_on_every_rank(monkeypatch, auto_on_cpu):
    sent = []
    monkeypatch.setattr(kernel_agreement, "all_reduce_sum", lambda v, dev: sent.append(v) or [v[0] + 1.0])
    with pytest.warns(RuntimeWarning, match="another rank"):
        ok = kernel_agreement.agree_on_head_backend(
            CPU, torch.bfloat16, True, False, distributed.Dist(0, 2, 0)
        )
    assert ok is False and sent == [[0.0]]
    assert switch.backend(CPU, torch.bfloat16, True, False) == "reference"


def test_agreeing_ranks_keep_triton_and_fp32_is_not_checked(monkeypatch, auto_on_cpu):
    monkeypatch.setattr(kernel_agreement, "all_reduce_sum", lambda v, dev: [v[0] + 0.0])
    assert kernel_agreement.agree_on_head_backend(CPU, torch.bfloat16, False, True, distributed.Dist(1, 2, 1))
    assert switch.backend(CPU, torch.bfloat16, False, True) == "triton"
    assert kernel_agreement.agree_on_head_backend(CPU, None, False, False, distributed.Dist(0, 2, 0)) is None
    monkeypatch.setenv("WINNOW_KERNELS", "reference")
    assert (
        kernel_agreement.agree_on_head_backend(CPU, torch.bfloat16, False, False, distributed.Dist()) is None
    )
