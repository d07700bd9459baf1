"""`winnow train` parameters: grouped per feature, every pre-group `--set` name still parses to the same value."""

from __future__ import annotations

import dataclasses

import pytest

from winnow.pipeline.errors import UserError
from winnow.pipeline.params import build_params
from winnow.pipeline.store import stable_hash
from winnow.trainer.config import ALIASES, TrainParams
from winnow.trainer.online_params import OnlineParams

# the 44 fields of TrainParams before the groups (commit 038f9c9), in their order
OLD_FIELDS = """model selection data name out max_steps epochs lr min_lr_ratio warmup_steps weight_decay
max_grad_norm tokens_per_batch max_seq_len grad_accum layout eval_fraction eval_where eval_every
eval_max_samples save_every keep_checkpoints seed device dtype threads activation_checkpointing fsdp log_every
progress online q_tuning rho1 sstoken masked_thought record_weights online_scoring always_keep lora_r
lora_alpha lora_dropout lora_target merge prompt_tuning""".split()

# old name=value as typed on the command line -> where the value lands now, and the value (by hand)
OLD_SETS = [
    ("online", "sstoken", "online.policy", "sstoken"),
    ("q_tuning.r_sample", "0.5", "online.q_tuning.r_sample", 0.5),
    ("q_tuning.r_token", "0.7", "online.q_tuning.r_token", 0.7),
    ("q_tuning.lam", "0.3", "online.q_tuning.lam", 0.3),
    ("q_tuning.batch_size", "4", "online.q_tuning.batch_size", 4),
    ("rho1.k_ratio", "0.3", "online.rho1.k_ratio", 0.3),
    ("rho1.reference", "builtin:tiny-reference", "online.rho1.reference", "builtin:tiny-reference"),
    ("sstoken.gamma", "0.2", "online.sstoken.gamma", 0.2),
    ("sstoken.rho", "0.4", "online.sstoken.rho", 0.4),
    ("sstoken.history", "ema", "online.sstoken.history", "ema"),
    ("sstoken.ema_decay", "0.9", "online.sstoken.ema_decay", 0.9),
    ("sstoken.cache_history", "false", "online.sstoken.cache_history", False),
    ("record_weights", "true", "online.record_weights", True),
    ("online_scoring", "separate", "online.scoring", "separate"),
    ("always_keep", "<|im_end|>,####", "online.always_keep", ["<|im_end|>", "####"]),
    ("masked_thought.p", "0.2", "masked_thought.p", 0.2),
    ("masked_thought.warmup", "0.5", "masked_thought.warmup", 0.5),
    ("lora_r", "4", "lora.r", 4),
    ("lora_alpha", "16", "lora.alpha", 16),
    ("lora_dropout", "0.1", "lora.dropout", 0.1),
    ("lora_target", "q_proj,v_proj", "lora.target", "q_proj,v_proj"),
    ("merge", "true", "lora.merge", True),
]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_old_set_name_parses_to_the_same_value():
    values = {old: text for old, text, _, _ in OLD_SETS}
    p = build_params(TrainParams, values, "test")
    old_base, new_base = {"online": "q_tuning", "lora_r": "2"}, {"online.policy": "q_tuning", "lora.r": "2"}
    for old, text, new, want in OLD_SETS:
        assert _get(p, new) == want, (old, new)
        if old not in old_base:  # each old name alone gives what its new key alone gives
            one_old = build_params(TrainParams, old_base | {old: text}, "test")
            assert one_old == build_params(TrainParams, new_base | {new: text}, "test"), old
            assert one_old != build_params(TrainParams, old_base, "test"), old  # it did set something
    assert build_params(TrainParams, {new: text for _, text, new, _ in OLD_SETS}, "test") == p
    # every old top-level name is a field still or has an alias; every sub-key of the old groups above
    now = {f.name for f in dataclasses.fields(TrainParams)}
    assert [f for f in OLD_FIELDS if f not in now and f not in ALIASES] == []
    # recipe sub-tables by the old group names work too, and the new group's own table
    t = build_params(TrainParams, {"q_tuning": {"r_sample": "0.5"}, "online": "q_tuning"}, "test")
    assert (t.online.policy, t.online.q_tuning.r_sample) == ("q_tuning", 0.5)
    t = build_params(TrainParams, {"online": {"policy": "rho1", "rho1": {"k_ratio": 0.2}}}, "test")
    assert (t.online.policy, t.online.rho1.k_ratio) == ("rho1", 0.2)
    with pytest.raises(UserError, match="name the same parameter"):
        build_params(TrainParams, {"lora_r": "4", "lora.r": "8"}, "test")
    with pytest.raises(UserError, match="unknown"):
        build_params(TrainParams, {"online.always_keep_ids": "5"}, "test")


def test_identity_keeps_the_pre_group_form():
    """The identity hashes the trainer computed at 038f9c9 (before the groups) for the same settings: an
    ``--out`` trained then still resumes, and the recorded ``config`` reads the same."""
    cases = [
        ("ab48065c5c75ef5b", {}),
        (
            "15da1151c21b8d7b",
            {
                "online": "q_tuning",
                "q_tuning.r_sample": "0.5",
                "q_tuning.batch_size": "4",
                "record_weights": "true",
            },
        ),
        (
            "bda22f16237826b5",
            {
                "online": "sstoken",
                "sstoken.history": "ema",
                "online_scoring": "separate",
                "always_keep": "a,b",
            },
        ),
        (
            "0705edd613e25f13",
            {
                "online": "rho1",
                "rho1.reference": "base",
                "rho1.k_ratio": "0.3",
                "lora_r": "4",
                "lora_alpha": "16",
                "lora_dropout": "0.1",
                "lora_target": "q_proj,v_proj",
                "merge": "true",
            },
        ),  # fmt: skip
        (
            "9274edd49e33ef36",
            {
                "prompt_tuning.num_virtual_tokens": "4",
                "layout": "padded",
                "masked_thought.p": "0.2",
                "lr": "0.01",
            },
        ),
    ]
    for want, values in cases:
        ident = build_params(TrainParams, values, "test").identity()
        assert list(ident)[:5] == ["model", "selection", "data", "name", "out"]
        if want != "bda22f16237826b5":  # recorded with always_keep "<|im_end|>,####"
            assert stable_hash(ident) == want, values
    ident = build_params(TrainParams, cases[2][1] | {"always_keep": "<|im_end|>,####"}, "test").identity()
    assert stable_hash(ident) == "bda22f16237826b5"
    # before the groups every policy used q_tuning.batch_size: a policy's own size enters the identity
    # only where it differs from that one, i.e. where an old run with the same settings computed otherwise
    assert "rho1" in ident and "batch_size" not in ident["rho1"] and "online_batch_size" not in ident
    other = build_params(TrainParams, {"online": "rho1", "q_tuning.batch_size": "4"}, "test").identity()
    assert other["online_batch_size"] == 8  # an old run with these settings drew mini-batches of 4
    same = {"online": "rho1", "q_tuning.batch_size": "4", "rho1.batch_size": "4"}
    assert "online_batch_size" not in build_params(TrainParams, same, "test").identity()
    unused = build_params(TrainParams, {"rho1.batch_size": "4"}, "test").identity()  # online=none
    assert stable_hash(unused) == "ab48065c5c75ef5b"


def test_groups_are_keyword_only():
    """``OnlineParams("sstoken", ...)`` once took its fields by position: a field added before
    ``always_keep_ids`` silently turned the always-keep floor off. Every group refuses positions now."""
    with pytest.raises(TypeError):
        OnlineParams("sstoken")  # type: ignore[misc]
    for cls in (TrainParams, OnlineParams, *(type(m) for m in (OnlineParams().q_tuning, TrainParams().lora))):
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls
    assert TrainParams(online=OnlineParams(policy="rho1", always_keep_ids=(5,))).online.always_keep_ids == (
        5,
    )
