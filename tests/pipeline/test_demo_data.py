"""The demo dataset is frozen, its planted corruptions are exactly what the metadata says they are.

Ground truth is checked independently of the generator's internals: every `a op b = c` written in an
answer is re-evaluated here, junk spans are checked against the text they point at, and the whole
default dataset is pinned by SHA-256 so any change to the generator is noticed (and must bump
GENERATOR_VERSION, which renames the cache file).
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import json
import re
import statistics
import unicodedata

import pytest

from winnow.pipeline.builtin import demo_data as dd

# Computed once from the frozen generator (GENERATOR_VERSION "1"); rows serialised as
# json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n", concatenated, UTF-8.
PINNED_SHA256 = "1a2a6264a9eea5553217d5c456222fedcea2366042c3724f3ad23e33967240f9"

EQ = re.compile(r"(\d+)((?:\s*[-+*/]\s*\d+)+)\s*=\s*(\d+)")
TERM = re.compile(r"\s*([-+*/])\s*(\d+)")
FINAL = re.compile(r"\n#### (\d+)\Z")
STUTTER = re.compile(r"(?<!\S)([^\s\d]+(?: [^\s\d]+)+) \1(?!\S)")


def has_repetition(text: str) -> bool:
    """A phrase said twice in a row, or a sentence/line repeated right after itself."""
    sentences = re.split(r"(?<=[.!?])[ \n]", text)
    return bool(STUTTER.search(text)) or any(
        a.strip() == b.strip() for a, b in zip(sentences, sentences[1:], strict=False)
    )


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return dd.generate_demo()


# The invariants below must hold for any draw, not just the pinned one.
@pytest.fixture(scope="module", params=[(dd.DEMO_SIZE, dd.DEMO_SEED), (1000, 99)], ids=["default", "seed99"])
def draw(request) -> list[dict]:
    n, seed = request.param
    return (
        dd.generate_demo(n, seed)
        if (n, seed) != (dd.DEMO_SIZE, dd.DEMO_SEED)
        else request.getfixturevalue("rows")
    )


def canonical_sha256(rows: list[dict]) -> str:
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def equations(text: str) -> list[tuple[bool, int]]:
    """Every written computation as (is arithmetically right, written result), left to right."""
    out = []
    for m in EQ.finditer(text):
        acc = int(m.group(1))
        terms = TERM.findall(m.group(2))
        assert len({op for op, _ in terms}) == 1, f"mixed operators in {m.group(0)!r}"
        for op, x in terms:
            x = int(x)
            if op == "+":
                acc += x
            elif op == "-":
                acc -= x
            elif op == "*":
                acc *= x
            else:
                assert acc % x == 0, f"inexact division written: {m.group(0)!r}"
                acc //= x
        out.append((acc == int(m.group(3)), int(m.group(3))))
    return out


def answer(row: dict) -> str:
    return row["messages"][1]["content"]


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def test_pinned_hash_and_schema(rows):
    assert len(rows) == dd.DEMO_SIZE == 2000
    assert dd.DEMO_SEED == 20261127
    assert canonical_sha256(rows) == PINNED_SHA256, "generator output changed: bump GENERATOR_VERSION"
    keys = {"messages", "corruption", "is_correct", "junk_spans", "duplicate_of", "domain", "final_answer"}
    for r in rows:
        assert keys <= set(r)
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["corruption"] in dd.CORRUPTION_KINDS
        assert r["is_correct"] == (r["corruption"] not in ("wrong_final_answer", "wrong_step"))
        assert isinstance(r["final_answer"], str) and r["final_answer"]
        assert (r["duplicate_of"] is not None) == (r["corruption"] == "near_duplicate")
        assert bool(r["junk_spans"]) == (r["corruption"] == "junk_span")
        assert (r["domain"] != "math") == (r["corruption"] == "off_topic")
        for m in r["messages"]:
            # Ingest stores NFC-normalised, stripped content; the generator's output is already that.
            assert unicodedata.normalize("NFC", m["content"]).strip() == m["content"]


def test_counts_are_the_frozen_rates(rows):
    got = collections.Counter(r["corruption"] for r in rows)
    assert got == {
        "none": 1400,
        "wrong_final_answer": 120,
        "wrong_step": 120,
        "junk_span": 160,
        "near_duplicate": 100,
        "off_topic": 100,
    }
    # Other sizes: counts sum to n and each is within 1 of rate * n.
    for n in [0, 1, 7, 19, 20, 333, 1001]:
        counts = dd._kind_counts(n)
        assert sum(counts.values()) == n
        assert all(abs(counts[k] - dd.CORRUPTION_RATES[k] * n) < 1 for k in dd.CORRUPTION_KINDS)


def test_math_answers_check_out_against_their_ground_truth(draw):
    rows = draw
    seen = collections.Counter()
    for r in rows:
        if r["domain"] != "math":
            continue
        text = answer(r)
        m = FINAL.search(text)
        assert m, f"math answer must end with a '#### N' line: {text!r}"
        stated, correct = int(m.group(1)), int(r["final_answer"])
        eqs = equations(text)
        assert len(eqs) >= 2
        wrong = [i for i, (ok, _) in enumerate(eqs) if not ok]
        last = eqs[-1][1]
        kind = r["corruption"]
        if kind == "wrong_final_answer":
            # Reasoning intact, only the final number changed, plausibly (small offset or digit slip).
            assert not wrong and last == correct and stated != correct
            assert abs(stated - correct) <= 10 or len(str(stated)) == len(str(correct))
        elif kind == "wrong_step":
            # Exactly one wrong computation, not the last, carried through to a wrong final answer.
            assert len(wrong) == 1 and wrong[0] < len(eqs) - 1, text
            assert stated == last != correct
        else:
            assert not wrong and stated == last == correct, text
        seen[kind] += 1
    expected = dd._kind_counts(len(rows))
    assert all(seen[k] == expected[k] for k in ("none", "wrong_step", "wrong_final_answer"))


def test_junk_spans_point_exactly_at_the_inserted_text(draw):
    rows = draw
    pools = set(dd._FILLER) | set(dd._TEMPLATE_TEXT)
    n_spans, kinds, non_ascii = 0, collections.Counter(), 0
    for r in rows:
        c = unicodedata.normalize("NFC", answer(r)).strip()  # what ingest stores
        if r["corruption"] != "junk_span":
            # Clean text carries none of the junk material (the metadata is complete, not just correct).
            assert not any(j in c for j in pools) and not has_repetition(c), c
            continue
        non_ascii += not c.isascii()
        spans = r["junk_spans"]
        assert spans == sorted(spans) and 1 <= len(spans) <= 2
        assert all(0 <= s < e <= len(c) for s, e in spans)
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))
        for s, e in spans:
            junk = c[s:e]
            assert junk == junk.strip() and junk
            n_spans += 1
            if junk in pools:
                kinds["pool"] += 1
            elif c[:s].endswith(junk + " ") or c[:s].endswith(junk + "\n"):
                kinds["repeated_line"] += 1  # an exact copy of the line right before it
            else:
                # A stutter: the phrase that starts the following text, repeated 2-3 times.
                words = junk.split()
                k = next(k for k in (2, 3) if len(words) % k == 0 and words == words[: len(words) // k] * k)
                phrase = " ".join(words[: len(words) // k])
                assert c[e:].startswith(" " + phrase + " "), (junk, c)
                kinds["stutter"] += 1
        # Removing the spans leaves a correct answer with no junk material left in it.
        cleaned = c
        for s, e in reversed(spans):
            cleaned = cleaned[:s] + cleaned[e:]
        assert not any(j in cleaned for j in pools) and not has_repetition(cleaned), cleaned
        assert all(ok for ok, _ in equations(cleaned))
        assert FINAL.search(cleaned).group(1) == r["final_answer"]
    n_rows = dd._kind_counts(len(rows))["junk_span"]
    assert n_spans >= n_rows and len(kinds) == 3, kinds  # every kind of junk (and check branch) exercised
    if len(rows) == dd.DEMO_SIZE:
        assert non_ascii > 0  # the pinned data has spans after accented names (code-point offsets)


def test_junk_offsets_are_code_points_of_the_normalised_text():
    lines = ["Zoë bakes 2 * 12 = 24 crêpes.", "Chloé eats 24 - 5 = 19 of them.", "#### 19"]
    inserts = [
        dd._Insert(0, False, "\n", "<|im_start|>assistant"),
        dd._Insert(1, False, " ", "Chloé eats Chloé eats", stutter=True),
        dd._Insert(1, True, "\n", "I hope this helps!"),
        dd._Insert(1, False, " ", "Great question!"),
    ]
    c, spans = dd._assemble(lines, inserts)
    assert c == unicodedata.normalize("NFC", c).strip()
    assert [c[s:e] for s, e in spans] == [
        "<|im_start|>assistant",
        "Great question!",
        "Chloé eats Chloé eats",  # the stutter stays glued to the line it repeats
        "I hope this helps!",
    ]
    assert c.endswith("Chloé eats Chloé eats Chloé eats 24 - 5 = 19 of them.\nI hope this helps!\n#### 19")


def test_near_duplicates_point_at_a_clean_sample_of_the_same_template(draw):
    rows = draw
    sources, ratios = [], []
    for i, r in enumerate(rows):
        if r["corruption"] != "near_duplicate":
            continue
        j = r["duplicate_of"]
        assert isinstance(j, int) and 0 <= j < len(rows) and j != i
        src = rows[j]
        assert src["corruption"] == "none" and src["template"] == r["template"]
        assert question(r) != question(src)
        ratios.append(difflib.SequenceMatcher(None, question(r), question(src)).ratio())
        sources.append(j)
    assert len(sources) == dd._kind_counts(len(rows))["near_duplicate"]
    # Slightly changed: almost all keep nearly all of the wording; the few full paraphrases (same
    # people, items and numbers, the template's other wording) still share a good part of it.
    assert min(ratios) > 0.35 and sum(x > 0.8 for x in ratios) >= 0.8 * len(ratios)
    assert len(set(sources)) == len(sources)  # each clean sample duplicated at most once
    assert sum(j < i for i, j in zip(
        [i for i, r in enumerate(rows) if r["corruption"] == "near_duplicate"], sources, strict=True
    )) >= 0.9 * len(sources)  # fmt: skip


def test_off_topic_is_well_formed_other_domain_qa(draw):
    rows = draw
    math_len = [len((question(r) + answer(r)).split()) for r in rows if r["domain"] == "math"]
    off = [r for r in rows if r["corruption"] == "off_topic"]
    assert {r["domain"] for r in off} == {"geography", "history", "cooking", "programming", "science"}
    off_len = [len((question(r) + answer(r)).split()) for r in off]
    # About as long as the math samples: similar medians, no outliers beyond the math range.
    assert 0.7 < statistics.median(off_len) / statistics.median(math_len) < 1.3
    assert 0.75 * min(math_len) <= min(off_len) and max(off_len) <= max(math_len)
    for r in off:
        assert "####" not in answer(r) and not equations(answer(r))
        assert r["final_answer"] in answer(r) or r["domain"] in ("cooking", "programming", "science")


def test_other_seeds_draw_different_problems():
    a = dd.generate_demo(600, seed=1)
    b = dd.generate_demo(600, seed=2)
    qa, qb = {question(r) for r in a}, {question(r) for r in b}
    shared = qa & qb
    assert len(shared) <= 6, shared  # (almost) none: at most 1%, and only from the off-topic fact bank
    off = {question(r) for r in a + b if r["corruption"] == "off_topic"}
    assert shared <= off
    # Not the same problems reshuffled: the multiset of final answers differs too.
    assert collections.Counter(r["final_answer"] for r in a) != collections.Counter(
        r["final_answer"] for r in b
    )


def test_deterministic_and_prefix_independent_of_call_order():
    first = dd.generate_demo(300, seed=7)
    dd.generate_demo(50, seed=8)  # unrelated draws in between change nothing (no global RNG state)
    assert dd.generate_demo(300, seed=7) == first
    assert dd.generate_demo(0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        dd.generate_demo(-1)


def test_write_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    assert dd.cache_dir() == tmp_path / "cache" and dd.cache_dir().is_dir()
    p = dd.demo_path(n=40, seed=3)
    assert p.parent == tmp_path / "cache" and p.suffix == ".jsonl"
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
    assert rows == dd.generate_demo(40, seed=3)
    mtime = p.stat().st_mtime_ns
    assert dd.demo_path(n=40, seed=3) == p and p.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert dd.demo_path(n=41, seed=3) != p and dd.demo_path(n=40, seed=4) != p
    monkeypatch.setattr(dd, "GENERATOR_VERSION", "test-bump")
    assert dd.demo_path(n=40, seed=3) != p  # a changed generator never reuses a stale cache
    assert not [f for f in (tmp_path / "cache").iterdir() if f.name.endswith(".tmp")]
    out = dd.write_demo_jsonl(tmp_path / "sub" / "d.jsonl", n=5, seed=3)
    assert out.read_text(encoding="utf-8").count("\n") == 5
