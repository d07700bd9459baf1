"""Tests of winnow's own tiny model and tokenizer: chat template, GQA shape, quality, caching, locking.

Most tests use a shortened copy of the ``tiny`` recipe built once per module in a temporary cache
(a few seconds); one test checks the real builtin ``tiny`` in the shared cache (built once per
machine, ~1 min the first time, shared with every other test that needs it); the variants' behaviour
is checked by an opt-in slow test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from winnow.core.render import render_sample
from winnow.core.store import UserError
from winnow.pipeline.builtin import tiny_model as tm
from winnow.pipeline.builtin.demo_data import DEMO_SEED, generate_demo

HELD_OUT_SEED = 9090  # a draw no builtin recipe trains on
assert HELD_OUT_SEED != DEMO_SEED

SMALL = dataclasses.replace(
    tm.BUILTIN_MODELS["tiny"],
    name="tiny-test",
    vocab_size=1024,
    tokenizer_samples=600,
    data_samples=400,
    steps=100,
    tokens_per_batch=256,
    warmup_steps=10,
)  # ~7 s to train; reaches ~3.9 nats/token on held-out chats (ln 1024 = 6.9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Evaluate with one intra-op thread: on the shared 2-core machine two threads made these
    forwards ~10x slower (8.5 s vs 0.7 s for the held-out NLL)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("winnow_cache")


@pytest.fixture(scope="module")
def small_dir(cache_root: Path) -> Path:
    return tm.build_model(SMALL, cache_root / "models")


@pytest.fixture(scope="module")
def held_out() -> list[dict]:
    return generate_demo(64, HELD_OUT_SEED)


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path
    )


def test_tokenizer_round_trips_and_keeps_chat_template(small_dir: Path, held_out: list[dict]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_dir)
    assert tok.chat_template == tm.CHAT_TEMPLATE
    assert tok.eos_token == tok.pad_token == tm.EOS and tok.bos_token is None
    odd = "naïve café — 東京 🙂\ttabs  and  spaces 12.50 $-3"
    for text in [tm.render_chat(r["messages"]) for r in held_out[:16]] + [odd]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text
    # Specials are single tokens, never spelled out; digits are one per token.
    ids = tok(tm.render_chat(held_out[0]["messages"]), add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(tm.IM_START)
    assert all(
        len(tok.decode([i]).strip()) <= 1 for i in tok(" 12345", add_special_tokens=False)["input_ids"]
    )
    # The template, the Python renderer and the supervised spans agree.
    msgs = held_out[1]["messages"]
    assert tok.apply_chat_template(msgs, tokenize=False) == tm.render_chat(msgs)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == tm.render_chat(msgs[:1], add_generation_prompt=True)
    assert prompt.endswith(f"{tm.IM_START}assistant\n")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    r = render_sample(tok, msgs)
    ids, mask = r.input_ids, r.loss_mask
    assert out["input_ids"] == ids and out["assistant_masks"] == mask
    supervised = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert supervised == msgs[1]["content"] + tm.IM_END


def test_tokenizer_training_is_deterministic(held_out: list[dict]) -> None:
    texts = [tm.render_chat(r["messages"]) for r in held_out]
    a, b = tm.train_tokenizer(texts, 512), tm.train_tokenizer(texts, 512)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.convert_tokens_to_ids(list(tm.SPECIAL_TOKENS)) == [0, 1, 2]


def test_config_is_gqa_llama_with_tied_embeddings(small_dir: Path) -> None:
    config = json.loads((small_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is True
    assert config.get("use_cache", True) is True  # the trainer passes use_cache=False instead
    assert config["max_position_embeddings"] == 1024
    assert (small_dir / "model.safetensors").is_file()
    assert not list(small_dir.glob("*.bin"))  # no pickle
    info = json.loads((small_dir / tm.RECIPE_FILE).read_text())
    assert info["fingerprint"] == SMALL.fingerprint() and info["recipe"]["name"] == "tiny-test"


def test_small_model_beats_uniform_and_untrained(small_dir: Path, held_out: list[dict]) -> None:
    import torch
    from transformers import LlamaForCausalLM

    model, tok = _load(small_dir)
    texts = [tm.render_chat(r["messages"]) for r in held_out]
    trained = tm.mean_token_nll(model, tok, texts)
    torch.manual_seed(0)
    untrained = tm.mean_token_nll(LlamaForCausalLM(model.config), tok, texts)
    uniform = math.log(len(tok))
    assert untrained > 0.9 * uniform  # sanity: random init is near uniform
    assert trained < 0.65 * uniform, (trained, uniform)
    assert trained < untrained - 2.0, (trained, untrained)


def test_same_recipe_same_weights_and_exact_reload(
    small_dir: Path, cache_root: Path, held_out: list[dict]
) -> None:
    import torch

    again_dir = cache_root / "again"
    stats = tm.train_recipe(SMALL, again_dir, cache_root / "models")  # not via the cache
    again, _ = _load(again_dir)
    loaded, tok = _load(small_dir)
    texts = [tm.render_chat(r["messages"]) for r in held_out[:4]]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = again(**enc, use_cache=False).logits
        b = loaded(**enc, use_cache=False).logits
    assert torch.equal(a, b)
    assert a.abs().max() > 1.0  # not vacuous: real, non-constant logits
    saved = json.loads((small_dir / tm.RECIPE_FILE).read_text())["stats"]
    assert saved["loss_last10"] == stats["loss_last10"]


def test_training_data_weighs_every_token_for_a_base_and_assistant_tokens_for_a_fine_tune(
    small_dir: Path, tmp_path: Path
) -> None:
    """What the builder hands winnow's trainer: a scratch base learns every token of each chat plus a
    closing <|endoftext|>; a fine-tune learns what the chat template marks as the assistant's."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_dir)
    eos = tok.convert_tokens_to_ids(tm.EOS)
    n = tm._write_training_data(SMALL, small_dir, tmp_path / "base.parquet")
    rows = pq.read_table(tmp_path / "base.parquet").to_pylist()
    draw = generate_demo(SMALL.data_samples, SMALL.data_seed)
    assert n == len(rows) == len(draw)
    for row, r in zip(rows[:20], draw[:20], strict=True):
        text = tm.render_chat(r["messages"]) + tm.EOS
        assert (
            row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
            and row["input_ids"][-1] == eos
        )
        assert row["token_weight"] == [1.0] * len(row["input_ids"]) == row["loss_mask"]
    tune = dataclasses.replace(
        tm.BUILTIN_MODELS["tiny-warm"], base=SMALL, data_samples=30, name="tiny-test-tune"
    )
    tm._write_training_data(tune, small_dir, tmp_path / "tune.parquet")
    rows = pq.read_table(tmp_path / "tune.parquet").to_pylist()
    draw = generate_demo(30, tune.data_seed)
    assert 25 <= len(rows) <= 30  # rows render refuses are left out
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    matched = 0
    for r in draw:
        ref = tok.apply_chat_template(
            r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        got = by_ids.get(tuple(ref["input_ids"]))
        if got is not None:
            matched += 1
            assert got["token_weight"] == [float(m) for m in ref["assistant_masks"]] == got["loss_mask"]
            assert 0 < sum(got["token_weight"]) < len(got["input_ids"])
    assert matched == len(rows)


def test_second_call_returns_cache_without_rebuilding(
    small_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in small_dir.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was rebuilt")

    monkeypatch.setattr(tm, "train_recipe", no_training)
    assert tm.build_model(SMALL, cache_root / "models") == small_dir
    assert {p.name: p.stat().st_mtime_ns for p in small_dir.iterdir()} == before


def test_concurrent_builders_train_once_and_clear_crashed_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    micro = dataclasses.replace(
        SMALL, name="tiny-micro", vocab_size=300, tokenizer_samples=50, data_samples=40, steps=2
    )
    root = tmp_path / "models"
    root.mkdir()
    crashed = root / f".tmp-{micro.dir_name()}-99999999"
    crashed.mkdir()
    (crashed / "config.json").write_text("{half written")
    incomplete = root / micro.dir_name()  # a final directory without its recipe file is not trusted
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    calls: list[str] = []
    real = tm.train_recipe

    def counting(recipe, out, r=None):
        calls.append(recipe.name)
        return real(recipe, out, r)

    monkeypatch.setattr(tm, "train_recipe", counting)
    # flock locks belong to open file descriptions, so threads contend exactly like processes do.
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tm.build_model(micro, root))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["tiny-micro"]
    assert results == [incomplete] * 3 and (incomplete / tm.RECIPE_FILE).is_file()
    assert json.loads((incomplete / "config.json").read_text())["num_key_value_heads"] == 2
    assert not crashed.exists()
    assert not list(root.glob(".tmp-*"))


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, str):
        return {"all": "assistant", "assistant": "all"}.get(value, value + "-x")
    if isinstance(value, tuple):
        return (*value, "off_topic")
    if isinstance(value, tm.Architecture):
        return dataclasses.replace(value, hidden_size=value.hidden_size + value.num_heads)
    if isinstance(value, tm.TinyModelRecipe):
        return dataclasses.replace(value, steps=value.steps + 1)
    raise AssertionError(f"no change rule for {value!r}")


@pytest.mark.parametrize("name", ["tiny", "tiny-negative"])
def test_fingerprint_changes_with_every_field(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tm.BUILTIN_MODELS[name]
    seen = {recipe.fingerprint()}
    checked = 0
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if value is None:
            continue  # None fields are fixed by the recipe kind (scratch vs fine-tune)
        seen.add(dataclasses.replace(recipe, **{f.name: _changed(value)}).fingerprint())
        checked += 1
    assert len(seen) == checked + 1 and checked >= 12
    monkeypatch.setattr(tm, "CODE_VERSION", tm.CODE_VERSION + 1)
    assert recipe.fingerprint() not in seen


def test_exclude_templates_filters_the_draw_and_keeps_unset_fingerprints() -> None:
    import hashlib

    from winnow.pipeline.builtin.demo_data import GENERATOR_VERSION

    recipe = tm.BUILTIN_MODELS["tiny-warm"]
    # the formula before the field existed: every other field, the base's included
    old = dataclasses.asdict(recipe)
    del old["exclude_templates"], old["base"]["exclude_templates"]
    blob = json.dumps(
        {"code_version": tm.CODE_VERSION, "generator_version": GENERATOR_VERSION, "recipe": old},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert recipe.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    held = ("math/wages", "math/ages")
    small = dataclasses.replace(recipe, data_samples=400, exclude_templates=held)
    assert small.fingerprint() != dataclasses.replace(recipe, data_samples=400).fingerprint()
    rows = tm._draw(small)
    everything = [r for r in generate_demo(400, recipe.data_seed)]
    assert len(rows) == sum(r["template"] not in held for r in everything) < len(everything)
    assert not {r["template"] for r in rows} & set(held)
    with pytest.raises(ValueError, match="not demo templates"):
        dataclasses.replace(recipe, exclude_templates=("math/no_such",))


def test_recipe_validation() -> None:
    with pytest.raises(ValueError, match="demo's own seed"):
        dataclasses.replace(SMALL, data_seed=DEMO_SEED)
    with pytest.raises(ValueError, match="inherits its base"):
        dataclasses.replace(tm.BUILTIN_MODELS["tiny-warm"], vocab_size=100)
    with pytest.raises(ValueError, match="needs"):
        dataclasses.replace(SMALL, architecture=None)
    with pytest.raises(ValueError, match="not demo kinds"):
        dataclasses.replace(SMALL, corruptions=("wrong_answer",))
    with pytest.raises(ValueError, match="num_kv_heads"):
        tm.Architecture(num_heads=4, num_kv_heads=3)


def test_builtin_recipes_never_train_on_the_demo_draw() -> None:
    assert set(tm.BUILTIN_MODELS) == {"tiny", "tiny-reference", "tiny-positive", "tiny-negative", "tiny-warm"}
    for name, recipe in tm.BUILTIN_MODELS.items():
        assert recipe.name == name
        assert DEMO_SEED not in (recipe.data_seed, recipe.tokenizer_seed)
        assert recipe.base is None or recipe.base == tm.BUILTIN_MODELS["tiny"]
    pos, neg = tm.BUILTIN_MODELS["tiny-positive"], tm.BUILTIN_MODELS["tiny-negative"]
    assert pos.is_correct is True and neg.is_correct is False


def test_resolve_model(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from winnow.core.models import resolve_model

    assert resolve_model(str(small_dir)) == small_dir
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="tiny-reference"):  # the message lists the valid names
        resolve_model("builtin:huge")
    # builtin:<name> goes through the cache root.
    monkeypatch.setitem(tm.BUILTIN_MODELS, "tiny-test", SMALL)
    monkeypatch.setattr(tm, "models_root", lambda root=None: small_dir.parent)
    assert resolve_model("builtin:tiny-test") == small_dir


def test_builtin_tiny_predicts_held_out_chats(held_out: list[dict]) -> None:
    """The shipped default model (shared cache: built once per machine, about a minute)."""
    path = tm.builtin_model_path("tiny")
    model, tok = _load(path)
    texts = [tm.render_chat(r["messages"]) for r in held_out]
    nll = tm.mean_token_nll(model, tok, texts)
    assert len(tok) > 2000
    assert nll < 0.3 * math.log(len(tok)), nll
    info = json.loads((path / tm.RECIPE_FILE).read_text())
    assert info["stats"]["loss_last10"] < info["stats"]["loss_first10"] - 3.0


def _per_token_nll(model, tok, rows: list[dict], batch: int = 32) -> list[tuple[Any, Any, Any]]:
    """Per row: (NLL of each target position 1..T-1, its supervised mask, its final-answer mask: the
    tokens after '####' up to the end of the answer). Supervision as ingest marks it. Rows are
    right-padded into batches with an attention mask (a causal model's values at real positions do not
    depend on padding after them)."""
    import torch

    items = []
    for r in rows:
        rendered = render_sample(tok, r["messages"])
        text = rendered.text
        start, end = text.rfind("####") + 4, text.rindex(tm.IM_END)  # no '####' (off-topic): no answer
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        answer = [int(start >= 4 and a >= start and b <= end) for a, b in offsets]
        items.append((rendered.input_ids, rendered.loss_mask, answer))
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        x, attn = tm._pad([ids for ids, _, _ in chunk], tok.pad_token_id)
        with torch.no_grad():
            logp = model(input_ids=x, attention_mask=attn, use_cache=False).logits.log_softmax(-1)
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # (B, T-1): position t+1 as target
        for row, (ids, mask, answer) in enumerate(chunk):
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            out.append((nll[row, : len(ids) - 1], keep, torch.tensor(answer[1:], dtype=torch.bool) & keep))
    return out


# (model, subset) pairs the direction checks compare
_NEEDED = (
    ("tiny", "clean"), ("tiny", "junk"), ("tiny-reference", "clean"), ("tiny-reference", "junk"),
    ("tiny-warm", "clean"), ("tiny-positive", "clean"), ("tiny-negative", "clean"),
    ("tiny-positive", "wrong"), ("tiny-negative", "wrong"),
)  # fmt: skip


def _likelihood_gaps(n_rows: int, per_kind: dict[str, int], seed: int) -> dict[str, float]:
    """Mean NLL differences (nats/token) between the builtin models on a held-out draw, as Rho-1, ssToken
    and cDPO need them; rows render refuses (chat-template text typed into an answer) are left out."""
    from winnow.core.render import RenderError, render_batch

    rows = generate_demo(n_rows, seed)
    loaded = {n: _load(tm.builtin_model_path(n)) for n in tm.BUILTIN_MODELS}
    tok = loaded["tiny"][1]
    ok = [r for r, x in zip(rows, render_batch(tok, [r["messages"] for r in rows]), strict=True)
          if not isinstance(x, RenderError)]  # fmt: skip
    kinds = {"clean": ("none",), "junk": ("junk_span", "off_topic"), "wrong": ("wrong_final_answer",)}
    subsets = {sub: [r for r in ok if r["corruption"] in kinds[sub]][: per_kind[sub]] for sub in kinds}
    assert all(len(subsets[sub]) == per_kind[sub] for sub in kinds), {k: len(v) for k, v in subsets.items()}
    nll: dict[tuple[str, str, bool], float] = {}
    for name, sub in _NEEDED:
        per = _per_token_nll(loaded[name][0], tok, subsets[sub])
        for answer_only in (False, True):
            masks = [ans if answer_only else keep for _, keep, ans in per]
            count = sum(int(m.sum()) for m in masks)
            assert count >= len(per) or (answer_only and sub == "junk")  # not vacuous
            total = sum(float(v[m].sum()) for (v, _, _), m in zip(per, masks, strict=True))
            nll[name, sub, answer_only] = total / max(count, 1)
    return {
        # Rho-1: the reference fits clean answers better than the base, and junk worse (excess loss > 0).
        "ref_minus_tiny_clean": nll["tiny-reference", "clean", False] - nll["tiny", "clean", False],
        "ref_minus_tiny_junk": nll["tiny-reference", "junk", False] - nll["tiny", "junk", False],
        # ssToken's warm model has moved on from its history model (the base) on this data.
        "warm_minus_tiny_clean": nll["tiny-warm", "clean", False] - nll["tiny", "clean", False],
        # cDPO: relative to the positive model, the negative one prefers wrong final answers over right ones.
        "neg_minus_pos_answer_wrong": nll["tiny-negative", "wrong", True]
        - nll["tiny-positive", "wrong", True],
        "neg_minus_pos_answer_clean": nll["tiny-negative", "clean", True]
        - nll["tiny-positive", "clean", True],
    }


def _assert_directions(gaps: dict[str, float], margin: float) -> None:
    assert gaps["ref_minus_tiny_clean"] < -margin, gaps
    assert gaps["ref_minus_tiny_junk"] > margin, gaps
    assert gaps["warm_minus_tiny_clean"] < -margin, gaps
    assert gaps["neg_minus_pos_answer_wrong"] < 0 < gaps["neg_minus_pos_answer_clean"], gaps


def test_variants_move_in_their_directions_fast() -> None:
    """The fast form (runs by default): 64 clean, 32 junk and 64 wrong-answer held-out samples.

    Measured on eight held-out draws of this size (2026-11-30, this machine's cached builtin models), in
    nats/token: reference - tiny on clean -0.138 .. -0.176, on junk +0.43 .. +0.58; warm - tiny on clean
    -0.100 .. -0.136; negative - positive on final-answer tokens, wrong rows -0.119 .. -0.201, clean rows
    +0.062 .. +0.150. With 24 samples per kind the cDPO gaps changed sign on 3 of 6 draws."""
    gaps = _likelihood_gaps(1100, {"clean": 64, "junk": 32, "wrong": 64}, HELD_OUT_SEED + 2)
    _assert_directions(gaps, margin=0.05)


@pytest.mark.slow
def test_variants_move_in_their_directions() -> None:
    """Each fine-tune shifts likelihood the way its method needs (held-out draw, 80 samples per kind)."""
    _assert_directions(
        _likelihood_gaps(1500, {"clean": 80, "junk": 80, "wrong": 80}, HELD_OUT_SEED + 1), 0.05
    )
