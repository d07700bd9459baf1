"""LoRA through peft: zero effect at step 0, only adapters train, save/load and merge round-trips."""

from __future__ import annotations

import json
import sys

import peft  # noqa: E402,F401  (a dev dependency: a missing peft fails here, never skips)
import pytest
import torch

from winnow.pipeline.errors import UserError
from winnow.pipeline.params import build_params
from winnow.trainer import lora


def _tiny(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    base = tmp_path / "base"
    model.save_pretrained(str(base), safe_serialization=True)
    return model, base


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _perturb(model):
    """One SGD step on a random loss so that the adapters are no longer zero."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def test_adapters_start_at_zero_effect_and_only_they_train(tmp_path):
    model, _ = _tiny(tmp_path)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = lora.apply_lora(model, lora.LoraParams(r=4), torch.device("cpu"))
    assert torch.equal(_logits(wrapped, ids), before)  # B = 0 at init: exactly the full model
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every projection of both layers, never the LM head
    assert {n.split(".")[-4] for n in trainable if ".layers." in n} >= {"q_proj", "v_proj", "down_proj"}
    assert not any("lm_head" in n for n in trainable)
    _perturb(wrapped)
    assert not torch.equal(_logits(wrapped, ids), before)
    base_now = lora.base_causal_lm(wrapped).state_dict()
    for k, v in frozen.items():  # peft renames wrapped Linear weights to <name>.base_layer.weight
        key = k if k in base_now else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_now[key], v), k


def test_adapter_save_load_and_merge_reproduce_the_trained_model(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model, base = _tiny(tmp_path)
    wrapped = lora.apply_lora(model, lora.LoraParams(r=4, target="q_proj,v_proj"), torch.device("cpu"))
    _perturb(wrapped)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    want = _logits(wrapped, ids)
    out = tmp_path / "out"
    lora.save_adapter(wrapped, out, base)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert (out / "adapter_model.safetensors").is_file()
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.allclose(_logits(loaded, ids), want, atol=1e-6, rtol=0)
    lora.save_merged(wrapped, out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert torch.allclose(_logits(merged, ids), want, atol=1e-5, rtol=0)
    assert torch.allclose(_logits(lora.load_causal_lm(out).eval(), ids), want, atol=1e-5, rtol=0)
    assert torch.equal(_logits(wrapped, ids), want)  # saving the merged copy left the adapters alone


def test_parameters_and_errors(tmp_path, monkeypatch):
    p = build_params(lora.LoraParams, {"r": "16"}, "winnow train")
    assert (p.enabled, p.targets) == (True, "all-linear")
    assert build_params(lora.LoraParams, {"r": "8", "target": "q_proj, v_proj"}, "t").targets == [
        "q_proj",
        "v_proj",
    ]
    with pytest.raises(UserError, match="merge"):
        build_params(lora.LoraParams, {"merge": "true"}, "winnow train")
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "builtin:tiny"}))
    with pytest.raises(UserError, match="not a local model directory"):
        lora.adapter_base(bad)
    assert lora.adapter_base(tmp_path) is None
    model, _ = _tiny(tmp_path)
    with pytest.raises(UserError, match="nope_proj"):
        lora.apply_lora(model, lora.LoraParams(r=2, target="nope_proj"), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'winnow\[peft\]'"):
        lora.require_peft()
