"""The shared MFU convention (trainer/mfu.py) against a hand count on the tiny Llama of the fixtures:
hidden 32, MLP 64, 2 layers, 4 query heads / 2 KV heads of dim 8, vocabulary 300.

Per layer: q 32x32 = 1024, k 32x16 = 512, v 512, o 1024, gate/up/down 3 x 32x64 = 6144: 9216; two
layers 18432. Head 300x32 = 9600 (the input embedding is a lookup: no FLOPs). Attention per layer
d_attn = 4 x 8 = 32."""

from __future__ import annotations

import pytest

from winnow.trainer.mfu import mfu, step_flops

from trainer_fixtures import tiny_llama

T, R, S = 100, 40, 50**2 + 30**2  # tokens, weighted rows, sum of squared sample lengths
BODY, HEAD, D_ATTN, LAYERS = 18432, 9600, 32, 2
ATTN = 3 * 2 * LAYERS * D_ATTN * S  # causal forward 2·d·len² per layer, backward twice that


def test_full_fine_tuning_is_six_per_weight_and_causal_attention():
    model = tiny_llama(tied=False)
    assert step_flops(model, T, R, S) == 6 * BODY * T + 6 * HEAD * R + ATTN


def test_tied_head_counts_once_on_weighted_rows():
    assert step_flops(tiny_llama(tied=True), T, R, S) == 6 * BODY * T + 6 * HEAD * R + ATTN


def test_frozen_weights_skip_only_their_weight_gradient():
    model = tiny_llama(tied=False)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "model.layers.0.self_attn.q_proj.weight")
    assert step_flops(model, T, R, S) == 4 * BODY * T + 2 * 1024 * T + 4 * HEAD * R + ATTN


def test_lora_adapters_are_trained_weights_over_a_frozen_base():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(tied=False), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    adapters = LAYERS * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))  # q: A 2x32, B 32x2; v: A 2x32, B 16x2
    assert step_flops(model, T, R, S) == 4 * (BODY + adapters) * T + 2 * adapters * T + 4 * HEAD * R + ATTN


def test_mfu_divides_by_time_and_every_device_peak(monkeypatch):
    monkeypatch.setenv("WINNOW_PEAK_TFLOPS", "100")
    assert mfu(50e12, 2.0, devices=1) == pytest.approx(0.25)
    assert mfu(50e12, 2.0, devices=2) == pytest.approx(0.125)
    assert mfu(50e12, 1.0, peak_tflops=500) == pytest.approx(0.1)
