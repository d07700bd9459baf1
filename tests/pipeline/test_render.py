"""Rendering and supervised-token marking (winnow.core.render).

The expected mask is built independently of the renderer: a pure-Python mirror of each fixture template
gives the text and every content's character span, and each token's *byte* span comes from its vocabulary
entry (``token_byte_spans``), not from tokenizer offsets. The renderer's mask must equal it exactly.
"""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from winnow.core.render import Rendered, RenderError, render_batch, render_sample, tokenizer_fingerprint

from tokenizers_fixtures import (
    CHATML_TEMPLATE,
    SPECIALS,
    make_tokenizer,
    token_byte_spans,
    token_bytes,
    with_swapped_vocab,
)

CASES = {
    "chatml": dict(template="chatml", pretok="merge"),
    "chatml_gpt2": dict(template="chatml", pretok="gpt2"),
    "chatml_think": dict(template="chatml", pretok="merge", think=True),
    "llama3": dict(template="llama3", pretok="merge"),
    "llama3_gpt2": dict(template="llama3", pretok="gpt2"),
    "plain_bos": dict(template=None, pretok="merge", bos=True),
    "plain_gpt2": dict(template=None, pretok="gpt2", bos=False),
    "plain_trim": dict(template=None, pretok="gpt2", bos=True, trim_offsets=True),
}
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "plain_bos": "</s>",
    "plain_gpt2": "<|endoftext|>",
}


@functools.cache
def tok(name: str):
    return make_tokenizer(**CASES[name])


def style(name: str) -> str:
    t = CASES[name]["template"]
    return t if t else ("plain_bos" if CASES[name]["bos"] else "plain_gpt2")


def eot_id(name: str) -> int:
    return tok(name).convert_tokens_to_ids(END_OF_TURN[style(name)])


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVS = {
    "system_three_rounds": [
        m("system", "You are terse. Answer with numbers."),
        m("user", "How many apples are there if each of 3 friends has 4?"),
        m("assistant", "The total is 3 x 4 = 12 apples.\nSo the answer is 12."),
        m("user", "And half of that?"),
        m("assistant", "Then half gives 6."),
        m("user", "Twice more?"),
        m("assistant", "Therefore 24: it is twice 12."),
    ],
    "short_answers": [
        m("user", "Pick a or b."),
        m("assistant", "a"),
        m("user", "A number?"),
        m("assistant", "4"),
    ],
    "answer_inside_question": [
        m("user", "Repeat after me: The answer is 4."),
        m("assistant", "The answer is 4."),
        m("user", "Again: The answer is 4."),
        m("assistant", "The answer is 4."),
    ],
    "answers_are_template_words": [
        m("system", "system"),
        m("user", "user"),
        m("assistant", "assistant"),
        m("user", "Say im_start."),
        m("assistant", "im_start"),
        m("user", "And a header?"),
        m("assistant", "end_header_id"),
    ],
    "unicode_and_inner_whitespace": [
        m("user", "Write 日本語 and café, please."),
        m("assistant", "日本語 café\n\n  naïve  x² 🙂 — done…"),
        m("user", "ß?"),
        m("assistant", "Ω"),
    ],
    "plain_text_record": [m("assistant", "So the model sold 48 clips. Then it sold 24 more.")],
    "ends_with_user": [m("user", "Hi"), m("assistant", "Hello there."), m("user", "Bye")],
}


# ---- independent reference --------------------------------------------------------------------


def reference(name: str, messages: list[dict]) -> tuple[str, list[tuple[str, int, int]]]:
    """Text and (role, start, end) of each stripped content, by mirroring the fixture template in Python."""
    s = style(name)
    parts: list[str] = []
    spans: list[tuple[str, int, int]] = []
    pos = 0

    def emit(x: str) -> None:
        nonlocal pos
        parts.append(x)
        pos += len(x)

    def content(role: str, raw: str, keep_raw: bool) -> None:
        body = raw.strip()
        lead = len(raw) - len(raw.lstrip()) if keep_raw else 0
        spans.append((role, pos + lead, pos + lead + len(body)))
        emit(raw if keep_raw else body)

    last = len(messages) - 1
    if s == "chatml":
        if messages[0]["role"] != "system":
            emit("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        for k, msg in enumerate(messages):
            emit(f"<|im_start|>{msg['role']}\n")
            if CASES[name].get("think") and k == last and msg["role"] == "assistant":
                emit("<think>\n\n</think>\n\n")
            content(msg["role"], msg["content"], keep_raw=True)
            emit("<|im_end|>\n")
    elif s == "llama3":
        emit("<|begin_of_text|>")
        for msg in messages:
            emit(f"<|start_header_id|>{msg['role']}<|end_header_id|>\n\n")
            content(msg["role"], msg["content"], keep_raw=False)
            emit("<|eot_id|>")
    else:
        if s == "plain_bos":
            emit("<s>")
        for k, msg in enumerate(messages):
            if len(messages) > 1:
                emit(f"{msg['role'].capitalize()}: ")
            content(msg["role"], msg["content"], keep_raw=False)
            if msg["role"] == "assistant":
                emit(END_OF_TURN[s])
            if k < last:
                emit("\n\n")
    return "".join(parts), spans


def _skip_blank(t, ids: list[int], j: int) -> int:
    pieces = token_bytes(t, ids)
    while j < len(ids) and not pieces[j].strip():
        j += 1
    return j


def expected_mask(name: str, text: str, ids: list[int], spans, loss_on: str) -> tuple[list[int], int]:
    """Mask and straddle count from byte spans: overlap with a supervised answer + the token closing it."""
    t = tok(name)
    assert b"".join(token_bytes(t, ids)) == text.encode(), "tokenization must be lossless"
    tb = token_byte_spans(t, ids)
    answers = [(cs, ce) for role, cs, ce in spans if role == "assistant"]
    if loss_on == "last_turn":
        answers = answers[-1:]
    mask = [0] * len(ids)
    straddle: set[int] = set()
    for cs, ce in answers:
        bs, be = len(text[:cs].encode()), len(text[:ce].encode())
        hit = [i for i, (a, b) in enumerate(tb) if a < be and b > bs]
        for i in hit:
            mask[i] = 1
            if tb[i][0] < bs or tb[i][1] > be:
                straddle.add(i)
        j = _skip_blank(t, ids, hit[-1] + 1)  # only whitespace may separate answer and end-of-turn
        if j < len(ids) and ids[j] == eot_id(name):
            mask[j] = 1
    mask[0] = 0
    return mask, len(straddle - {0})


def check(name: str, messages: list[dict], loss_on: str = "all_turns") -> tuple[Rendered, int]:
    """Render, compare with the independent reference, assert the spec's invariants; returns straddles."""
    t = tok(name)
    r = render_sample(t, messages, loss_on=loss_on)
    text, spans = reference(name, messages)
    assert r.text == text
    n = len(r.input_ids)
    assert len(r.offsets) == len(r.loss_mask) == n
    assert r.input_ids == t(r.text, add_special_tokens=False)["input_ids"]
    # offsets: the char holding each token's first byte (independent of the tokenizer's offsets)
    tb = token_byte_spans(t, r.input_ids)
    for off, (b0, _) in zip(r.offsets, tb, strict=True):
        assert len(text[:off].encode()) <= b0 < len(text[: off + 1].encode())
    mask, n_straddle = expected_mask(name, text, r.input_ids, spans, loss_on)
    assert r.loss_mask == mask
    assert r.n_straddle == n_straddle

    # The spec's invariants, stated directly.
    assert r.loss_mask[0] == 0
    bos = t.bos_token_id if style(name) in ("llama3", "plain_bos") else None
    if bos is not None:
        assert r.input_ids[0] == bos and r.input_ids.count(bos) == 1  # no double BOS
    answers = [(cs, ce) for role, cs, ce in spans if role == "assistant"]
    supervised = answers[-1:] if loss_on == "last_turn" else answers
    eot = eot_id(name)
    byte_spans = [(len(text[:cs].encode()), len(text[:ce].encode())) for cs, ce in supervised]
    closers = set()
    for (cs, ce), (bs, be) in zip(supervised, byte_spans, strict=True):
        inside = [i for i, (a, b) in enumerate(tb) if a < be and b > bs]
        # every byte of the answer is covered by a supervised token (index 0 excepted: never supervised)
        covered = {x for i in inside if r.loss_mask[i] for x in range(*tb[i])}
        assert set(range(bs, be)) - covered <= set(range(*tb[0]))
        # the token after the answer's last token, if supervised, is the end-of-turn token; our templates
        # always close a turn, so (after whitespace-only tokens, unsupervised) it must be there
        after = _skip_blank(t, r.input_ids, inside[-1] + 1)
        assert not any(r.loss_mask[inside[-1] + 1 : after])
        assert after < n and r.input_ids[after] == eot and r.loss_mask[after] == 1
        closers.add(after)
        if after + 1 < n:
            assert r.loss_mask[after + 1] == 0  # the newline / next header after the end-of-turn token
        if inside[0] > 0:  # decoding the supervised run (ids, not offsets) gives the answer
            assert text[cs:ce] in t.decode(r.input_ids[inside[0] : after + 1], skip_special_tokens=False)
    for i, flag in enumerate(r.loss_mask):
        if flag:  # every supervised token overlaps a supervised answer or closes one: no header token
            a, b = tb[i]
            assert i in closers or any(a < be and b > bs for bs, be in byte_spans)
    return r, n_straddle


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("name", list(CASES))
def test_render_matches_reference(name, conv):
    check(name, CONVS[conv])


@pytest.mark.parametrize("name", list(CASES))
def test_last_turn_supervises_only_the_last_answer(name):
    conv = CONVS["system_three_rounds"]
    r_all, _ = check(name, conv, "all_turns")
    r_last, _ = check(name, conv, "last_turn")
    assert r_last.input_ids == r_all.input_ids
    assert all(a >= b for a, b in zip(r_all.loss_mask, r_last.loss_mask, strict=True))
    first_last = r_last.loss_mask.index(1)
    assert sum(r_all.loss_mask[first_last:]) == sum(r_last.loss_mask)  # last answer identical in both
    assert sum(r_all.loss_mask[:first_last]) > 0  # earlier answers only in all_turns


def test_straddling_tokens_occur_and_are_counted():
    per_case = {name: sum(check(name, c)[1] for c in CONVS.values()) for name in CASES}
    assert sum(per_case.values()) > 0
    # the header/content merge happens with real templates too, not only with "Assistant: "
    assert per_case["chatml"] > 0 and per_case["llama3"] > 0 and per_case["plain_gpt2"] > 0


@pytest.mark.parametrize("name", ["plain_bos", "plain_gpt2", "plain_trim"])
def test_plain_text_record_supervises_all_but_index_0(name):
    r = render_sample(tok(name), CONVS["plain_text_record"])
    assert r.loss_mask == [0] + [1] * (len(r.input_ids) - 1)
    assert r.input_ids[-1] == tok(name).eos_token_id


def test_plain_text_record_with_template_keeps_headers_unsupervised():
    r, _ = check("chatml", CONVS["plain_text_record"])
    t = tok("chatml")
    pieces = t.convert_ids_to_tokens(r.input_ids)
    first = r.loss_mask.index(1)
    assert "<|im_start|>" in pieces[:first] and sum(r.loss_mask[first:]) == len(r.loss_mask) - first - 1


def test_injected_empty_reasoning_block_is_unsupervised():
    r, _ = check("chatml_think", CONVS["short_answers"])
    t = tok("chatml_think")
    think = {t.convert_tokens_to_ids("<think>"), t.convert_tokens_to_ids("</think>")}
    assert think <= set(r.input_ids)
    assert all(not flag for i, flag in zip(r.input_ids, r.loss_mask, strict=True) if i in think)


def test_unstripped_content_is_located():
    conv = [
        m("user", "  Pick a or b.\n"),
        m("assistant", "\n a \n"),
        m("user", "x"),
        m("assistant", " assistant"),
    ]
    for name in CASES:
        check(name, conv)


def test_template_that_rewrites_earlier_turns():
    # Qwen3 style: earlier assistant turns lose their reasoning; the last one is rendered verbatim.
    t = make_tokenizer("chatml")
    t.chat_template = CHATML_TEMPLATE.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'].split('</think>')[-1].lstrip('\\n') if message['role'] == 'assistant' and not loop.last"
        " else message['content']) + '<|im_end|>'",
    )
    conv = [
        m("user", "Q1"),
        m("assistant", "<think>\nmull it\n</think>\n\nA1 is 4."),
        m("user", "Q2"),
        m("assistant", "<think>\nagain\n</think>\n\nA2 is 5."),
    ]
    with pytest.raises(RenderError) as e:
        render_sample(t, conv)
    assert e.value.reason == "template_dropped_content"
    r = render_sample(t, conv, loss_on="last_turn")
    sup = t.decode([i for i, f in zip(r.input_ids, r.loss_mask, strict=True) if f], skip_special_tokens=False)
    assert sup.strip() == "<think>\nagain\n</think>\n\nA2 is 5.<|im_end|>"


def test_batch_returns_errors_in_place():
    t = make_tokenizer("chatml")
    t.chat_template = (
        "{%- for message in messages %}{%- if message['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{%- endif %}{%- endfor %}" + CHATML_TEMPLATE
    )
    batch = [
        CONVS["short_answers"],
        [m("user", "x"), m("tool", "y"), m("assistant", "z")],
        [m("user", "only a question")],
        [m("user", "q"), m("assistant", "   ")],
        [m("user", "Close it <|im_end|> early"), m("assistant", "ok")],
        [m("user", "q"), m("assistant", "Hidden <|eot_id|> token")],
        [m("user", "q")] * 0 + [{"role": "user"}, m("assistant", "a")],
        CONVS["system_three_rounds"],
    ]
    out = render_batch(t, batch)
    reasons = [o.reason if isinstance(o, RenderError) else "ok" for o in out]
    assert reasons == [
        "ok", "template_error", "no_assistant_turn", "empty_response",
        "special_token_in_content", "special_token_in_content", "bad_message", "ok",
    ]  # fmt: skip
    assert "no tools here" in str(out[1])
    assert out[0] == render_sample(t, batch[0]) and out[7] == render_sample(t, batch[7])
    with pytest.raises(ValueError, match="loss_on"):
        render_batch(t, batch, loss_on="everything")


def test_special_token_in_plain_content_is_rejected():
    with pytest.raises(RenderError) as e:
        render_sample(tok("plain_bos"), [m("user", "q"), m("assistant", "strike</s>through")])
    assert e.value.reason == "special_token_in_content"


def test_fingerprint_tracks_vocab_template_and_added_tokens(tmp_path):
    from transformers import AutoTokenizer

    a = make_tokenizer("chatml")
    fp = tokenizer_fingerprint(a)
    assert len(fp) == 16 and fp == tokenizer_fingerprint(make_tokenizer("chatml"))
    a(["some text", "more"], padding=True, truncation=True, max_length=4)  # live settings do not count
    assert tokenizer_fingerprint(a) == fp
    a.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == fp

    b = make_tokenizer("chatml")
    b.chat_template = CHATML_TEMPLATE.replace("helpful", "useful")
    assert tokenizer_fingerprint(b) != fp
    assert tokenizer_fingerprint(with_swapped_vocab(a, "the", "and")) != fp
    assert tokenizer_fingerprint(with_swapped_vocab(a, "the", "the")) == fp
    c = make_tokenizer("chatml")
    c.add_tokens(["<tool>"])
    assert tokenizer_fingerprint(c) != fp
    assert tokenizer_fingerprint(make_tokenizer("llama3")) != fp


def test_render_cache_follows_template_changes():
    t = make_tokenizer("chatml")
    conv = CONVS["short_answers"]
    before = render_sample(t, conv)
    t.chat_template = None  # now the plain format
    after = render_sample(t, conv)
    assert after.text.startswith("User: Pick a or b.") and after.text != before.text


def test_gsm8k_supervised_tokens_decode_to_the_answer(gsm8k_dir):
    t = tok("chatml")
    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").open().read().splitlines()[:300]]
    batch = [[m("user", r["question"].strip()), m("assistant", r["answer"].strip())] for r in rows]
    out = render_batch(t, batch)
    straddles = 0
    for row, r in zip(rows, out, strict=True):
        assert isinstance(r, Rendered)
        straddles += r.n_straddle
        sup = [i for i, f in zip(r.input_ids, r.loss_mask, strict=True) if f]
        # one contiguous run: answer tokens then <|im_end|>
        first = r.loss_mask.index(1)
        assert r.loss_mask[first : first + len(sup)] == [1] * len(sup)
        decoded = t.decode(sup, skip_special_tokens=False)
        assert decoded.endswith("<|im_end|>")
        body = decoded[: -len("<|im_end|>")]
        answer = row["answer"].strip()
        assert answer in body
        # nothing else: at most the newline of the header that merged into the first answer token
        assert body.replace(answer, "", 1) in ("", "\n")
        assert row["question"].strip() not in decoded
    assert straddles > 0


# ---- property test ---------------------------------------------------------------------------------

_CHARS = list("abcXYZ019 .,?!:'\"-_()\n\t<>/|sé日語🙂Ωß") + [
    "the ",
    "The answer",
    "assistant",
    "user",
    "\n\n",
]
# special-token strings are rare (about one conversation in seven) so most examples test the main path
_core = (
    st.lists(st.sampled_from(_CHARS * 10 + ["<s>", "<|eot_id|>"]), min_size=1, max_size=12)
    .map("".join)
    .filter(lambda x: x.strip())
)
_content = st.tuples(st.sampled_from(["", " ", "\n", " \n "]), _core, st.sampled_from(["", " ", "\n\n"]))


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append(m("system", "".join(draw(_content))))
    for _ in range(draw(st.integers(1, 3))):
        msgs.append(m("user", "".join(draw(_content))))
        msgs.append(m("assistant", "".join(draw(_content))))
    if draw(st.booleans()):
        msgs.append(m("user", "".join(draw(_content))))
    strip = draw(st.booleans())  # ingest strips; the renderer must also cope with raw edges
    return [m(x["role"], x["content"].strip()) for x in msgs] if strip else msgs


# derandomize: CI runs the same 120 examples every time (no flaky CI). Random searches of 3 x 3,000 examples
# passed after the fix of test_content_that_prefixes_injected_template_text, the one bug a search found.
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    name=st.sampled_from(list(CASES)),
    conv=conversations(),
    loss_on=st.sampled_from(["all_turns", "last_turn"]),
)
def test_property_random_conversations(name, conv, loss_on):
    if any(s in x["content"] for x in conv for s in SPECIALS):
        with pytest.raises(RenderError) as e:
            render_sample(tok(name), conv, loss_on=loss_on)
        assert e.value.reason == "special_token_in_content"
        return
    check(name, conv, loss_on)


def test_content_that_prefixes_injected_template_text():
    """An answer "<" under a template that injects "<think>\n\n</think>\n\n" before it: the lead-in
    "assistant\n" followed by "<" also matches at the "<" of "<think>"; that candidate must be refused (it
    ends inside an added token), else "<think>" is supervised and the real answer is not. Found by the
    property test's random search."""
    t = tok("chatml_think")
    r = render_sample(t, [m("user", "a"), m("assistant", "<")])
    supervised = [t.decode([i]) for i, k in zip(r.input_ids, r.loss_mask, strict=True) if k]
    assert supervised == ["<", "<|im_end|>"]
