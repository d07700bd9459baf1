"""Half fine-tuning (winnow.trainer.hft): the draw's shape per layer, reproducible from its seed, frozen
tensors bitwise unchanged with no optimizer state, refused where it cannot apply."""

from __future__ import annotations

import re

import pytest
import torch

from winnow.trainer.hft import HftParams
from winnow.trainer.method import MethodContext, apply_trainable

from trainer_fixtures import tiny_llama


def _model(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _trained_modules(model):
    """{layer: set of trained module names}, read back from requires_grad (not from the draw)."""
    out = {}
    for name, q in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)\.weight$", name)
        if m and q.requires_grad:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def _apply(model, seed):
    return apply_trainable(
        [HftParams(enabled=True, seed=seed)], model, MethodContext(device=torch.device("cpu"))
    )


@pytest.mark.parametrize("layers", [4, 5])
def test_draw_shape_and_seed(layers):
    model = _apply(_model(layers), seed=3)
    got = _trained_modules(model)
    attn, mlp, norms = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}, set()
    norms = {"input_layernorm", "post_attention_layernorm"}
    ffn_counts = []
    for layer in range(layers):
        assert len(got[layer] & attn) == 2 and len(got[layer] & norms) == 1, got[layer]
        ffn_counts.append(len(got[layer] & mlp))
    assert sorted(ffn_counts) == [1] * (layers - layers // 2) + [2] * (layers // 2)
    outside = [n for n, q in model.named_parameters() if "layers." not in n]
    assert outside and all(q.requires_grad for n, q in model.named_parameters() if n in outside)
    assert _trained_modules(_apply(_model(layers), seed=3)) == got  # reproducible
    assert any(_trained_modules(_apply(_model(layers), seed=s)) != got for s in (4, 5))  # seeds differ


def test_frozen_tensors_unchanged_and_without_optimizer_state():
    from method_loop import _loop

    method = HftParams(enabled=True, seed=1)
    model = apply_trainable([method], tiny_llama(seed=8), MethodContext(device=torch.device("cpu")))
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    loop = _loop([method], model, epochs=3)
    for step in range(3):
        loop.train_step(step)
    trained = set(method.trained)
    assert trained and len(trained) < len(start)
    for n, q in model.named_parameters():
        assert torch.equal(q, start[n]) != (n in trained), n  # frozen: bitwise; trained: moved
    named = dict(model.named_parameters())
    assert {id(q) for q in loop.opt.state} == {id(named[n]) for n in trained}
    assert method.record()["hft"]["trained"] == sorted(trained)


def test_refused_with_adapters():
    from winnow.core.errors import UserError
    from winnow.core.params import build_params
    from winnow.trainer.config import TrainParams

    p = build_params(TrainParams, {"hft": "true", "hft.seed": "4"}, "--set")
    assert p.hft.enabled and p.hft.seed == 4 and p.methods() == [p.hft]
    assert "hft" in p.identity() and "hft" not in TrainParams().identity()
    for extra, match in (
        (dict(lora_r="4"), "hft=true with lora.r"),
        ({"prompt_tuning.num_virtual_tokens": "4"}, "hft=true with"),
    ):
        with pytest.raises((ValueError, UserError), match=match):
            build_params(TrainParams, {"hft": "true", **extra}, "--set")
    assert build_params(TrainParams, {"hft": "true", "fsdp": "true"}, "--set").fsdp  # test_method_distributed
    with pytest.raises((ValueError, UserError), match="greentrainer.rho with fsdp=true"):
        build_params(TrainParams, {"greentrainer.rho": "0.5", "fsdp": "true"}, "--set")


def test_model_without_llama_layers_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="Llama-like"):
        _apply(model, 0)
