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

This module stays one file (rather than templates split out) so the frozen dataset's whole definition
is read, reviewed and versioned in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
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


_TEMPLATES: list[_Template] = []


def _template(sample: Callable[[random.Random], dict[str, Any]]):
    def register(build: Callable[[_P, _Calc], tuple[list[str], list[str]]]):
        _TEMPLATES.append(_Template(build.__name__.removeprefix("_t_"), sample, build))
        return build

    return register


def _w(r: random.Random) -> dict[str, int]:
    return {"_w": r.randrange(6)}


# --------------------------------------------------------------------------------------------------
# Math templates (30). Each build computes through `c` so slips propagate; the last `c(...)` is the answer.

_SHOP_ITEMS = (
    "notebooks",
    "pens",
    "mangoes",
    "comic books",
    "candles",
    "pairs of socks",
    "mugs",
    "toy cars",
    "plant pots",
    "jars of honey",
    "packs of stickers",
    "bottles of juice",
    "scarves",
    "picture frames",
    "bags of flour",
    "phone cases",
)


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "item": r.choice(_SHOP_ITEMS),
        "n": r.randint(2, 9),
        "price": r.randint(2, 15),
        "bill": r.choice((20, 50, 100)),
    }
)
def _t_shopping_change(p: _P, c: _Calc):
    cost = c(p.n, "*", p.price)
    change = c(p.bill, "-", cost)
    qs = [
        f"{p.name} buys {p.n} {p.item} that cost ${p.price} each. {p.He} pays with a ${p.bill} bill. "
        f"How much change does {p.he} get back?",
        f"At the market, {p.name} picks up {p.n} {p.item} priced at ${p.price} apiece and hands the "
        f"cashier ${p.bill}. How much change should {p.he} receive?",
        f"{p.n} {p.item} cost ${p.price} each. If {p.name} buys all of them and pays with ${p.bill}, how "
        f"many dollars of change will {p.he} get?",
    ]
    lines = [
        p.pick(f"The {p.item} cost {cost.eq} dollars in total.", f"{p.He} spends {cost.eq} dollars."),
        p.pick(f"So {p.name} gets {change.eq} dollars back.", f"The change is {change.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "item1": (items := r.sample(_SHOP_ITEMS, 2))[0],
        "item2": items[1],
        "a": r.randint(2, 8),
        "p1": r.randint(2, 12),
        "b": r.randint(2, 8),
        "p2": r.randint(2, 12),
    }
)
def _t_two_items_total(p: _P, c: _Calc):
    x = c(p.a, "*", p.p1)
    y = c(p.b, "*", p.p2)
    total = c(x, "+", y)
    qs = [
        f"{p.name} buys {p.a} {p.item1} at ${p.p1} each and {p.b} {p.item2} at ${p.p2} each. How much "
        f"does {p.he} spend altogether?",
        f"For a school fair, {p.name} orders {p.a} {p.item1} costing ${p.p1} each and {p.b} {p.item2} "
        f"costing ${p.p2} each. What is the total cost of the order?",
    ]
    lines = [
        f"The {p.item1} cost {x.eq} dollars.",
        f"The {p.item2} cost {y.eq} dollars.",
        p.pick(f"Altogether {p.he} spends {total.eq} dollars.", f"The total is {total.eq} dollars."),
    ]
    return qs, lines


_GOALS = ("bicycle", "video game", "pair of headphones", "skateboard", "guitar", "tent", "telescope", "watch")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "goal": r.choice(_GOALS),
        "have": r.randint(5, 60),
        "save": r.randint(3, 25),
        "weeks": r.randint(2, 12),
    }
)
def _t_savings_weeks(p: _P, c: _Calc):
    cost = p.have + p.save * p.weeks  # derived, so the division is exact (also after a nudge)
    need = c(cost, "-", p.have)
    weeks = c(need, "/", p.save)
    qs = [
        f"{p.name} wants a {p.goal} that costs ${cost}. {p.He} already has ${p.have} and saves ${p.save} "
        f"every week. How many weeks will it take {p.him} to have enough money?",
        f"A {p.goal} costs ${cost}. {p.name} has saved ${p.have} so far and puts away ${p.save} a week. "
        f"In how many weeks can {p.he} buy the {p.goal}?",
    ]
    lines = [
        f"{p.name} still needs {need.eq} dollars.",
        p.pick(
            f"At ${p.save} a week, that takes {weeks.eq} weeks.",
            f"So {p.he} needs {weeks.eq} weeks of saving.",
        ),
    ]
    return qs, lines


_BAKED = ("cookies", "muffins", "cupcakes", "brownies", "scones", "cinnamon rolls", "dumplings", "tarts")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "food": r.choice(_BAKED),
        "batches": r.randint(2, 6),
        "per": r.randint(6, 24),
        "eat": r.randint(1, 6),
        "give": r.randint(3, 20),
    }
)
def _t_baking_left(p: _P, c: _Calc):
    made = c(p.batches, "*", p.per)
    left = c(made, "-", p.eat, "-", p.give)
    qs = [
        f"{p.name} bakes {p.batches} batches of {p.food} with {p.per} {p.food} in each batch. {p.He} eats "
        f"{p.eat} and gives {p.give} to {p.his} neighbours. How many {p.food} are left?",
        f"Each batch of {p.food} makes {p.per}. {p.name} makes {p.batches} batches, eats {p.eat} of them and "
        f"brings {p.give} to work. How many {p.food} does {p.he} have left?",
    ]
    lines = [
        f"{p.name} makes {made.eq} {p.food}.",
        p.pick(f"After eating and giving some away, {left.eq} are left.", f"So {left.eq} {p.food} remain."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "pages": r.randint(120, 480),
        "rate": r.randint(8, 40),
        "days": r.randint(2, 9),
    }
)
def _t_reading_left(p: _P, c: _Calc):
    read = c(p.rate, "*", p.days)
    left = c(p.pages, "-", read)
    qs = [
        f"{p.name}'s book has {p.pages} pages. {p.He} reads {p.rate} pages a day for {p.days} days. How "
        f"many pages does {p.he} still have to read?",
        f"A novel is {p.pages} pages long. If {p.name} reads {p.rate} pages every day, how many pages are "
        f"left after {p.days} days?",
    ]
    lines = [
        f"In {p.days} days {p.he} reads {read.eq} pages.",
        p.pick(f"That leaves {left.eq} pages.", f"{p.He} still has {left.eq} pages to read."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "done": r.randint(20, 150),
        "rate": r.randint(6, 45),
        "days": r.randint(2, 15),
    }
)
def _t_reading_days(p: _P, c: _Calc):
    pages = p.done + p.rate * p.days  # derived, so the division is exact
    left = c(pages, "-", p.done)
    days = c(left, "/", p.rate)
    qs = [
        f"{p.name} is reading a {pages}-page book and has read {p.done} pages so far. If {p.he} reads "
        f"{p.rate} pages each day, how many more days will it take to finish?",
        f"A {pages}-page report has to be read. {p.name} has finished {p.done} pages and reads {p.rate} "
        f"pages per day. How many more days does {p.he} need?",
    ]
    lines = [
        f"{p.He} has {left.eq} pages left.",
        p.pick(f"At {p.rate} pages a day, that takes {days.eq} days.", f"{p.He} needs {days.eq} more days."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "v1": r.choice(range(30, 75, 5)),
        "t1": r.randint(2, 5),
        "v2": r.choice(range(30, 75, 5)),
        "t2": r.randint(2, 5),
    }
)
def _t_travel_distance(p: _P, c: _Calc):
    d1 = c(p.v1, "*", p.t1)
    d2 = c(p.v2, "*", p.t2)
    total = c(d1, "+", d2)
    qs = [
        f"{p.name} drives at {p.v1} miles per hour for {p.t1} hours, then at {p.v2} miles per hour for "
        f"{p.t2} more hours. How many miles does {p.he} drive in total?",
        f"On a road trip, {p.name} travels {p.t1} hours at {p.v1} mph and then {p.t2} hours at {p.v2} mph. "
        f"What is the total distance?",
    ]
    lines = [
        f"The first part is {d1.eq} miles.",
        f"The second part is {d2.eq} miles.",
        p.pick(f"In total {p.he} drives {total.eq} miles.", f"The total distance is {total.eq} miles."),
    ]
    return qs, lines


_JOBS = ("at a bakery", "at a bookstore", "as a tutor", "at a cafe", "at a garden centre", "as a lifeguard")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "job": r.choice(_JOBS),
        "wage": r.randint(9, 30),
        "hours": r.randint(2, 8),
        "days": r.randint(2, 6),
    }
)
def _t_wages(p: _P, c: _Calc):
    hours = c(p.hours, "*", p.days)
    pay = c(hours, "*", p.wage)
    qs = [
        f"{p.name} works {p.job} for ${p.wage} an hour. {p.He} works {p.hours} hours a day for {p.days} "
        f"days. How much does {p.he} earn?",
        f"{p.name} earns ${p.wage} per hour working {p.job}. This week {p.he} worked {p.days} days, "
        f"{p.hours} hours each day. How much did {p.he} make this week?",
    ]
    lines = [
        f"{p.He} works {hours.eq} hours.",
        p.pick(f"So {p.he} earns {pay.eq} dollars.", f"{p.His} pay is {pay.eq} dollars."),
    ]
    return qs, lines


_PRACTICE = ("piano", "violin", "chess", "drawing", "Spanish", "swimming", "the drums", "coding")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "skill": r.choice(_PRACTICE),
        "mins": r.choice((15, 20, 30, 40, 45, 60, 90)),
        "days": r.randint(3, 7),
        "weeks": r.randint(2, 8),
    }
)
def _t_practice_hours(p: _P, c: _Calc):
    week = c(p.mins, "*", p.days)
    mins = c(week, "*", p.weeks)
    hours = c(mins, "/", 60)
    qs = [
        f"{p.name} practises {p.skill} for {p.mins} minutes a day, {p.days} days a week. How many hours "
        f"does {p.he} practise in {p.weeks} weeks?",
        f"For {p.weeks} weeks, {p.name} spends {p.mins} minutes on {p.skill} on each of {p.days} days a "
        f"week. How many hours is that in total?",
    ]
    lines = [
        f"Each week {p.he} practises {week.eq} minutes.",
        f"Over {p.weeks} weeks that is {mins.eq} minutes.",
        p.pick(f"That is {hours.eq} hours.", f"In hours, {hours.eq}."),
    ]
    return qs, lines


_SWEETS = ("candies", "stickers", "marbles", "trading cards", "chocolates", "seashells", "pencils", "beads")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "thing": r.choice(_SWEETS),
        "friends": r.randint(2, 8),
        "keep": r.randint(2, 12),
        "each": r.randint(2, 12),
    }
)
def _t_sharing(p: _P, c: _Calc):
    total = p.keep + p.friends * p.each
    rest = c(total, "-", p.keep)
    each = c(rest, "/", p.friends)
    qs = [
        f"{p.name} has {total} {p.thing}. {p.He} keeps {p.keep} for {p.him}self and shares the rest equally "
        f"among {p.friends} friends. How many {p.thing} does each friend get?",
        f"After keeping {p.keep} {p.thing}, {p.name} splits the rest of {p.his} {total} {p.thing} evenly "
        f"between {p.friends} friends. How many does each friend receive?",
    ]
    lines = [
        f"{p.He} shares {rest.eq} {p.thing}.",
        p.pick(f"Each friend gets {each.eq} {p.thing}.", f"So each friend receives {each.eq}."),
    ]
    return qs, lines


_PLANTS = (
    "tomato plants",
    "lettuces",
    "carrots",
    "sunflowers",
    "pepper plants",
    "strawberry plants",
    "cabbages",
)


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "plant": r.choice(_PLANTS),
        "rows": r.randint(3, 12),
        "per": r.randint(4, 15),
        "lost": r.randint(2, 15),
    }
)
def _t_garden(p: _P, c: _Calc):
    planted = c(p.rows, "*", p.per)
    left = c(planted, "-", p.lost)
    qs = [
        f"{p.name} plants {p.rows} rows of {p.plant} with {p.per} in each row. Rabbits eat {p.lost} of "
        f"them. How many {p.plant} are left?",
        f"In {p.his} garden, {p.name} has {p.rows} rows with {p.per} {p.plant} per row. A storm destroys "
        f"{p.lost} of them. How many survive?",
    ]
    lines = [
        f"{p.He} plants {planted.eq} {p.plant}.",
        p.pick(f"{left.eq} are left.", f"So {left.eq} {p.plant} remain."),
    ]
    return qs, lines


_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth"}
_GROUPS = ("class", "club", "team", "choir", "year group", "summer camp", "chess club", "drama group")
# (what the fraction does, what the rest do)
_SPLITS = (
    ("walk to school", "take the bus"),
    ("bring lunch from home", "eat in the canteen"),
    ("chose football", "chose basketball"),
    ("voted for pizza", "voted for pasta"),
    ("wear glasses", "do not wear glasses"),
    ("have a pet", "do not have a pet"),
    ("play an instrument", "do not play an instrument"),
    ("signed up for the trip", "stayed behind"),
)


@_template(
    lambda r: (
        {
            **_person(r),
            **_w(r),
            "k": r.randint(2, 6),
            "m": r.randint(4, 16),
            "group": r.choice(_GROUPS),
        }
        | dict(zip(("some", "rest_do"), r.choice(_SPLITS), strict=True))
    )  # strings, so near-duplicates never change them
)
def _t_class_fraction(p: _P, c: _Calc):
    if p.k not in _FRACTIONS:
        raise _Invalid
    n = p.k * p.m  # derived, so the division is exact
    frac = _FRACTIONS[p.k]
    some, rest_do = p.some, p.rest_do
    part = c(n, "/", p.k)
    rest = c(n, "-", part)
    qs = [
        f"{p.name}'s {p.group} has {n} students. {frac.capitalize()} of them {some} and the rest {rest_do}. "
        f"How many students {rest_do}?",
        f"There are {n} students in {p.name}'s {p.group}. If {frac} of them {some}, how many {rest_do}?",
    ]
    lines = [
        f"{part.eq} students {some}.",
        p.pick(f"So {rest.eq} students {rest_do}.", f"That leaves {rest.eq} students who {rest_do}."),
    ]
    return qs, lines


_CLOTHES = ("jacket", "pair of boots", "backpack", "lamp", "desk chair", "rug", "coat", "pair of jeans")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "thing": r.choice(_CLOTHES),
        "price": r.randint(2, 15) * 20,
        "pct": r.choice((10, 20, 25, 50)),
    }
)
def _t_discount(p: _P, c: _Calc):
    x = c(p.price, "*", p.pct)
    off = c(x, "/", 100)
    final = c(p.price, "-", off)
    qs = [
        f"A {p.thing} costs ${p.price}. The store offers {p.pct}% off. How much does {p.name} pay for it?",
        f"{p.name} sees a {p.thing} priced at ${p.price} with a {p.pct}% discount. What is the sale price?",
    ]
    lines = [
        f"{p.pct}% of {p.price} is {x.eq} hundredths, and {off.eq} dollars off.",
        p.pick(f"{p.name} pays {final.eq} dollars.", f"The sale price is {final.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_two_people(r),
        **_w(r),
        "a": r.randint(4, 40),
        "diff": r.randint(2, 15),
        "yrs": r.randint(2, 10),
    }
)
def _t_ages(p: _P, c: _Calc):
    b = c(p.a, "+", p.diff)
    now = c(p.a, "+", b)
    add = c(p.yrs, "*", 2)
    later = c(now, "+", add)
    qs = [
        f"{p.name} is {p.a} years old. {p.name2} is {p.diff} years older than {p.name}. What will the sum of "
        f"their ages be in {p.yrs} years?",
        f"{p.name2} is {p.diff} years older than {p.name}, who is {p.a}. In {p.yrs} years, what will their "
        f"ages add up to?",
    ]
    lines = [
        f"{p.name2} is {b.eq} years old.",
        f"Their ages now add up to {now.eq}.",
        f"In {p.yrs} years each is {p.yrs} years older, which adds {add.eq} years.",
        p.pick(f"The sum will be {later.eq}.", f"So their ages will add up to {later.eq}."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "mpg": r.choice((20, 25, 30, 35, 40)),
        "gal": r.randint(2, 12),
        "price": r.randint(3, 6),
    }
)
def _t_fuel_cost(p: _P, c: _Calc):
    miles = p.mpg * p.gal
    gallons = c(miles, "/", p.mpg)
    cost = c(gallons, "*", p.price)
    qs = [
        f"{p.name}'s car goes {p.mpg} miles on a gallon of gas. Gas costs ${p.price} a gallon. How much "
        f"does {p.he} spend on gas for a {miles}-mile trip?",
        f"A trip is {miles} miles long. {p.name}'s car gets {p.mpg} miles per gallon and gas is ${p.price} "
        f"per gallon. What does the gas for the trip cost?",
    ]
    lines = [
        f"The trip needs {gallons.eq} gallons.",
        p.pick(f"That costs {cost.eq} dollars.", f"So {p.he} spends {cost.eq} dollars on gas."),
    ]
    return qs, lines


_FOUR_LEGS = ("cows", "goats", "sheep", "pigs", "horses")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "beast": r.choice(_FOUR_LEGS),
        "birds": r.randint(3, 30),
        "four": r.randint(2, 20),
    }
)
def _t_animal_legs(p: _P, c: _Calc):
    x = c(p.birds, "*", 2)
    y = c(p.four, "*", 4)
    total = c(x, "+", y)
    qs = [
        f"{p.name}'s farm has {p.birds} chickens and {p.four} {p.beast}. How many legs do the animals have "
        f"altogether?",
        f"On {p.name}'s farm there are {p.four} {p.beast} and {p.birds} chickens. Counting every animal, how many "
        f"legs are there?",
    ]
    lines = [
        f"The chickens have {x.eq} legs.",
        f"The {p.beast} have {y.eq} legs.",
        p.pick(f"Altogether there are {total.eq} legs.", f"That makes {total.eq} legs."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "pizzas": r.randint(2, 6),
        "slices": r.choice((6, 8, 10, 12)),
        "people": r.randint(2, 9),
        "each": r.randint(2, 4),
    }
)
def _t_pizza(p: _P, c: _Calc):
    total = c(p.pizzas, "*", p.slices)
    eaten = c(p.people, "*", p.each)
    left = c(total, "-", eaten)
    qs = [
        f"{p.name} orders {p.pizzas} pizzas, each cut into {p.slices} slices. {p.people} people eat "
        f"{p.each} slices each. How many slices are left?",
        f"At {p.name}'s party there are {p.pizzas} pizzas with {p.slices} slices each. If each of the {p.people} "
        f"guests eats {p.each} slices, how many slices remain?",
    ]
    lines = [
        f"There are {total.eq} slices.",
        f"The guests eat {eaten.eq} slices.",
        p.pick(f"So {left.eq} slices are left.", f"{left.eq} slices remain."),
    ]
    return qs, lines


_EVENTS = ("bake sale", "school play", "charity concert", "quiz night", "car wash", "raffle")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "event": r.choice(_EVENTS),
        "n": r.randint(20, 150),
        "price": r.randint(2, 12),
        "cost": r.randint(20, 200),
    }
)
def _t_fundraiser(p: _P, c: _Calc):
    income = c(p.n, "*", p.price)
    profit = c(income, "-", p.cost)
    qs = [
        f"{p.name} organises a {p.event} and sells {p.n} tickets at ${p.price} each. The costs are "
        f"${p.cost}. How much money does the {p.event} raise after costs?",
        f"Tickets for a {p.event} cost ${p.price}. {p.n} tickets are sold and the organisers spend "
        f"${p.cost} on supplies. What is the profit?",
    ]
    lines = [
        f"Ticket sales bring in {income.eq} dollars.",
        p.pick(f"After costs, the profit is {profit.eq} dollars.", f"So it raises {profit.eq} dollars."),
    ]
    return qs, lines


@_template(lambda r: {**_w(r), "rate": r.randint(2, 20), "mins": r.randint(3, 30), "have": r.randint(5, 200)})
def _t_tank_fill(p: _P, c: _Calc):
    cap = p.have + p.rate * p.mins
    need = c(cap, "-", p.have)
    mins = c(need, "/", p.rate)
    qs = [
        f"A water tank holds {cap} litres and already contains {p.have} litres. A hose adds {p.rate} litres "
        f"per minute. How many minutes will it take to fill the tank?",
        f"A {cap}-litre tank has {p.have} litres of water in it. Water flows in at {p.rate} litres a minute. "
        f"How long until it is full, in minutes?",
    ]
    lines = [
        f"The tank needs {need.eq} more litres.",
        p.pick(f"At {p.rate} litres a minute, that takes {mins.eq} minutes.", f"It takes {mins.eq} minutes."),
    ]
    return qs, lines


_COLLECT = ("stamps", "coins", "postcards", "baseball cards", "vinyl records", "keychains", "rocks")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "thing": r.choice(_COLLECT),
        "have": r.randint(10, 150),
        "buy": r.randint(2, 15),
        "months": r.randint(2, 12),
        "give": r.randint(2, 30),
    }
)
def _t_collection(p: _P, c: _Calc):
    new = c(p.buy, "*", p.months)
    more = c(p.have, "+", new)
    left = c(more, "-", p.give)
    qs = [
        f"{p.name} has {p.have} {p.thing}. {p.He} adds {p.buy} {p.thing} every month for {p.months} months "
        f"and then gives {p.give} to a friend. How many {p.thing} does {p.he} have now?",
        f"{p.name}'s collection has {p.have} {p.thing}. Over {p.months} months {p.he} gets {p.buy} more "
        f"each month, then gives away {p.give}. How many are in the collection now?",
    ]
    lines = [
        f"{p.He} adds {new.eq} {p.thing}.",
        f"That gives {more.eq} {p.thing}.",
        p.pick(f"After giving some away, {p.he} has {left.eq}.", f"Now there are {left.eq} {p.thing}."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "k": r.randint(3, 5),
        "each": r.randint(250, 900),
        "util": r.randint(2, 20) * 10,
    }
)
def _t_rent_split(p: _P, c: _Calc):
    total = p.k * p.each
    rent = total - p.util
    if rent <= 0 or p.k < 3:  # "with 1 roommates"
        raise _Invalid
    t = c(rent, "+", p.util)
    share = c(t, "/", p.k)
    qs = [
        f"{p.name} shares an apartment with {p.k - 1} roommates. The rent is ${rent} a month and utilities "
        f"are ${p.util}. If they split everything equally, how much does each person pay?",
        f"Rent is ${rent} and utilities cost ${p.util} a month. {p.name} and {p.his} roommates, {p.k} people "
        f"in all, split the bills evenly. What is each person's share?",
    ]
    lines = [
        f"The monthly total is {t.eq} dollars.",
        p.pick(f"Each person pays {share.eq} dollars.", f"Each share is {share.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "a": r.randint(2, 10),
        "sat": r.randint(5, 21),
        "weeks": r.randint(2, 8),
    }
)
def _t_running(p: _P, c: _Calc):
    weekdays = c(p.a, "*", 5)
    week = c(weekdays, "+", p.sat)
    total = c(week, "*", p.weeks)
    qs = [
        f"{p.name} runs {p.a} km every weekday and {p.sat} km on Saturday. How many km does {p.he} run in "
        f"{p.weeks} weeks?",
        f"Training for a race, {p.name} runs {p.a} km on each of the 5 weekdays plus a {p.sat} km run on "
        f"Saturdays. What distance does {p.he} cover in {p.weeks} weeks?",
    ]
    lines = [
        f"On weekdays {p.he} runs {weekdays.eq} km.",
        f"Each week {p.he} runs {week.eq} km.",
        p.pick(f"In {p.weeks} weeks that is {total.eq} km.", f"So {p.he} runs {total.eq} km."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_two_people(r),
        **_person(r, "3"),
        **_w(r),
        "thing": r.choice(_SWEETS),
        "n": r.randint(3, 25),
        "k": r.randint(2, 5),
        "d": r.randint(1, 10),
    }
)
def _t_times_as_many(p: _P, c: _Calc):
    if p.name3 in (p.name, p.name2):
        raise _Invalid
    x = c(p.n, "*", p.k)
    z = c(x, "-", p.d)
    total = c(p.n, "+", x, "+", z)
    qs = [
        f"{p.name2} has {p.n} {p.thing}. {p.name} has {p.k} times as many as {p.name2}, and {p.name3} has "
        f"{p.d} fewer than {p.name}. How many {p.thing} do they have altogether?",
        f"{p.name} has {p.k} times as many {p.thing} as {p.name2}, who has {p.n}. {p.name3} has {p.d} fewer "
        f"than {p.name}. How many {p.thing} do the three of them have in total?",
    ]
    lines = [
        f"{p.name} has {x.eq} {p.thing}.",
        f"{p.name3} has {z.eq} {p.thing}.",
        p.pick(f"Together they have {total.eq} {p.thing}.", f"The total is {total.eq}."),
    ]
    return qs, lines


_INGREDIENTS = ("cups of flour", "eggs", "tablespoons of butter", "cups of milk", "grams of sugar", "carrots")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "ing": r.choice(_INGREDIENTS),
        "amt": r.randint(2, 9),
        "serv": r.choice((2, 3, 4, 6)),
        "mult": r.randint(2, 6),
    }
)
def _t_recipe_scale(p: _P, c: _Calc):
    want = p.serv * p.mult
    m = c(want, "/", p.serv)
    need = c(p.amt, "*", m)
    qs = [
        f"A recipe uses {p.amt} {p.ing} to make {p.serv} servings. {p.name} wants to make {want} servings. "
        f"How many {p.ing} does {p.he} need?",
        f"{p.name}'s soup recipe serves {p.serv} and calls for {p.amt} {p.ing}. How many {p.ing} are needed "
        f"for {want} servings?",
    ]
    lines = [
        f"{want} servings is {m.eq} times the recipe.",
        p.pick(f"{p.He} needs {need.eq} {p.ing}.", f"So the recipe needs {need.eq} {p.ing}."),
    ]
    return qs, lines


_MEMBERSHIPS = ("gym", "climbing wall", "swimming pool", "yoga studio", "music school", "tennis club")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "place": r.choice(_MEMBERSHIPS),
        "fee": r.randint(10, 80),
        "monthly": r.randint(15, 60),
        "months": r.randint(2, 12),
    }
)
def _t_membership(p: _P, c: _Calc):
    fees = c(p.monthly, "*", p.months)
    total = c(fees, "+", p.fee)
    qs = [
        f"A {p.place} charges a ${p.fee} joining fee and ${p.monthly} per month. How much does {p.name} pay "
        f"in total for the first {p.months} months?",
        f"{p.name} joins a {p.place} that costs ${p.monthly} a month plus a one-time fee of ${p.fee}. What "
        f"does {p.he} pay over {p.months} months?",
    ]
    lines = [
        f"The monthly payments add up to {fees.eq} dollars.",
        p.pick(f"With the joining fee, the total is {total.eq} dollars.", f"{p.He} pays {total.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "adults": r.randint(2, 4),
        "pa": r.randint(8, 16),
        "kids": r.randint(2, 5),
        "pc": r.randint(4, 9),
        "snack": r.randint(5, 20),
    }
)
def _t_movie_tickets(p: _P, c: _Calc):
    a = c(p.adults, "*", p.pa)
    k = c(p.kids, "*", p.pc)
    total = c(a, "+", k, "+", p.snack)
    qs = [
        f"{p.name} takes {p.his} family to the cinema: {p.adults} adult tickets at ${p.pa} each and {p.kids} "
        f"child tickets at ${p.pc} each. They also spend ${p.snack} on snacks. What does the trip cost?",
        f"Adult tickets cost ${p.pa} and child tickets ${p.pc}. {p.name} buys {p.adults} adult and {p.kids} "
        f"child tickets and ${p.snack} of popcorn. How much does {p.he} spend?",
    ]
    lines = [
        f"Adult tickets cost {a.eq} dollars.",
        f"Child tickets cost {k.eq} dollars.",
        p.pick(f"With snacks the total is {total.eq} dollars.", f"{p.He} spends {total.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "per": r.randint(2, 6),
        "trips": r.randint(3, 15),
        "mins": r.randint(3, 12),
    }
)
def _t_boxes_trips(p: _P, c: _Calc):
    boxes = p.per * p.trips
    trips = c(boxes, "/", p.per)
    mins = c(trips, "*", p.mins)
    qs = [
        f"{p.name} is moving {boxes} boxes to a new flat. {p.He} can carry {p.per} boxes per trip and each "
        f"trip takes {p.mins} minutes. How many minutes does it take to move all the boxes?",
        f"There are {boxes} boxes to carry downstairs. {p.name} carries {p.per} at a time, and one round "
        f"trip takes {p.mins} minutes. How long does the job take in minutes?",
    ]
    lines = [
        f"{p.He} needs {trips.eq} trips.",
        p.pick(f"That takes {mins.eq} minutes.", f"So the job takes {mins.eq} minutes."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_w(r),
        "start": r.randint(10, 50),
        "off1": r.randint(2, 12),
        "on1": r.randint(2, 15),
        "off2": r.randint(2, 12),
        "vehicle": r.choice(("bus", "tram", "train carriage", "ferry")),
    }
)
def _t_passengers(p: _P, c: _Calc):
    a = c(p.start, "-", p.off1)
    b = c(a, "+", p.on1)
    d = c(b, "-", p.off2)
    qs = [
        f"A {p.vehicle} starts with {p.start} passengers. At the first stop {p.off1} get off and {p.on1} get "
        f"on. At the second stop {p.off2} get off. How many passengers are on the {p.vehicle} now?",
        f"There are {p.start} people on a {p.vehicle}. {p.off1} leave and {p.on1} board at the first stop, "
        f"then {p.off2} leave at the next stop. How many people are left on board?",
    ]
    lines = [
        f"After {p.off1} get off there are {a.eq} passengers.",
        f"After {p.on1} get on there are {b.eq}.",
        p.pick(f"After the second stop there are {d.eq} passengers.", f"So {d.eq} people are on board."),
    ]
    return qs, lines


@_template(lambda r: {**_person(r), **_w(r), "q": r.randint(1, 5) * 20, "pct": r.choice(range(50, 100, 5))})
def _t_test_score(p: _P, c: _Calc):
    x = c(p.q, "*", p.pct)
    right = c(x, "/", 100)
    wrong = c(p.q, "-", right)
    qs = [
        f"A test has {p.q} questions. {p.name} answers {p.pct}% of them correctly. How many questions does "
        f"{p.he} get wrong?",
        f"{p.name} scored {p.pct}% on a {p.q}-question quiz. How many questions did {p.he} miss?",
    ]
    lines = [
        f"{p.pct}% of {p.q} is {x.eq} hundredths, so {right.eq} questions right.",
        p.pick(f"So {p.he} gets {wrong.eq} wrong.", f"{p.He} misses {wrong.eq} questions."),
    ]
    return qs, lines


_PACKS = ("yogurts", "batteries", "granola bars", "light bulbs", "tea bags", "sponges", "pencils")


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "thing": r.choice(_PACKS),
        "pack": r.choice((4, 5, 6, 8, 10, 12)),
        "unit": r.randint(2, 5),
        "want": r.randint(3, 30),
    }
)
def _t_unit_price(p: _P, c: _Calc):
    price = p.pack * p.unit
    one = c(price, "/", p.pack)
    cost = c(one, "*", p.want)
    qs = [
        f"A pack of {p.pack} {p.thing} costs ${price}. At the same price per item, how much would {p.want} "
        f"{p.thing} cost?",
        f"{p.name} sees {p.thing} sold {p.pack} for ${price}. How much should {p.he} expect to pay for "
        f"{p.want} of them at that rate?",
    ]
    lines = [
        f"One costs {one.eq} dollars.",
        p.pick(f"So {p.want} cost {cost.eq} dollars.", f"{p.want} of them cost {cost.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "allow": r.randint(8, 40),
        "spend": r.randint(2, 20),
        "weeks": r.randint(2, 10),
    }
)
def _t_allowance(p: _P, c: _Calc):
    save = c(p.allow, "-", p.spend)
    total = c(save, "*", p.weeks)
    qs = [
        f"{p.name} gets ${p.allow} of pocket money each week and spends ${p.spend} of it on snacks. How much "
        f"does {p.he} save in {p.weeks} weeks?",
        f"Every week {p.name} receives ${p.allow} and spends ${p.spend}. If {p.he} saves the rest, how much "
        f"has {p.he} saved after {p.weeks} weeks?",
    ]
    lines = [
        f"{p.He} saves {save.eq} dollars a week.",
        p.pick(f"In {p.weeks} weeks {p.he} saves {total.eq} dollars.", f"That is {total.eq} dollars."),
    ]
    return qs, lines


@_template(
    lambda r: {
        **_person(r),
        **_w(r),
        "shelves": r.randint(3, 9),
        "per": r.randint(12, 40),
        "sold": r.randint(5, 60),
        "thing": r.choice(("books", "jars of jam", "toys", "bottles of olive oil", "board games")),
    }
)
def _t_shop_stock(p: _P, c: _Calc):
    total = c(p.shelves, "*", p.per)
    left = c(total, "-", p.sold)
    qs = [
        f"{p.name}'s shop has {p.shelves} shelves with {p.per} {p.thing} on each. On Saturday {p.he} sells "
        f"{p.sold} {p.thing}. How many are left?",
        f"A store stocks {p.per} {p.thing} on each of its {p.shelves} shelves. After {p.sold} are sold, how "
        f"many {p.thing} remain?",
    ]
    lines = [
        f"There are {total.eq} {p.thing} at first.",
        p.pick(f"{left.eq} {p.thing} are left.", f"So {left.eq} remain."),
    ]
    return qs, lines


# --------------------------------------------------------------------------------------------------
# Off-topic Q&A (well-formed, factual, about as long as the math answers)

# One fact per line reads better here than the formatter's one string per line.
# fmt: off
_GEOGRAPHY = (  # (country, capital, where, fact)
    ("France", "Paris", "in Western Europe", "Paris sits on the river Seine and is home to the Louvre."),
    ("Japan", "Tokyo", "in East Asia", "Tokyo is one of the largest metropolitan areas in the world."),
    ("Canada", "Ottawa", "in North America", "Ottawa is in the province of Ontario, on the Ottawa River."),
    ("Australia", "Canberra", "in Oceania", "Canberra was built as a compromise between Sydney and Melbourne."),
    ("Brazil", "Brasília", "in South America", "Brasília was planned from scratch and became the capital in 1960."),
    ("Egypt", "Cairo", "in North Africa", "Cairo lies on the Nile, not far from the pyramids of Giza."),
    ("Kenya", "Nairobi", "in East Africa", "Nairobi has a national park right at the edge of the city."),
    ("Argentina", "Buenos Aires", "in South America", "Buenos Aires lies on the Río de la Plata estuary."),
    ("Peru", "Lima", "in South America", "Lima is on the Pacific coast and was founded in 1535."),
    ("Germany", "Berlin", "in Central Europe", "Berlin became the capital of reunified Germany in 1990."),
    ("Italy", "Rome", "in Southern Europe", "Rome surrounds Vatican City, which is an independent state."),
    ("Spain", "Madrid", "in Southern Europe", "Madrid sits near the centre of the Iberian Peninsula."),
    ("Norway", "Oslo", "in Northern Europe", "Oslo lies at the head of the Oslofjord."),
    ("Turkey", "Ankara", "mostly in Asia, with a small part in Europe", "Many people guess Istanbul, but Ankara has been the capital since 1923."),
    ("India", "New Delhi", "in South Asia", "New Delhi is part of the larger Delhi metropolitan area."),
    ("South Korea", "Seoul", "in East Asia", "Seoul lies on the Han River."),
    ("Vietnam", "Hanoi", "in Southeast Asia", "Hanoi is in the north of the country, on the Red River."),
    ("Mexico", "Mexico City", "in North America", "Mexico City was built on the site of the Aztec city of Tenochtitlan."),
    ("Chile", "Santiago", "in South America", "Santiago sits in a valley with the Andes to the east."),
    ("New Zealand", "Wellington", "in Oceania", "Wellington is at the southern tip of the North Island."),
    ("Morocco", "Rabat", "in North Africa", "Casablanca is larger, but the capital is Rabat."),
    ("Nigeria", "Abuja", "in West Africa", "Abuja replaced Lagos as the capital in 1991."),
    ("Switzerland", "Bern", "in Central Europe", "Swiss law calls Bern the federal city, and it is the seat of government."),
    ("Portugal", "Lisbon", "in Southern Europe", "Lisbon lies on the estuary of the river Tagus."),
    ("Poland", "Warsaw", "in Central Europe", "Warsaw lies on the Vistula, the longest river in Poland."),
    ("Thailand", "Bangkok", "in Southeast Asia", "Bangkok lies on the Chao Phraya river."),
    ("Ghana", "Accra", "in West Africa", "Accra is on the coast of the Gulf of Guinea."),
    ("Colombia", "Bogotá", "in South America", "Bogotá sits high in the Andes, at about 2,600 metres."),
    ("Ireland", "Dublin", "in Northern Europe", "Dublin is on the east coast, where the River Liffey meets the sea."),
    ("Hungary", "Budapest", "in Central Europe", "Budapest was formed in 1873 by uniting Buda, Óbuda and Pest."),
    ("Greece", "Athens", "in Southern Europe", "Athens is home to the Acropolis and the Parthenon."),
    ("Sweden", "Stockholm", "in Northern Europe", "Stockholm is spread across fourteen islands."),
)

_HISTORY = (  # (question tail, year, sentence, sentence)
    ("did the Berlin Wall fall", "1989", "The Berlin Wall fell on 9 November 1989, when East German authorities opened the border crossings.", "It became a symbol of the end of the Cold War in Europe."),
    ("did humans first land on the Moon", "1969", "Apollo 11 landed on 20 July 1969, and Neil Armstrong and Buzz Aldrin walked on the surface.", "Michael Collins stayed in orbit in the command module."),
    ("did the Titanic sink", "1912", "The Titanic sank in April 1912 after striking an iceberg on its first voyage.", "More than 1,500 people died, which led to new rules on lifeboats and radio watches."),
    ("did the Second World War end", "1945", "The war in Europe ended in May 1945, and Japan formally surrendered on 2 September 1945.", "The United Nations was founded the same year."),
    ("did the French Revolution begin", "1789", "It is usually dated to 1789, with the storming of the Bastille on 14 July.", "It ended the absolute monarchy and spread ideas of citizenship and rights across Europe."),
    ("did Columbus first reach the Americas", "1492", "Christopher Columbus reached the Caribbean in October 1492, landing in the Bahamas.", "His voyages began lasting contact between Europe and the Americas."),
    ("was the Magna Carta sealed", "1215", "King John of England sealed the Magna Carta at Runnymede in June 1215.", "It limited the king's power and is seen as an early step toward the rule of law."),
    ("did the Battle of Hastings take place", "1066", "The Battle of Hastings was fought in October 1066, when William of Normandy defeated King Harold II.", "It began the Norman conquest of England."),
    ("did the United States declare independence", "1776", "The Declaration of Independence was adopted on 4 July 1776.", "The war with Britain continued until 1783."),
    ("did the Wright brothers first fly", "1903", "Orville and Wilbur Wright made the first powered, controlled aeroplane flight on 17 December 1903.", "It took place near Kitty Hawk, North Carolina, and lasted about 12 seconds."),
    ("did the Soviet Union dissolve", "1991", "The Soviet Union formally dissolved in December 1991.", "Its fifteen republics became independent states."),
    ("did Nelson Mandela become president of South Africa", "1994", "Nelson Mandela became president in May 1994, after the country's first fully democratic election.", "He had spent 27 years in prison before his release in 1990."),
    ("did euro banknotes and coins enter circulation", "2002", "Euro notes and coins entered circulation on 1 January 2002.", "The euro had already existed for electronic payments since 1999."),
    ("were the first modern Olympic Games held", "1896", "The first modern Olympic Games were held in Athens in 1896.", "About 240 athletes from 14 nations took part."),
    ("did the Panama Canal open", "1914", "The Panama Canal opened in August 1914.", "It let ships travel between the Atlantic and the Pacific without sailing around South America."),
    ("did the American Civil War end", "1865", "The American Civil War ended in 1865, after the surrender at Appomattox in April.", "Slavery was abolished by the Thirteenth Amendment the same year."),
    ("did India gain independence", "1947", "India became independent from British rule on 15 August 1947.", "The partition that created Pakistan happened at the same time."),
    ("did the Chernobyl disaster happen", "1986", "The Chernobyl reactor explosion happened on 26 April 1986 in Soviet Ukraine.", "It is the worst nuclear power accident in history."),
    ("was Sputnik 1 launched", "1957", "The Soviet Union launched Sputnik 1 on 4 October 1957.", "It was the first artificial satellite and started the space race."),
    ("did the Great Fire of London happen", "1666", "The Great Fire of London broke out in September 1666 and burned for several days.", "It destroyed much of the medieval city, including old St Paul's Cathedral."),
    ("did the Western Roman Empire fall", "476", "The traditional date is 476, when the last western emperor, Romulus Augustulus, was deposed.", "The Eastern Roman Empire lasted until 1453."),
    ("did New Zealand give women the right to vote", "1893", "New Zealand gave women the vote in national elections in 1893.", "It was the first self-governing country to do so."),
    ("was the World Wide Web proposed", "1989", "Tim Berners-Lee proposed the World Wide Web at CERN in March 1989.", "The first website went online in 1991."),
    ("did the Meiji Restoration begin", "1868", "The Meiji Restoration began in 1868, returning power to the emperor in Japan.", "It started a period of rapid modernisation and industrialisation."),
)

# (question wordings, answer, key fact)
_QA: dict[str, tuple[tuple[tuple[str, ...], str, str], ...]] = {
    "cooking": (
        (("How long should I boil an egg for a soft yolk?", "What's the timing for a soft-boiled egg?"), "Lower the egg into water that is already boiling and cook it for about six minutes. Then move it to cold water for a minute so it stops cooking and is easier to peel. For a firmer yolk, go to eight or nine minutes.", "about 6 minutes"),
        (("How much water do I need to cook white rice?", "What is the water to rice ratio for long-grain rice?"), "For long-grain white rice on the stove, use about one and a half cups of water per cup of rice. Rinse the rice first, bring it to a boil, then cover and simmer on low for about 15 minutes. Let it rest covered for five minutes before fluffing.", "1.5 cups water per cup of rice"),
        (("Why should meat rest after cooking?", "Is it really necessary to let a steak rest?"), "Resting lets the juices, which are pushed toward the centre by the heat, spread back through the meat. If you cut it straight away, more juice runs onto the board. Five to ten minutes is enough for a steak, longer for a large roast.", "so the juices redistribute"),
        (("How do I keep guacamole from turning brown?", "What stops avocado dip from going brown?"), "Browning comes from air reacting with the avocado. Mix in lime or lemon juice, then press plastic wrap directly onto the surface so no air touches it. Stored like this in the fridge, it stays green for about a day.", "lime juice and no air contact"),
        (("How do I caramelize onions?", "What is the trick to properly caramelized onions?"), "Slice the onions thinly and cook them in butter or oil over medium-low heat, stirring now and then. Real caramelization takes 30 to 45 minutes; high heat only burns the outside. A splash of water helps lift the brown bits from the pan.", "low heat for 30 to 45 minutes"),
        (("What is the difference between baking soda and baking powder?", "Can I swap baking powder for baking soda?"), "Baking soda is pure sodium bicarbonate and needs an acid in the recipe, such as buttermilk or yoghurt, to make it rise. Baking powder already contains an acid, so it works on its own. They are not directly interchangeable without adjusting the recipe.", "baking powder already contains the acid"),
        (("How can I tell when pasta is done?", "How do I know my spaghetti is cooked al dente?"), "Start tasting a minute or two before the time on the packet. Al dente pasta is tender but still slightly firm in the centre when you bite it. Save a cup of the cooking water before draining; it helps the sauce cling.", "taste it for a firm bite"),
        (("How do I make a basic vinaigrette?", "What's a simple salad dressing recipe?"), "A classic vinaigrette is about three parts oil to one part vinegar. Whisk the vinegar with a pinch of salt and a little mustard, then slowly whisk in the oil so it emulsifies. Taste it on a leaf of lettuce and adjust.", "3 parts oil to 1 part vinegar"),
        (("Why does bread dough need kneading?", "What does kneading actually do to dough?"), "Kneading develops gluten, the network of proteins that traps gas from the yeast. That network is what lets the bread rise and gives it a chewy structure. Dough is ready when it is smooth and stretches thin without tearing.", "it develops gluten"),
        (("Can I freeze cooked rice?", "Is it safe to keep leftover rice in the freezer?"), "Yes. Cool the rice quickly, within an hour, then pack it flat in bags and freeze it. It keeps well for about a month. Reheat it until it is steaming hot all the way through, and only reheat it once.", "yes, cool it quickly first"),
        (("What temperature is a medium-rare steak?", "How hot should the inside of a medium-rare steak be?"), "A medium-rare steak is about 57 °C, or 135 °F, in the centre. Take it off the heat a few degrees early, because the temperature keeps rising while it rests. An instant-read thermometer is the easiest way to check.", "about 57 °C"),
        (("How do I blanch vegetables?", "What does blanching green beans involve?"), "Drop the vegetables into a large pot of salted boiling water for one to three minutes, then move them straight into ice water. This sets the colour and stops the cooking. Blanching is also the usual step before freezing vegetables.", "boil briefly, then ice water"),
        (("What is a roux?", "How do I make a roux for a sauce?"), "A roux is equal parts fat and flour cooked together and used to thicken sauces. Melt the butter, stir in the flour and cook it for a few minutes so it loses its raw taste. Whisk in warm liquid gradually to avoid lumps.", "equal parts fat and flour"),
        (("How do I stop onions from making me cry?", "Why do onions make your eyes water?"), "Cutting an onion releases a compound that irritates the eyes. A very sharp knife crushes fewer cells, and chilling the onion for fifteen minutes slows the reaction. Cutting the root end last also helps.", "a sharp knife and a cold onion"),
    ),
    "programming": (
        (("What does len() do in Python?", "How do I get the number of items in a Python list?"), "The built-in len() returns the number of items in a container: the elements of a list or tuple, the characters of a string, or the keys of a dictionary. For example, len([3, 1, 4]) is 3. It runs in constant time for built-in types.", "returns the number of items"),
        (("What is the difference between a list and a tuple in Python?", "When should I use a tuple instead of a list?"), "A list is mutable: you can add, remove and change its elements. A tuple is immutable once created. Tuples can be used as dictionary keys and signal that the data should not change, while lists suit collections that grow or shrink.", "lists are mutable, tuples are not"),
        (("What does git commit do?", "What happens when I run git commit?"), "git commit records a snapshot of the changes you have staged with git add, together with a message, your name and a timestamp. The commit becomes part of the current branch's history. Nothing is sent to a remote until you push.", "records staged changes as a snapshot"),
        (("What is the difference between == and is in Python?", "Should I use is or == to compare values in Python?"), "== compares values, while is checks whether two names refer to the very same object. Two separate lists with equal contents are == but not is. Use is mainly for comparisons with None.", "value equality versus object identity"),
        (("What does HTTP status code 404 mean?", "Why do websites show a 404 error?"), "404 Not Found means the server was reached but has nothing at the requested address. The link may be mistyped, or the page may have been moved or deleted. It differs from 500, which means the server itself failed.", "the resource was not found"),
        (("What is recursion in programming?", "Can you explain recursion simply?"), "Recursion is when a function calls itself on a smaller version of the same problem. It needs a base case that stops the calls, or it runs forever. Computing a factorial as n times the factorial of n minus 1 is a classic example.", "a function calling itself"),
        (("What does GROUP BY do in SQL?", "How does GROUP BY work in a SQL query?"), "GROUP BY collects rows that share the same values in the listed columns into groups. Aggregate functions such as COUNT, SUM or AVG are then computed once per group. HAVING filters the groups after they are formed.", "groups rows for aggregates"),
        (("What is a dictionary in Python?", "How do Python dictionaries work?"), "A dictionary maps keys to values, like a phone book maps names to numbers. Keys must be hashable, such as strings or numbers, and lookups are fast on average. Since Python 3.7, dictionaries keep insertion order.", "a mapping from keys to values"),
        (("What does chmod +x do?", "Why do I need chmod +x before running a script?"), "chmod +x adds execute permission to a file on Unix-like systems. Without it, the shell refuses to run a script directly with ./script.sh. You can still run it by passing it to an interpreter, as in bash script.sh.", "makes a file executable"),
        (("What is Big-O notation?", "What does O(n) mean?"), "Big-O notation describes how the running time or memory of an algorithm grows as the input gets larger. O(n) means it grows in proportion to the input size, while O(1) means it stays constant. It ignores constant factors.", "how cost grows with input size"),
        (("What is JSON?", "What is a JSON file used for?"), "JSON is a plain-text format for structured data, built from objects of key-value pairs, arrays, strings, numbers, booleans and null. It is easy for people to read and for programs to parse, which is why most web APIs use it.", "a text format for structured data"),
        (("What does the return statement do?", "What is the difference between print and return in a function?"), "return ends a function and hands a value back to the code that called it, which can store or use it. print only shows text on the screen. A Python function without return gives back None.", "hands a value back to the caller"),
        (("What is a race condition?", "Why are race conditions hard to debug?"), "A race condition happens when the result depends on the timing of threads or processes that share data. Two threads that both read, increment and write a counter can lose an update. Locks or atomic operations prevent it.", "timing-dependent bugs on shared data"),
        (("What is the difference between a compiler and an interpreter?", "Is Python compiled or interpreted?"), "A compiler translates a whole program into another form, often machine code, before it runs. An interpreter executes the program step by step. Python compiles source to bytecode, which its virtual machine then interprets.", "translate ahead versus execute directly"),
    ),
    "science": (
        (("Why is the sky blue?", "What makes the daytime sky look blue?"), "Sunlight contains all colours, and air molecules scatter short blue wavelengths much more strongly than red ones. This is called Rayleigh scattering. The scattered blue light reaches our eyes from every direction, so the whole sky looks blue.", "Rayleigh scattering"),
        (("What is photosynthesis?", "How do plants make their food?"), "Photosynthesis is how plants, algae and some bacteria turn light into chemical energy. Using chlorophyll, they combine carbon dioxide and water to make glucose, and release oxygen as a by-product. It happens mainly in the leaves.", "light energy into sugar"),
        (("Why do we have seasons?", "What causes summer and winter?"), "Seasons come from the tilt of the Earth's axis, about 23.5 degrees. For part of the year one hemisphere leans toward the Sun and gets longer days and more direct sunlight. It is not caused by the distance to the Sun.", "the tilt of Earth's axis"),
        (("What is the boiling point of water?", "At what temperature does water boil?"), "At sea level, pure water boils at 100 °C, or 212 °F. At higher altitudes the air pressure is lower, so water boils at a lower temperature, which is why cooking takes longer in the mountains.", "100 °C at sea level"),
        (("How far is the Earth from the Sun?", "What is the distance between the Earth and the Sun?"), "On average the Earth is about 150 million kilometres from the Sun, a distance called one astronomical unit. Sunlight takes a little over eight minutes to cover it. The distance varies slightly during the year because the orbit is an ellipse.", "about 150 million km"),
        (("What causes ocean tides?", "Why does the sea level rise and fall every day?"), "Tides are caused mainly by the Moon's gravity pulling on the oceans, with a smaller effect from the Sun. Water bulges on the side facing the Moon and on the opposite side, so most coasts get two high tides a day.", "mainly the Moon's gravity"),
        (("What is DNA?", "What does DNA do in the body?"), "DNA is the molecule that carries genetic instructions in living things. It is a double helix made of four bases, A, T, C and G, whose order encodes how to build proteins. Almost every cell in your body has a full copy.", "the molecule carrying genetic instructions"),
        (("Why does ice float on water?", "Why is ice lighter than liquid water?"), "When water freezes, its molecules lock into a hexagonal pattern held by hydrogen bonds that spaces them further apart. That makes ice about nine percent less dense than liquid water, so it floats. This keeps lakes from freezing solid from the bottom up.", "ice is less dense than water"),
        (("How many bones are in the adult human body?", "How many bones does a grown-up have?"), "An adult human skeleton usually has 206 bones. Babies are born with more, around 270, but many fuse together as they grow, for example in the skull and the base of the spine.", "206"),
        (("How fast does light travel?", "What is the speed of light?"), "In a vacuum, light travels at about 300,000 kilometres per second, exactly 299,792,458 metres per second. Nothing with mass can reach that speed. Light from the Moon reaches us in just over a second.", "about 300,000 km per second"),
        (("What is an atom made of?", "What are the parts of an atom?"), "An atom has a tiny nucleus of protons and neutrons, surrounded by electrons. Protons carry a positive charge, electrons a negative one and neutrons none. The number of protons decides which element the atom is.", "protons, neutrons and electrons"),
        (("Why do leaves change colour in autumn?", "Where do the red and yellow colours of autumn leaves come from?"), "In autumn, trees stop making chlorophyll, the green pigment. As it breaks down, yellow and orange pigments that were there all along become visible. Some trees also make new red pigments in the shorter, cooler days.", "chlorophyll breaks down"),
        (("What is the largest planet in the solar system?", "Which planet is the biggest?"), "Jupiter is the largest planet in the solar system. It is a gas giant about eleven times wider than Earth, and its Great Red Spot is a storm bigger than our planet that has lasted for centuries.", "Jupiter"),
        (("What is the difference between weather and climate?", "Is climate the same thing as weather?"), "Weather is the state of the atmosphere over hours or days: rain, wind, temperature. Climate is the average pattern of weather in a place over many years, usually thirty or more. A cold week does not change the climate.", "short-term conditions versus long-term averages"),
    ),
}
# fmt: on

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
