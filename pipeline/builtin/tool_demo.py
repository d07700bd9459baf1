"""A small deterministic tool-use dataset (``builtin:tool_calls``) for TL-Training's key-token policy.

Each row is a chat (``messages``) in TL-Training's layout (ALGORITHMS_TRAINING.md §2): a system turn with
the offered functions rendered as Python ``def`` stubs, a user request, assistant turns that call a tool
as ``name(arg='v', ...)``, ``tool`` turns with the function's output, and a final assistant answer in
words. Twelve tools in four families share name prefixes (``get_weather`` / ``get_weather_forecast`` /
``get_time`` / ``get_timezone``, ``search_``, ``send_``, ``convert_``) and every sample offers the called
tool beside two to four others, at least one from its family, so the first token where the called name
diverges from another offered name is a real decision.

Kinds (per sample, drawn): ``one_call`` (60%), ``two_calls`` (20%: a second tool after the first output)
and ``error_retry`` (20%: the first call fails and the assistant retries; the failure is one of TL-Training's
error messages: an unexpected keyword argument, a name that is not defined, or a JSON ``"error":`` body).
Ground truth is kept as meta columns: ``tools`` (offered names, in the system turn's order), ``calls``
(per assistant turn: the called name, ``""`` for the answer), ``errors`` (per assistant turn: whether the
tool output after it is an error) and ``kind``.

Deterministic: each sample draws from its own ``random.Random(f"{seed}/{i}")`` (string seeds: stable across
Python versions and processes). ``TOOL_DEMO_SIZE = 120`` samples, ~0.01 s to generate.
"""

from __future__ import annotations

import hashlib
import json
import random

from winnow.pipeline.builtin.demo_data import cache_dir

TOOL_DEMO_SIZE = 120
TOOL_DEMO_SEED = 20261208
GENERATOR_VERSION = "2"  # 2: a two-call request asks for both calls

CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Quito", "Hanoi", "Porto", "Cairo", "Perth"]
ZONES = ["UTC", "CET", "JST", "PST", "EST"]
# name -> (signature, docstring, argument drawers, output, the answer in words)
TOOLS: dict[str, tuple[str, str, dict, str, str]] = {
    "get_weather": ("city: str", "Current weather in a city.", {"city": CITIES},
                    '{{"temp_c": {n}}}', "It is {n} degrees in {city}."),
    "get_weather_forecast": ("city: str, days: int", "Forecast for the next days.",
                             {"city": CITIES, "days": [2, 3, 5]}, '{{"max_c": {n}}}',
                             "The maximum over the next {days} days in {city} is {n} degrees."),
    "get_time": ("zone: str", "Current time in a time zone.", {"zone": ZONES}, '"{n}:15"',
                 "It is {n}:15 in {zone}."),
    "get_timezone": ("city: str", "Time zone of a city.", {"city": CITIES}, '"UTC+{n}"',
                     "{city} is in UTC+{n}."),
    "search_flights": ("origin: str, destination: str", "Flights between two cities.",
                       {"origin": CITIES[:5], "destination": CITIES[5:]}, '{{"flights": {n}}}',
                       "There are {n} flights from {origin} to {destination}."),
    "search_hotels": ("city: str, nights: int", "Hotels with free rooms.", {"city": CITIES, "nights": [1, 2, 4]},
                      '{{"hotels": {n}}}', "{n} hotels in {city} have rooms for {nights} nights."),
    "send_email": ("to: str, subject: str", "Send an email.", {"to": ["ana@example.org", "li@example.org"],
                   "subject": ["Invoice", "Meeting", "Trip"]}, '{{"sent": true}}', "The email to {to} is sent."),
    "send_sms": ("number: str, text: str", "Send a text message.", {"number": ["+33 6 12", "+81 90 55"],
                 "text": ["Running late", "Call me"]}, '{{"sent": true}}', "The message to {number} is sent."),
    "convert_currency": ("amount: int, source: str, target: str", "Convert money.",
                         {"amount": [20, 75, 300], "source": ["EUR", "USD"], "target": ["JPY", "GBP"]},
                         '{{"result": {n}}}', "{amount} {source} is {n} {target}."),
    "convert_units": ("value: int, unit: str, target: str", "Convert a measure.",
                      {"value": [3, 12, 40], "unit": ["km", "kg"], "target": ["miles", "pounds"]},
                      '{{"result": {n}}}', "{value} {unit} is {n} {target}."),
    "book_table": ("restaurant: str, people: int", "Book a restaurant table.",
                   {"restaurant": ["Chez Lou", "Koi"], "people": [2, 4]}, '{{"booked": true}}',
                   "Your table for {people} at {restaurant} is booked."),
    "translate_text": ("text: str, target: str", "Translate a text.", {"text": ["good morning", "thank you"],
                       "target": ["French", "Swahili"]}, '"done ({n} words)"', "The translation into {target} is done."),
}  # fmt: skip
REQUESTS = ["Please use {name_words} with {args_words}.", "Can you run {name_words}? {args_words}.",
            "I need {name_words} for {args_words}."]  # fmt: skip


def _family(name: str) -> str:
    return name.split("_")[0]


def _offered(gold: list[str], r: random.Random) -> list[str]:
    """The called tools, one or two others of their family, and up to two from elsewhere, shuffled."""
    kin = sorted({t for t in TOOLS if _family(t) in {_family(g) for g in gold}} - set(gold))
    others = sorted(set(TOOLS) - set(gold) - set(kin))
    names = gold + r.sample(kin, min(len(kin), r.randint(1, 2))) + r.sample(others, r.randint(1, 2))
    r.shuffle(names)
    return names


def _call(name: str, args: dict) -> str:
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


def _turns(name: str, r: random.Random) -> tuple[dict, str, str]:
    """Arguments, the tool's output and the answer in words for one call of ``name``."""
    _, _, drawers, output, answer = TOOLS[name]
    args = {k: r.choice(v) for k, v in drawers.items()}
    n = r.randint(2, 40)
    return args, output.format(n=n, **args), answer.format(n=n, **args)


def _error(name: str, args: dict, r: random.Random) -> tuple[str, str]:
    """A failed first call and its error message (three of TL-Training's error strings)."""
    kind = r.choice(["keyword", "name", "json"])
    if kind == "keyword":
        key = next(iter(args))
        bad = {f"{key}_name": args[key], **{k: v for k, v in args.items() if k != key}}
        return _call(name, bad), f"TypeError: {name}() got an unexpected keyword argument '{key}_name'"
    if kind == "name":
        typo = name.replace("_", "", 1)
        return _call(typo, args), f"NameError: name '{typo}' is not defined"
    return _call(name, args), '{"error": "connection error, try again"}'


def _sample(i: int, seed: int) -> dict:
    r = random.Random(f"{seed}/{i}")
    kind = r.choices(["one_call", "two_calls", "error_retry"], [0.6, 0.2, 0.2])[0]
    gold = r.sample(sorted(TOOLS), 2 if kind == "two_calls" else 1)
    offered = _offered(gold, r)
    stubs = [f'def {t}({TOOLS[t][0]}):\n    """{TOOLS[t][1]}"""' for t in offered]
    msgs = [{"role": "system", "content": "You can call these functions:\n\n" + "\n\n".join(stubs)}]
    drawn = [_turns(name, r) for name in gold]  # (arguments, output, answer) per call
    asks = [
        r.choice(REQUESTS).format(
            name_words=name.replace("_", " "), args_words=", ".join(f"{k} {v}" for k, v in args.items())
        )
        for name, (args, _, _) in zip(gold, drawn, strict=True)
    ]
    msgs.append({"role": "user", "content": " Then: ".join(asks)})
    calls, errors = [], []
    if kind == "error_retry":
        bad_call, message = _error(gold[0], drawn[0][0], r)
        msgs += [{"role": "assistant", "content": bad_call}, {"role": "tool", "content": message}]
        calls.append(bad_call.split("(")[0]), errors.append(True)
    for name, (args, output, _) in zip(gold, drawn, strict=True):
        msgs += [{"role": "assistant", "content": _call(name, args)}, {"role": "tool", "content": output}]
        calls.append(name), errors.append(False)
    answers = [answer for _, _, answer in drawn]
    msgs.append({"role": "assistant", "content": " ".join(answers)})
    calls.append(""), errors.append(False)
    return {"messages": msgs, "tools": offered, "calls": calls, "errors": errors, "kind": kind}


def generate_tool_demo(n: int = TOOL_DEMO_SIZE, seed: int = TOOL_DEMO_SEED) -> list[dict]:
    return [_sample(i, seed) for i in range(n)]


def tool_demo_path(n: int = TOOL_DEMO_SIZE, seed: int = TOOL_DEMO_SEED):
    """The tool-call demo as JSONL in the cache dir, written on first use (the name carries a hash of
    the generator version, n and seed; written to a temp file and renamed, so concurrent calls are safe)."""
    import os
    import tempfile
    from pathlib import Path

    h = hashlib.sha256(f"tools/{GENERATOR_VERSION}/{n}/{seed}".encode()).hexdigest()[:12]
    path = cache_dir() / f"tool-calls-n{n}-s{seed}-{h}.jsonl"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in generate_tool_demo(n, seed))
        Path(tmp).replace(path)
    return path
