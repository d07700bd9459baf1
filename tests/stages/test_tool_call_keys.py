"""TL-Training's key-token policy (winnow.stages.policies.tool_call_keys): the §2 worked example and the
divergence tokens on hand-cut samples, the error filter, and the weights of the whole tool-call demo against
a brute-force reimplementation over the tokenizer's own offsets and the generator's ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from winnow.stages.policies import tool_call_keys as tk

from cli_runner import run_cli


def _sample(pieces: list[tuple[str, int]], messages: list[dict]):
    """(text, offsets, loss_mask) from hand-cut tokens: each piece is (its text, its loss_mask)."""
    text = "".join(p for p, _ in pieces)
    offsets = np.cumsum([0] + [len(p) for p, _ in pieces[:-1]]).tolist()
    return text, offsets, [m for _, m in pieces], messages


def _chat(system: str, reply: list[str], *after: dict) -> tuple:
    """A system + user + one assistant reply cut into ``reply`` (its last piece the end-of-turn token)."""
    content = "".join(reply[:-1])
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": content},
        *after,
    ]
    pieces = [(f"S:{system}\nU:Go.\nA:", 0), *[(p, 1) for p in reply]]
    for m in after:
        pieces.append((f"\n{m['role']}:{m['content']}", 0))
    return _sample(pieces, messages)


def test_worked_example_12_tokens_one_key_two_closing_weight_9_share_045():
    # §2: 12 supervised tokens, |P| = 1, |A| = 2 (the "'," and "')" pieces), |O| = 9 -> w = min(9/1, 9) = 9;
    # denominator 9·1 + 2 + 9 = 20, key share 9/20 = 0.45 (by hand)
    reply = ["get_weather", "(", "city", "=", "'", "Paris", "',", " unit", "=", "'C", "')", "<E>"]
    text, offsets, mask, msgs = _chat("def get_weather(city: str, unit: str):", reply)
    w, reason = tk.sample_weights(text, offsets, mask, msgs)
    sup = w[np.asarray(mask) == 1]
    assert len(sup) == 12 and reason == "key_tokens"
    assert sup.tolist() == [9.0] + [1.0] * 11
    assert sup.sum() == 20.0 and float(sup[0]) / float(sup.sum()) == pytest.approx(0.45, abs=1e-12)
    assert (w[np.asarray(mask) == 0] == 0).all()


def test_divergence_token_and_a_name_that_is_a_prefix_of_another():
    # get_weather vs get_time share "get_": the key tokens are "get" (first) and "weather" (char 4, 'w' vs
    # 't'); send_sms shares nothing. R = 9, P = 2, A = {"')"} -> O = 6, w = 3
    stubs = "def get_weather(city):\ndef get_time(zone):\ndef send_sms(to):"
    reply = ["get", "_", "weather", "(", "city", "=", "'Paris", "')", "<E>"]
    w, _ = tk.sample_weights(*_chat(stubs, reply))
    assert w[-9:].tolist() == [3, 1, 3, 1, 1, 1, 1, 1, 1]
    # get_time is a prefix of get_timezone: they part at the character after the name, "(" here;
    # R = 7, P = {"get", "("}, A = {")"}, O = 4 -> w = 2
    stubs = "def get_timezone(city):\ndef get_time(zone):"
    reply = ["get", "_time", "(", "zone", "='UTC'", ")", "<E>"]
    w, _ = tk.sample_weights(*_chat(stubs, reply))
    assert w[-7:].tolist() == [2, 1, 2, 1, 1, 1, 1]
    # |P| >= |O|: no up-weighting (R = 3: "f", "()", <E>; P = {"f"}, A = {"()"}, O = 1)
    w, _ = tk.sample_weights(*_chat("def f():", ["f", "()", "<E>"]))
    assert w[-3:].tolist() == [1, 1, 1]


def test_without_closing_tokens_the_token_before_the_last_is_bookkept():
    # no closing piece: A = {the token before <E>} (the code's len-3 default); R = 6, P = 1, O = 4 -> w = 4
    reply = ["go", "(", "x", "=", "1)", "<E>"]
    w, _ = tk.sample_weights(*_chat("def go(x):", reply))
    assert w[-6:].tolist() == [4, 1, 1, 1, 1, 1]


def test_error_filter_masks_the_failed_turn_and_drops_a_sample_with_no_target():
    assert tk.is_tool_error("TypeError: f() got an unexpected keyword argument 'y'")
    assert tk.is_tool_error('{"Error": "Connection refused"}')  # '"error":' squashes to "error"
    assert tk.is_tool_error("NameError: name 'x' is not defined")
    assert not tk.is_tool_error('{"temp_c": 12}')
    msgs = [
        {"role": "system", "content": "def f(x):"},
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": "f(y=1)"},
        {"role": "tool", "content": "TypeError: f() got an unexpected keyword argument 'y'"},
        {"role": "assistant", "content": "f(x=1)"},
        {"role": "tool", "content": "{'v': 2}"},
        {"role": "assistant", "content": "It is 2."},
    ]
    pieces = [("S:def f(x):\nU:Go.\nA:", 0), ("f", 1), ("(y=1)", 1), ("<E>", 1)]
    pieces += [(f"\nT:{msgs[3]['content']}\nA:", 0), ("f", 1), ("(x=1)", 1), ("<E>", 1)]
    pieces += [(f"\nT:{msgs[5]['content']}\nA:", 0), ("It is 2.", 1), ("<E>", 1)]
    w, reason = tk.sample_weights(*_sample(pieces, msgs))
    sup = w[np.asarray([m for _, m in pieces]) == 1].tolist()
    # failed turn: 0; retry: R = 3, P = {"f"}, A = {"(x=1)"} (no closing piece: the default), O = 1 -> w = 1
    assert sup == [0, 0, 0, 1, 1, 1, 1, 1] and reason == "key_tokens"
    # only the failed call, then the error: nothing to train on
    w, reason = tk.sample_weights(*_sample(pieces[:5], msgs[:4]))
    assert not w.any() and reason == "tool_error"
    # mae.py: a reply followed by a user turn is not a target either
    after = {"role": "user", "content": "Thanks"}
    w, reason = tk.sample_weights(*_chat("def f(x):", ["f", "(x=1)", "<E>"], after))
    assert not w.any() and reason == "no_target"


# ---- the tool-call demo against a brute-force reimplementation ---------------------------------------
def _brute_force(text: str, spans: list[tuple[int, int]], mask: list[int], row: dict) -> list[float]:
    """Weights from the generator's ground truth (offered tools, called names, errors), the ChatML template's
    known layout and the tokenizer's offset mapping, by explicit loops."""
    w = [0.0] * len(spans)
    truth = {
        k: json.loads(row[f"meta_{k}"]) for k in ("tools", "calls", "errors")
    }  # lists: JSON text columns
    replies = [m["content"] for m in json.loads(row["messages"]) if m["role"] == "assistant"]
    pos = 0
    for content, gold, error in zip(replies, truth["calls"], truth["errors"], strict=True):
        start = text.index("<|im_start|>assistant\n" + content, pos) + len("<|im_start|>assistant\n")
        end = text.index("<|im_start|>", start) if "<|im_start|>" in text[start:] else len(text)
        pos = end
        reply = [i for i, (s, e) in enumerate(spans) if mask[i] and e > start and s < end]
        if error:
            continue
        key_chars = set()
        if gold:
            key_chars.add(start)
            for other in truth["tools"]:
                c = 0
                while c < len(gold) and c < len(other) and gold[c] == other[c]:
                    c += 1
                if other != gold and c > 0:
                    key_chars.add(start + c)
        keys = {i for i in reply for c in key_chars if spans[i][0] <= c < spans[i][1]}
        closing = [
            i
            for i in reply
            if i not in keys
            and text[spans[i][0] : spans[i][1]].strip() != ""
            and all(ch in "'\"()., " for ch in text[spans[i][0] : spans[i][1]].strip())
            and any(ch in ")," for ch in text[spans[i][0] : spans[i][1]])
        ]
        if keys and not closing:
            closing = [reply[-2]]
        others = len(reply) - len(keys) - len(closing)
        weight = min(others / len(keys), 9.0) if keys and len(keys) < others else 1.0
        for i in reply:
            w[i] = weight if i in keys else 1.0
    return w


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools") / "run"
    code, _, err = run_cli("ingest", "builtin:tool_calls", "--run", root, "--model", "builtin:tiny")
    assert code == 0, err
    code, out, err = run_cli("select", root, "python:winnow.stages.policies.tool_call_keys:policy")
    assert code == 0, err
    return root, out


def test_demo_weights_match_a_brute_force_reimplementation(tool_run):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from winnow.pipeline.builtin.tiny_model import builtin_model_path

    root, out = tool_run
    assert "kept 120 of 120 samples" in out
    tok = AutoTokenizer.from_pretrained(str(builtin_model_path("tiny")))
    samples = pq.read_table(root / "samples").to_pylist()
    sel = {r["sample_id"]: r for r in pq.read_table(root / "selection/tool_call_keys.policy").to_pylist()}
    kinds, up = set(), 0
    for row in samples:
        enc = tok(row["text"], add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == row["input_ids"]
        want = _brute_force(row["text"], enc["offset_mapping"], row["loss_mask"], row)
        got = np.asarray(sel[row["sample_id"]]["token_weight"], np.float32)  # stored as float32
        assert np.array_equal(got, np.asarray(want, np.float32)), row["sample_id"]
        kinds.add(row["meta_kind"])
        up += any(x > 1 for x in want)
    assert kinds == {"one_call", "two_calls", "error_retry"} and up == len(samples)


def test_the_demo_is_deterministic_and_its_errors_are_the_filters():
    from winnow.pipeline.builtin.tool_demo import generate_tool_demo

    rows = generate_tool_demo()
    assert rows == generate_tool_demo() and rows != generate_tool_demo(seed=1)
    assert len(rows) == 120 and {r["kind"] for r in rows} == {"one_call", "two_calls", "error_retry"}
    for r in rows:
        msgs = r["messages"]
        replies = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        # the generator's ground truth agrees with TL-Training's error list on every tool output
        flagged = [k + 1 < len(msgs) and tk.is_tool_error(msgs[k + 1]["content"]) for k in replies]
        assert flagged == r["errors"]
        assert tk.offered_tools(msgs[0]["content"]) == r["tools"]
        assert all(c in r["tools"] for c, e in zip(r["calls"], r["errors"], strict=True) if c and not e)


def test_one_sample_per_step_trains_on_the_papers_loss(tmp_path):
    """The module's claim: at one sample per step with one target reply, the step's Σ w·ℓ / Σ w (what
    `winnow train` logs as `loss`) is TL-Training's (w Σ_P ℓ + Σ_A ℓ + Σ_O ℓ) / (w|P| + |A| + |O|), here
    recomputed in float64 from the tiny model's own forward (A and O both weigh 1: one sum over R minus P)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from winnow.pipeline.builtin.tiny_model import builtin_model_path

    chat = [
        {
            "role": "system",
            "content": 'def get_weather(city: str):\n    """Weather."""\n\ndef get_time(zone: str):',
        },
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "get_weather(city='Paris')"},
    ]
    (tmp_path / "one.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    run, out = tmp_path / "run", tmp_path / "out"
    assert run_cli("ingest", tmp_path / "one.jsonl", "--run", run, "--model", "builtin:tiny")[0] == 0
    assert (
        run_cli("select", run, "python:winnow.stages.policies.tool_call_keys:policy", "--name", "k")[0] == 0
    )
    args = ("--selection", "k", "--model", "builtin:tiny", "--out", out, "--set", "max_steps=1")
    code, _, err = run_cli("train", run, *args, "--set", "eval_fraction=0")
    assert code == 0, err
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in logged if "loss" in r)
    row = pq.read_table(run / "samples").to_pylist()[0]
    w = np.asarray(pq.read_table(run / "selection" / "k").to_pylist()[0]["token_weight"], np.float64)
    mask = np.asarray(row["loss_mask"]) == 1
    keys = w > 1
    assert keys.sum() == 2 and w[keys][0] == 7  # "get" and "weather" (parts from get_time); 14 others / 2
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_path("tiny")), dtype=torch.float64)
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    nll = np.concatenate([[np.nan], -logp.gather(1, ids[0, 1:, None])[:, 0].numpy()])  # ℓ[i]: target i
    big_w, p, rest = w[keys][0], nll[keys], nll[mask & ~keys]
    paper = (big_w * p.sum() + rest.sum()) / (big_w * len(p) + len(rest))
    assert loss == pytest.approx(paper, rel=1e-5)
    assert abs(nll[mask].mean() - paper) > 1e-3  # the weights matter here: plain SFT's mean is elsewhere


def test_the_error_filter_alone_weighs_every_target_token_1(tool_run):
    import pyarrow.parquet as pq

    root, _ = tool_run
    code, out, err = run_cli("select", root, "python:winnow.stages.policies.tool_call_keys:error_filter")
    assert code == 0, err
    keys = {r["sample_id"]: r for r in pq.read_table(root / "selection/tool_call_keys.policy").to_pylist()}
    for r in pq.read_table(root / "selection/tool_call_keys.error_filter").to_pylist():
        # the same tokens as the key-token policy, each at weight 1; every demo sample has a target
        assert r["token_weight"] == [float(x > 0) for x in keys[r["sample_id"]]["token_weight"]]
        assert (r["keep"], r["reason"]) == (True, "target")
