"""Deterministic demo instruction dataset with planted, recorded corruptions (the quickstart's data).

What it is. GSM8K-style word problems (people, items, prices, times, distances) whose assistant answers
reason in two to four short lines and end with a final line ``#### <integer>``; a known, frozen fraction
of the samples is corrupted *realistically* and every corruption is recorded next to the sample, so a
scorer can be measured against ground truth. Off-topic samples are well-formed Q&A from geography,
history, cooking, programming and science.

Frozen before any scorer existed (changing any of these changes the pinned dataset hash in
``tests/test_demo_data.py`` and must bump ``GENERATOR_VERSION``):

* ``DEMO_SIZE = 2000``, ``DEMO_SEED = 20261127``, ``GENERATOR_VERSION = "1"``.
* Rates -> exact counts for the default size (largest-remainder rounding, so counts always sum to n):
  none 0.70 (1400), wrong_final_answer 0.06 (120), wrong_step 0.06 (120), junk_span 0.08 (160),
  near_duplicate 0.05 (100), off_topic 0.05 (100).

Answer format (math samples). One reasoning step per line; every computation is written inline as
``a op b = c`` or a same-operator chain ``a op b op c = d`` with ASCII operators ``+ - * /`` and
non-negative integers only (division only where exact), units in words after the result
(``4 * 3 = 12 dollars``). The last line is ``#### N`` and N is the result of the last computation in a
clean answer. Nothing follows the ``####`` line; junk is only ever inserted before it.

Corruptions (all on math samples except ``off_topic``):

* ``wrong_final_answer``: every step right, only the ``####`` number changed by a plausible slip
  (off by 1 or 2, off by 10, one digit changed, two adjacent digits swapped).
* ``wrong_step``: one non-final computation gets a plausible wrong result (the slips above, or one
  operand's worth too many/few for a product) and the wrong value is carried consistently through every
  later step and the final answer; exactly one written equation is false.
* ``junk_span``: one (75%) or two (25%) spans inserted into a correct answer: filler sentences
  ("As an AI language model, ..."), a repeated line or stuttered phrase, stray chat-template text
  (``<|im_start|>assistant``, ``### Response:``, ``[INST]``, ...). ``junk_spans`` holds ``[start, end)``
  character offsets of exactly the inserted text (separators excluded) into the assistant content. The
  content is built already NFC-normalised and without outer whitespace (asserted), so the offsets are
  valid both for the raw row and for ``unicodedata.normalize("NFC", c).strip()`` as ingest stores it.
* ``near_duplicate``: a clean sample re-rendered from the same template and the same people/items with
  one number nudged by 5-25% (50%), the question reworded (20%), or both (30%); a rewording is one
  phrase swapped or a short instruction appended, or (1 in 4) the template's other wording, a full
  paraphrase with the same people, items and numbers; the answer is consistent and correct; ``duplicate_of`` is the index of the source (an earlier clean sample whenever one exists,
  each source used at most once while possible).
* ``off_topic``: a fact question from another domain with a 20-48 word answer (math answers: 17-58
  words; whole samples are about as long in both cases); ``domain`` names the domain and
  ``final_answer`` the key fact.

Row fields: ``messages`` (user, assistant), ``corruption``, ``is_correct`` (False only for the two
wrong-answer kinds), ``junk_spans``, ``duplicate_of``, ``domain``, ``final_answer`` (the *correct*
answer; for wrong rows the ``####`` line differs from it) and ``template`` (e.g. ``math/shopping_change``,
``offtopic/history``), added so analyses can stratify by template; all become ``meta_*`` columns.

Variety and separate draws. 32 math templates with 2-3 question wordings and 2 answer wordings each,
80 first names (including accented ones, which exercises the NFC path), per-template item lists and wide
number ranges; 5 off-topic domains with 98 facts, 2-4 wordings and optional prefixes/suffixes. Each
sample has its own RNG seeded from (seed, index), so ``generate_demo(n, seed=other)`` draws fresh
problems rather than reshuffling the same ones: the default draw and seed 1 share 8 of 2000 questions,
all off-topic (a fixed fact bank), and no math question. Uses only :mod:`random` with string seeds
(SHA-512 based, stable across Python versions and processes, unaffected by hash randomisation).

Size and speed (measured): a sample (question + answer) is 157-372 characters, median 219, i.e. roughly
50-100 tokens of rendered chat with a small BPE, so the quickstart's forward passes stay cheap; 2000
samples generate in ~0.3 s on one busy core.

Templates are data. The 32 math templates live in ``demo_templates.json`` and the off-topic fact banks
in ``demo_facts.json`` (package data); this module interprets them. Each template is an object with:

* ``draw``: the parameters, drawn in this order from the sample's RNG (the order is part of the frozen
  dataset): ``person`` / ``person 3`` (name, he, his, him with an optional suffix), ``two_people``
  (name, ... and name2, ...), ``w`` (the hidden answer-wording draw), ``key = randint A B [* K]``,
  ``key = choice LIST`` or ``key = choice 20 50 100`` or ``key = choice range A B STEP``,
  ``a, b = choice LIST`` (a list of pairs), ``a, b = sample LIST 2``; ``LIST`` names an entry of
  ``lists``.
* ``given`` (optional): values derived from the parameters, in order, ``name = expression`` (ints,
  names, ``+ - *``, comparisons, ``and``, tuples, ``TABLE[key]``), and ``check condition`` lines that
  reject a draw. Derived values are not parameters, so near-duplicates never nudge them. Expressions are
  walked by a ten-line evaluator over Python's ``ast``, never executed.
* ``steps``: the written computations, ``name = a op b [op c]`` (one operator per chain), evaluated
  through the step recorder so an injected slip propagates; the last one is the answer.
* ``questions``: the question wordings; ``lines``: the answer lines, a string or a pair of
  alternatives picked by the ``w`` draw.

Text fields are ``str.format`` templates over the parameters, derived values and steps (``{cost.eq}``
is the written equation ``4 * 3 = 12``, ``{cost}`` its value); ``{He}`` capitalises ``{he}`` (any
key). Step names must not shadow parameters (asserted). Written as code, the templates were ~940 lines
of one repeated shape; the draws they make are byte-identical to that code's (the pinned hash in
``tests/pipeline/test_demo_data.py`` did not change, and seven other (n, seed) draws compared equal).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

GENERATOR_VERSION = "1"
DEMO_SIZE = 2000
DEMO_SEED = 20261127
CORRUPTION_KINDS = ("none", "wrong_final_answer", "wrong_step", "junk_span", "near_duplicate", "off_topic")
CORRUPTION_RATES: dict[str, float] = {
    "none": 0.70,
    "wrong_final_answer": 0.06,
    "wrong_step": 0.06,
    "junk_span": 0.08,
    "near_duplicate": 0.05,
    "off_topic": 0.05,
}
assert tuple(CORRUPTION_RATES) == CORRUPTION_KINDS
assert abs(sum(CORRUPTION_RATES.values()) - 1.0) < 1e-9


# --------------------------------------------------------------------------------------------------
# Arithmetic with step recording and optional fault injection


class _Invalid(Exception):
    """Parameters (or an injected slip) make some step non-integer or non-positive: redraw."""


@dataclass(frozen=True)
class _Val:
    v: int  # the value carried forward (the wrong one after an injected slip)
    eq: str  # the computation as written, e.g. "4 * 3 = 12"

    def __str__(self) -> str:
        return str(self.v)


class _Calc:
    """Evaluates and records each step; step number `slip_at` gets `slip(true, operands, op)` instead.

    Templates use the returned value downstream, so an injected error propagates consistently.
    """

    def __init__(self, slip_at: int | None = None, slip: Callable[[int, list[int], str], int] | None = None):
        self.slip_at, self.slip = slip_at, slip
        self.results: list[int] = []

    def __call__(self, *terms: int | str | _Val) -> _Val:
        nums = [t.v if isinstance(t, _Val) else int(t) for t in terms[0::2]]
        ops = terms[1::2]
        op = ops[0]
        assert isinstance(op, str) and all(o == op for o in ops), "only same-operator chains"
        acc = nums[0]
        for x in nums[1:]:
            if op == "+":
                acc += x
            elif op == "-":
                acc -= x
            elif op == "*":
                acc *= x
            elif op == "/":
                if x == 0 or acc % x:
                    raise _Invalid
                acc //= x
            else:
                raise AssertionError(op)
            if acc <= 0:
                raise _Invalid
        if len(self.results) == self.slip_at:
            assert self.slip is not None
            acc = self.slip(acc, nums, op)
        self.results.append(acc)
        return _Val(acc, f" {op} ".join(map(str, nums)) + f" = {acc}")


def _slip(v: int, r: random.Random, operands: list[int] | None = None, op: str | None = None) -> int:
    """A plausible human/LM arithmetic slip of `v`: small offset, carry error, digit change or swap."""
    for _ in range(50):
        kind = r.choice(("small", "small", "ten", "digit", "swap", "operand"))
        s = str(v)
        if kind == "small":
            w = v + r.choice((-2, -1, 1, 2))
        elif kind == "ten":
            if v < 20:
                continue
            w = v + r.choice((-10, 10))
        elif kind == "digit":
            i = r.randrange(len(s))
            d = int(s[i]) + r.choice((-1, 1))
            if not 0 <= d <= 9 or (i == 0 and d == 0):
                continue
            w = int(s[:i] + str(d) + s[i + 1 :])
        elif kind == "swap":
            if len(s) < 2:
                continue
            i = r.randrange(len(s) - 1)
            t = s[:i] + s[i + 1] + s[i] + s[i + 2 :]
            if t[0] == "0":
                continue
            w = int(t)
        else:  # one operand's worth too many or too few: a * (b +- 1)
            if op != "*" or not operands or len(operands) != 2:
                continue
            w = v + r.choice((-1, 1)) * min(operands)
        if w > 0 and w != v:
            return w
    return v + 1


# --------------------------------------------------------------------------------------------------
# People and parameters

_FEMALE = (
    "Maria Aisha Chloé Priya Hannah Sofia Mei Fatima Olivia Grace Amara Lucia Yuki Emma Nadia Ingrid Zoë "
    "Leila Rosa Jing Keiko Ana Tamar Isabel Noor Freya Ava Mila Sakura Imani Elena Julia Rachel Kavya "
    "Amelia Sara Lina Beatriz Renée Abena"
).split()
_MALE = (
    "James Omar Diego Raj Lucas Kenji Mateo Ethan Samuel Ahmed Tomás Liam Noah Felix Kwame Arjun Hugo "
    "Ivan Marco Daniel Yusuf Oliver Leo Ben Carlos Jonas Pedro Malik Hiro Theo André Nikolai Kofi David "
    "Elijah Sami Rohan Max Jamal Tariq"
).split()


class _P(dict):
    """Template parameters with attribute access; `p.He` capitalises `p["he"]` (same for any key)."""

    def __getattr__(self, k: str) -> Any:
        if k in self:
            return self[k]
        low = k[:1].lower() + k[1:]
        if k[:1].isupper() and low in self:
            return str(self[low])[:1].upper() + str(self[low])[1:]
        raise AttributeError(k)

    def pick(self, *options: str) -> str:
        """Answer-wording choice driven by the hidden `_w` draw (kept by near-duplicates)."""
        return options[self["_w"] % len(options)]


def _person(r: random.Random, tag: str = "") -> dict[str, str]:
    if r.random() < 0.5:
        name, pron = r.choice(_FEMALE), ("she", "her", "her")
    else:
        name, pron = r.choice(_MALE), ("he", "his", "him")
    return {f"name{tag}": name, f"he{tag}": pron[0], f"his{tag}": pron[1], f"him{tag}": pron[2]}


def _two_people(r: random.Random) -> dict[str, str]:
    a = _person(r)
    for _ in range(20):
        b = _person(r, "2")
        if b["name2"] != a["name"]:
            return {**a, **b}
    raise _Invalid


@dataclass(frozen=True)
class _Template:
    name: str
    sample: Callable[[random.Random], dict[str, Any]]
    build: Callable[[_P, _Calc], tuple[list[str], list[str]]]  # -> (question wordings, answer lines)


def _w(r: random.Random) -> dict[str, int]:
    return {"_w": r.randrange(6)}


# --------------------------------------------------------------------------------------------------
# Math templates: data in demo_templates.json (grammar in the module docstring), read here. Each build
# computes through `c` so slips propagate; the last step is the answer.

_SPEC = json.loads(
    resources.files("winnow.pipeline.builtin").joinpath("demo_templates.json").read_text("utf-8")
)
_LISTS: dict[str, list] = _SPEC["lists"]
_TABLES: dict[str, dict] = {name: {int(k): v for k, v in t.items()} for name, t in _SPEC["tables"].items()}


def _draw_one(spec: str, r: random.Random) -> dict[str, Any]:
    """One ``draw`` entry of a template (grammar: :mod:`.demo_templates`) -> the parameters it adds."""
    if spec == "person":
        return _person(r)
    if spec.startswith("person "):
        return _person(r, spec.split()[1])
    if spec == "two_people":
        return _two_people(r)
    if spec == "w":
        return _w(r)
    keys, expr = (x.strip() for x in spec.split("=", 1))
    names = [k.strip() for k in keys.split(",")]
    op, *args = expr.split()
    if op == "randint":
        value: Any = r.randint(int(args[0]), int(args[1])) * (int(args[3]) if len(args) == 4 else 1)
    elif op == "choice":
        if args[0] == "range":
            value = r.choice(range(*map(int, args[1:])))
        elif args[0] in _LISTS:
            value = r.choice(_LISTS[args[0]])
        else:
            value = r.choice(tuple(map(int, args)))
    elif op == "sample":
        value = r.sample(_LISTS[args[0]], int(args[1]))
    else:
        raise AssertionError(f"unknown draw {spec!r}")
    if len(names) == 1:
        return {names[0]: value}
    return dict(zip(names, value, strict=True))


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def _eval(node: ast.AST, env: dict[str, Any]) -> Any:
    """The small expression language of ``given`` lines: names, ints, + - *, comparisons, and, tuples,
    TABLE[key] (a template's data is never executed as Python)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return _TABLES[node.id] if node.id in _TABLES else env[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_eval(e, env) for e in node.elts)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
        return _CMPOPS[type(node.ops[0])](_eval(node.left, env), _eval(node.comparators[0], env))
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return all(_eval(v, env) for v in node.values)
    if isinstance(node, ast.Subscript):
        return _eval(node.value, env)[_eval(node.slice, env)]
    raise AssertionError(f"unsupported expression {ast.dump(node)}")


class _Env(_P):
    """Format mapping over parameters, derived values and steps; ``{He}`` capitalises ``{he}``."""

    def __missing__(self, k: str) -> Any:
        return self.__getattr__(k)


def _given(lines: Sequence[str], p: _P) -> _Env:
    env = _Env(p)
    for line in lines:
        if line.startswith("check "):
            if not _eval(ast.parse(line[len("check ") :], mode="eval").body, env):
                raise _Invalid
            continue
        name, expr = (x.strip() for x in line.split("=", 1))
        env[name] = _eval(ast.parse(expr, mode="eval").body, env)
    return env


def _builder(spec: dict[str, Any]) -> Callable[[_P, _Calc], tuple[list[str], list[str]]]:
    def build(p: _P, c: _Calc) -> tuple[list[str], list[str]]:
        env = _given(spec.get("given", ()), p)
        for step in spec["steps"]:
            name, expr = (x.strip() for x in step.split("=", 1))
            assert name not in p, f"template {spec['name']}: step {name!r} shadows a parameter"
            terms = expr.split()
            env[name] = c(*(t if i % 2 else env[t] if t in env else int(t) for i, t in enumerate(terms)))
        qs = [q.format_map(env) for q in spec["questions"]]
        lines = [p.pick(*(x.format_map(env) for x in ln)) if isinstance(ln, list) else ln.format_map(env)
                 for ln in spec["lines"]]  # fmt: skip
        return qs, lines

    return build


def _load_template(spec: dict[str, Any]) -> _Template:
    def sample(r: random.Random) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in spec["draw"]:
            out.update(_draw_one(d, r))
        return out

    return _Template(spec["name"], sample, _builder(spec))


_TEMPLATES: list[_Template] = [_load_template(spec) for spec in _SPEC["templates"]]
MATH_TEMPLATES = tuple(f"math/{t.name}" for t in _TEMPLATES)  # the rows' ``template`` values


# --------------------------------------------------------------------------------------------------
# Off-topic Q&A (well-formed, factual, about as long as the math answers)

# The fact banks are data (demo_facts.json): (country, capital, where, fact), (question tail, year,
# sentence, sentence) and per domain (question wordings, answer, key fact).
_FACTS = json.loads(resources.files("winnow.pipeline.builtin").joinpath("demo_facts.json").read_text("utf-8"))
_GEOGRAPHY: list[list[str]] = _FACTS["geography"]["rows"]
_HISTORY: list[list[str]] = _FACTS["history"]["rows"]
_QA: dict[str, list[list]] = _FACTS["qa"]["domains"]
_OFF_DOMAINS = ("geography", "history", "cooking", "programming", "science")
_Q_PREFIX = (
    *[""] * 6,
    "Quick question: ",
    "I'm studying for a quiz. ",
    "Can you help me with this? ",
    "My friend and I disagree about this. ",
    "Random question, but: ",
    "I was reading about this earlier. ",
    "For a school project: ",
    "Hi! ",
)
_Q_SUFFIX = (
    *[""] * 5,
    " Please keep it short.",
    " A short explanation is enough.",
    " Thanks!",
    " Thank you.",
    " I'd like a clear answer.",
    " Just the basics, please.",
)


def _off_topic(r: random.Random) -> tuple[str, str, str, str]:
    """-> (question, answer, domain, key fact)."""
    domain = r.choice(_OFF_DOMAINS)
    if domain == "geography":
        country, cap, where, fact = r.choice(_GEOGRAPHY)
        core = r.choice(
            (
                f"What is the capital of {country}?",
                f"Which city is the capital of {country}, and where is the country?",
                f"Can you tell me the capital city of {country}?",
                f"What's the capital of {country}? I always mix it up.",
            )
        )
        answer = (
            f"The capital of {country} is {cap}. {country} is located {where}. {fact} So the answer is {cap}."
        )
        key = cap
    elif domain == "history":
        core_q, year, s1, s2 = r.choice(_HISTORY)
        core = r.choice(
            (f"In what year {core_q}?", f"When {core_q}?", f"What year {core_q}, and why does it matter?")
        )
        answer, key = f"{s1} {s2} So the short answer is {year}.", year
    else:
        wordings, answer, key = r.choice(_QA[domain])
        core = r.choice(wordings)
    question = r.choice(_Q_PREFIX) + core + r.choice(_Q_SUFFIX)
    return question, answer, domain, key


# --------------------------------------------------------------------------------------------------
# Junk spans

_FILLER = (
    "As an AI language model, I can help you with this problem.",
    "As an AI language model, I do not have personal opinions, but here is the calculation.",
    "Let me know if you have any other questions.",
    "I hope this helps!",
    "Great question!",
    "Sure! Here is a step-by-step solution.",
    "Please note that I cannot guarantee the accuracy of this answer.",
    "Feel free to ask if anything is unclear.",
    "Thank you for your patience.",
    "Remember to always double-check your work!",
    "Certainly! I'd be happy to help you with that.",
    "Let's think step by step.",
)
_TEMPLATE_TEXT = (
    "<|im_start|>assistant",
    "### Response:",
    "[INST]",
    "[/INST]",
    "<|endoftext|>",
    "</s>",
    "### Instruction:",
    "<|assistant|>",
    "Assistant:",
    "<|im_end|>",
    "{{ answer }}",
    "<|eot_id|>",
)


@dataclass(frozen=True)
class _Insert:
    line: int  # index into the answer lines (the final "####" line is last)
    after: bool  # inserted after that line's text rather than before it
    sep: str  # " " (same line) or "\n" (own line)
    text: str
    stutter: bool = False  # a phrase repeated right before the line it starts


def _junk_inserts(lines: list[str], r: random.Random) -> list[_Insert]:
    """1 (75%) or 2 (25%) junk insertions of different kinds; `lines` ends with the "####" line."""
    n_steps = len(lines) - 1
    kinds = r.sample(("filler", "template", "repeat"), 1 if r.random() < 0.75 else 2)
    out = []
    for kind in kinds:
        sep = r.choice((" ", "\n"))
        if kind == "template":
            # Leaked chat markup is most often at the very start, sometimes right before the end.
            at = 0 if r.random() < 0.6 else r.randint(1, n_steps)
            out.append(_Insert(at, False, "\n" if at == n_steps else sep, r.choice(_TEMPLATE_TEXT)))
        elif kind == "filler":
            at = r.choice((0, n_steps, r.randint(1, n_steps)))
            # Never on the "####" line itself: the final line stays exactly "#### N".
            out.append(_Insert(at, False, "\n" if at == n_steps else sep, r.choice(_FILLER)))
        else:
            j = r.randrange(n_steps)
            words = lines[j].split()
            prefix = []
            for w in words[:5]:
                if any(ch.isdigit() or ch == "$" for ch in w):
                    break
                prefix.append(w)
            if len(prefix) >= 2 and r.random() < 0.5:
                # Degenerate stutter: the phrase starting the line repeated 2-3 extra times before it.
                phrase = " ".join(prefix)
                out.append(_Insert(j, False, " ", " ".join([phrase] * r.randint(2, 3)), stutter=True))
            else:
                out.append(_Insert(j, True, sep, lines[j]))  # the whole line repeated right after itself
    return out


def _assemble(lines: list[str], inserts: list[_Insert]) -> tuple[str, list[list[int]]]:
    """Join lines with "\\n", applying the inserts; -> (content, [[start, end], ...] of inserted text)."""
    parts: list[str] = []
    spans: list[list[int]] = []
    pos = 0

    def emit(s: str, junk: bool = False) -> None:
        nonlocal pos
        if junk:
            spans.append([pos, pos + len(s)])
        parts.append(s)
        pos += len(s)

    # A stutter must sit right before the line it stutters, so it goes after other junk at that spot.
    befores = sorted((ins for ins in inserts if not ins.after), key=lambda ins: ins.stutter)
    for i, line in enumerate(lines):
        if i:
            emit("\n")
        for ins in befores:
            if ins.line == i:
                emit(ins.text, junk=True)
                emit(ins.sep)
        emit(line)
        for ins in inserts:
            if ins.line == i and ins.after:
                emit(ins.sep)
                emit(ins.text, junk=True)
    return "".join(parts), sorted(spans)


# --------------------------------------------------------------------------------------------------
# Sample assembly


@dataclass
class _Math:
    """Internal ground truth of one math sample (what near-duplicates are derived from)."""

    template: _Template
    params: _P
    qv: int  # question wording index


def _solve(t: _Template, p: _P, c: _Calc) -> tuple[list[str], list[str]]:
    qs, lines = t.build(p, c)
    assert c.results and lines, t.name
    return qs, lines


def _draw_math(r: random.Random) -> tuple[_Math, str, list[str], int]:
    t = r.choice(_TEMPLATES)
    for _ in range(200):
        try:
            p = _P(t.sample(r))
            qs, lines = _solve(t, p, c := _Calc())
        except _Invalid:
            continue
        qv = r.randrange(len(qs))
        return _Math(t, p, qv), qs[qv], lines, c.results[-1]
    raise AssertionError(f"template {t.name} rejects all draws")


def _wrong_step(m: _Math, correct: int, r: random.Random) -> tuple[list[str], int] | None:
    """Inject one plausible slip in a non-final step; -> (lines, wrong final) or None if none fits."""
    clean = _Calc()
    _solve(m.template, _P(m.params), clean)
    n_steps = len(clean.results)
    order = list(range(max(1, n_steps - 1)))
    r.shuffle(order)
    for k in order:
        for _ in range(6):
            c = _Calc(k, lambda v, ops, op: _slip(v, r, ops, op))
            try:
                _, lines = _solve(m.template, _P(m.params), c)
            except _Invalid:
                continue
            if c.results[-1] != correct:
                return lines, c.results[-1]
    return None


# Light rewordings for near-duplicates: one phrase swapped, or a short instruction appended.
_SWAPS = (
    (" buys ", " purchases "),
    ("altogether", "in all"),
    (" in total", " in all"),
    (" every ", " each "),
    (" wants ", " would like "),
    (" gives ", " hands "),
    ("How long", "How much time"),
    (" earns ", " makes "),
    (" at first", " initially"),
    (" receive", " get"),
)
_ASKS = (
    " Show your work.",
    " Explain your steps.",
    " Answer with a number.",
    " Think it through step by step.",
)


def _reword(q: str, r: random.Random) -> str:
    edits = [(a, b) for a, b in _SWAPS if a in q]
    if edits and r.random() < 0.6:
        a, b = r.choice(edits)
        return q.replace(a, b, 1)
    return q + r.choice(_ASKS)


def _near_duplicate(src: _Math, src_question: str, r: random.Random) -> tuple[_Math, str, list[str], int]:
    """Same template and people/items as `src`: one number nudged by 5-25% (50%), the question reworded
    (20%), or both (30%). A rewording is a light edit (`_reword`) 3 times in 4, else the template's
    other question wording (a full paraphrase with the same people, items and numbers)."""
    mode = r.choices(("numbers", "wording", "both"), weights=(5, 2, 3))[0]
    paraphrase = r.random() < 0.25
    t = src.template
    n_wordings = len(_solve(t, _P(src.params), _Calc())[0])
    for attempt in range(100):
        p = _P(src.params)
        qv = src.qv
        if mode in ("numbers", "both"):
            keys = [k for k, v in p.items() if isinstance(v, int) and not k.startswith("_")]
            k = r.choice(keys)
            step = max(1, round(p[k] * r.uniform(0.05, 0.25)))
            p[k] = p[k] + r.choice((-1, 1)) * step
            if p[k] < 2:  # every count stays plural ("1 hours") and positive
                continue
        if mode in ("wording", "both") and paraphrase:
            qv = (src.qv + r.randrange(1, n_wordings)) % n_wordings
        try:
            qs, lines = _solve(t, p, c := _Calc())
        except _Invalid:
            mode = "wording" if attempt > 50 else mode  # some templates rarely accept nudges: fall back
            continue
        q = _reword(qs[qv], r) if mode in ("wording", "both") and not paraphrase else qs[qv]
        if q != src_question:
            return _Math(t, p, qv), q, lines, c.results[-1]
    raise AssertionError(f"no near-duplicate for template {t.name}")


def _nfc_ok(s: str) -> str:
    # Offsets are recorded against this exact string, so ingest's normalisation must be a no-op on it.
    assert unicodedata.normalize("NFC", s).strip() == s, repr(s[:80])
    return s


def _kind_counts(n: int) -> dict[str, int]:
    """Largest-remainder rounding of rate * n (ties by CORRUPTION_KINDS order), summing exactly to n."""
    scale = 10**6
    quotas = {k: round(CORRUPTION_RATES[k] * scale) * n for k in CORRUPTION_KINDS}
    counts = {k: q // scale for k, q in quotas.items()}
    by_rem = sorted(CORRUPTION_KINDS, key=lambda k: (-(quotas[k] % scale), CORRUPTION_KINDS.index(k)))
    for k in by_rem[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _row(
    q: str, a: str, kind: str, *, correct: bool, spans=None, dup=None, domain="math", final="", tpl=""
) -> dict:
    return {
        "messages": [{"role": "user", "content": _nfc_ok(q)}, {"role": "assistant", "content": _nfc_ok(a)}],
        "corruption": kind,
        "is_correct": correct,
        "junk_spans": spans or [],
        "duplicate_of": dup,
        "domain": domain,
        "final_answer": final,
        "template": tpl,
    }


def generate_demo(n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> list[dict]:
    """The demo dataset: `n` rows with exactly `_kind_counts(n)` corruptions of each kind, deterministic
    in (`n`, `seed`). See the module docstring for the row format."""
    if n < 0:
        raise ValueError(f"generate_demo: n must be >= 0, got {n}")
    counts = _kind_counts(n)
    kinds = [k for k in CORRUPTION_KINDS for _ in range(counts[k])]
    random.Random(f"winnow-demo/{seed}/kinds").shuffle(kinds)

    rows: list[dict | None] = [None] * n
    truth: dict[int, tuple[_Math, str]] = {}
    for i, kind in enumerate(kinds):
        if kind == "near_duplicate":
            continue  # second pass: needs its source sample
        r = random.Random(f"winnow-demo/{seed}/{i}")
        if kind == "off_topic":
            q, a, domain, key = _off_topic(r)
            rows[i] = _row(q, a, kind, correct=True, domain=domain, final=key, tpl="offtopic/" + domain)
            continue
        for _attempt in range(1000):
            m, q, lines, correct = _draw_math(r)
            stated, spans = correct, []
            if kind == "wrong_step":
                got = _wrong_step(m, correct, r)
                if got is None:
                    continue  # no slip keeps this draw valid: redraw the problem
                lines, stated = got
            elif kind == "wrong_final_answer":
                stated = _slip(correct, r)
            break
        else:
            raise AssertionError(f"no valid {kind} sample after 1000 draws (sample {i})")
        lines = [*lines, f"#### {stated}"]
        a, spans = _assemble(lines, _junk_inserts(lines, r) if kind == "junk_span" else [])
        truth[i] = (m, q)
        ok = kind not in ("wrong_final_answer", "wrong_step")
        rows[i] = _row(q, a, kind, correct=ok, spans=spans, final=str(correct), tpl="math/" + m.template.name)

    clean = [i for i, k in enumerate(kinds) if k == "none"]
    used: set[int] = set()
    for i, kind in enumerate(kinds):
        if kind != "near_duplicate":
            continue
        r = random.Random(f"winnow-demo/{seed}/{i}")
        # Prefer an earlier, not yet duplicated clean sample, as a duplicate would appear in real data.
        pool = [j for j in clean if j < i and j not in used] or [j for j in clean if j not in used] or clean
        assert pool, "near_duplicate needs at least one clean sample"
        j = r.choice(pool)
        used.add(j)
        m, q, lines, correct = _near_duplicate(*truth[j], r)
        a, _ = _assemble([*lines, f"#### {correct}"], [])
        rows[i] = _row(q, a, kind, correct=True, dup=j, final=str(correct), tpl="math/" + m.template.name)
    return rows  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Files


def cache_dir() -> Path:
    """$WINNOW_CACHE if set, else ~/.cache/winnow; created on demand."""
    env = os.environ.get("WINNOW_CACHE")
    d = Path(env).expanduser() if env else Path.home() / ".cache" / "winnow"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_demo_jsonl(path: str | os.PathLike, n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> Path:
    """Write `generate_demo(n, seed)` as UTF-8 JSONL atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = generate_demo(n, seed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def demo_path(n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> Path:
    """The demo dataset as JSONL in the cache dir, written on first use.

    The name carries a hash of (GENERATOR_VERSION, n, seed), so a changed generator never reuses a
    stale file; concurrent first calls are safe (each writes its own temp file, the rename is atomic).
    """
    h = hashlib.sha256(f"{GENERATOR_VERSION}/{n}/{seed}".encode()).hexdigest()[:12]
    path = cache_dir() / f"demo-n{n}-s{seed}-{h}.jsonl"
    if not path.exists():
        write_demo_jsonl(path, n, seed)
    return path
