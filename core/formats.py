"""Record formats: turn one input record into chat ``messages`` plus the fields it did not use.

Formats (auto-detected per file from its first parseable record, or forced with ``format=``):

| format          | fields                                   | becomes                                   |
|-----------------|------------------------------------------|-------------------------------------------|
| chat            | messages: [{role, content}, ...]         | as is (other message keys dropped)        |
| sharegpt        | conversations: [{from, value}, ...]      | human->user, gpt->assistant, system       |
| prompt_response | prompt, response (optional system)       | [system], user, assistant                 |
| alpaca          | instruction, input (optional), output    | user = instruction + "\\n\\n" + input     |
| gsm8k           | question, answer                         | user = question, assistant = answer       |
| text            | text                                     | one assistant turn (all tokens trained)   |

Every other field of the record is returned as metadata and lands in a ``meta_<name>`` column.
No record can raise anything but :class:`RecordError`: content that cannot be used (text that is not
valid Unicode, e.g. a lone surrogate escape ``"\\ud800"``; a role that is not a string; nesting deeper
than ``MAX_DEPTH``) is a reject with a reason code (``bad_text``, ``bad_role``, ``too_deep``), while a
value that only a meta field holds (an integer beyond int64, a string with a lone surrogate) keeps the
sample and makes that column JSON text, like any column of mixed types.
Content is Unicode-NFC-normalised and stripped of outer whitespace; that normalised form is both
what ``sample_id`` hashes and what gets rendered (ARCHITECTURE.md "sample_id").
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

from winnow.core.errors import RejectError

FORMATS = ("chat", "sharegpt", "prompt_response", "alpaca", "gsm8k", "text")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}

# fields each format consumes (detection order matters: most specific first)
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # format: (required, optional)
    "chat": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_response": (("prompt", "response"), ("system",)),
    "gsm8k": (("question", "answer"), ()),
    "text": (("text",), ()),
}


MAX_DEPTH = 64  # nesting of lists/objects in one record; deeper is rejected as too_deep
_INT64 = (-(2**63), 2**63 - 1)
RecordError = RejectError  # a record that is not a conversation: the reason code of its reject row


def detect_format(record: dict[str, Any]) -> str | None:
    for fmt, (required, _) in _FIELDS.items():
        if all(k in record for k in required):
            return fmt
    return None


def normalize(text: str, where: str = "text") -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(
            "bad_text", f"{where}: not valid Unicode at character {e.start} (a lone surrogate escape)"
        ) from None
    return unicodedata.normalize("NFC", text).strip()


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Depth of nested lists/dicts, counted without recursion and capped at ``limit + 1``."""
    depth, level = 0, [value]
    while level and depth <= limit:
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, (list, tuple)):
                nxt.extend(v)
        if not nxt:
            break
        depth += 1
        level = nxt
    return depth


def safe_json(value: Any, limit: int | None = None) -> str:
    """JSON text of any record value, valid UTF-8 (lone surrogates escaped), never an exception."""
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, sort_keys=True, default=str)
    except (RecursionError, ValueError, TypeError) as e:
        text = f"<unprintable value: {type(e).__name__}>"
    return text[:limit] if limit else text


def _text_field(record: dict[str, Any], key: str, optional: bool = False) -> str | None:
    if key not in record or record[key] is None:
        if optional:
            return None
        raise RecordError("missing_field", f"field {key!r} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError("bad_field_type", f"field {key!r} is a {type(value).__name__}, expected a string")
    return normalize(value, f"field {key!r}")


def _message_list(value: Any, key: str, role_key: str, content_key: str, role_map: dict[str, str] | None):
    if not isinstance(value, list) or not value:
        raise RecordError(
            "missing_field" if not value else "bad_field_type",
            f"field {key!r} must be a non-empty list of messages",
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError("bad_field_type", f"{key}[{j}] is a {type(m).__name__}, expected an object")
        if role_key not in m:
            raise RecordError("missing_field", f"{key}[{j}] has no {role_key!r}")
        if content_key not in m or m[content_key] is None:
            raise RecordError("missing_field", f"{key}[{j}] has no {content_key!r}")
        role = m[role_key]
        if not isinstance(role, str):
            raise RecordError(
                "bad_role", f"{key}[{j}].{role_key} is a {type(role).__name__}, expected a string"
            )
        if role_map is not None:
            role = role_map.get(role, role)
        if role not in ROLES:
            raise RecordError(
                "bad_role", f"{key}[{j}] has role {m[role_key]!r}; expected one of {list(ROLES)}"
            )
        content = m[content_key]
        if not isinstance(content, str):
            raise RecordError("bad_field_type", f"{key}[{j}].{content_key} is a {type(content).__name__}")
        out.append({"role": role, "content": normalize(content, f"{key}[{j}].{content_key}")})
    return out


def to_messages(record: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Convert a record to normalised messages and its leftover fields (future meta_ columns)."""
    if nesting_depth(record) > MAX_DEPTH:
        raise RecordError("too_deep", f"the record nests lists/objects deeper than {MAX_DEPTH} levels")
    required, optional = _FIELDS[fmt]
    used = set(required) | set(optional)
    if fmt == "chat":
        msgs = _message_list(record.get("messages"), "messages", "role", "content", None)
    elif fmt == "sharegpt":
        msgs = _message_list(record.get("conversations"), "conversations", "from", "value", _SHAREGPT_ROLES)
    elif fmt == "prompt_response":
        system = _text_field(record, "system", optional=True)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": _text_field(record, "prompt")},
            {"role": "assistant", "content": _text_field(record, "response")},
        ]
    elif fmt == "alpaca":
        system = _text_field(record, "system", optional=True)
        instruction = _text_field(record, "instruction")
        extra = _text_field(record, "input", optional=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text_field(record, "output")},
        ]
    elif fmt == "gsm8k":
        msgs = [
            {"role": "user", "content": _text_field(record, "question")},
            {"role": "assistant", "content": _text_field(record, "answer")},
        ]
    elif fmt == "text":
        msgs = [{"role": "assistant", "content": _text_field(record, "text")}]
    else:  # pragma: no cover - guarded by the params dataclass
        raise ValueError(fmt)
    assistant = [m for m in msgs if m["role"] == "assistant"]
    if not assistant:
        raise RecordError("no_assistant_turn", "no assistant message: nothing to train on")
    if any(not m["content"] for m in assistant):
        raise RecordError("empty_response", "an assistant message is empty after stripping whitespace")
    if any(not m["content"] for m in msgs if m["role"] == "user"):
        raise RecordError("empty_prompt", "a user message is empty after stripping whitespace")
    meta = {k: v for k, v in record.items() if k not in used}
    return msgs, meta


def canonical_messages(messages: list[dict[str, str]]) -> str:
    return json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def sample_id(messages: list[dict[str, str]]) -> str:
    """First 16 hex digits of sha256 over the canonical JSON of the normalised messages."""
    return hashlib.sha256(canonical_messages(messages).encode("utf-8")).hexdigest()[:16]


# ---- meta_ column typing -------------------------------------------------------------------


def value_kind(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int" if _INT64[0] <= v <= _INT64[1] else "json"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "json"  # a lone surrogate: kept as escaped JSON text
        return "str"
    return "json"


def unique_meta_names(keys: list[str]) -> dict[str, str]:
    """Column name (without ``meta_``) for each meta key, unique case-insensitively: DuckDB
    identifiers ignore case, so ``Foo`` and ``foo`` would be one column there. Later keys (in sorted
    order) get ``__2``, ``__3``, ...; the mapping is recorded in the manifest."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for k in sorted(keys):
        base = k if _encodes(k) else safe_json(k)[1:-1]
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}__{n}"
        taken.add(name.lower())
        out[k] = name
    return out


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def merge_kinds(kinds: set[str]) -> str:
    """One type per meta column: bool, int64, float64, string; anything mixed or nested is JSON text."""
    if not kinds:
        return "str"
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {"int", "float"}:
        return "float"
    return "json"


def coerce_meta(v: Any, kind: str) -> Any:
    if v is None:
        return None
    if kind == "json":
        return safe_json(v)
    if kind == "float":
        return float(v)
    return v
