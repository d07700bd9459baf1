"""TL-Training's key-token weights and error filter (Ye et al., arXiv 2412.15495; ALGORITHMS_TRAINING.md §2)
as a user policy: ``winnow select RUN python:winnow.stages.policies.tool_call_keys:policy``.

Data: tool-use chats whose system turn offers functions as Python stubs (``def name(...)``), whose
assistant turns call one as ``name(arg='v', ...)`` (the call opens the reply) and whose ``tool`` turns hold
the outputs (``winnow ingest builtin:tool_calls`` is such a set). Per assistant turn (a *reply*):

* ``R``: the reply's supervised tokens (its content and the end-of-turn token that closes it).
* ``P``, the key tokens of a call: the token holding the called name's first character, plus, for every
  other offered tool whose name shares a non-empty prefix with it, the token holding the first character
  where the two names differ (when the called name is a prefix of the other, the character just after
  it, the ``(`` that ends the name). Located by character spans (the samples' ``offsets``, the tokenizer's
  own), so the rule does not depend on how a tokenizer cuts names; the authors compare LLaMA pieces.
* ``A``, closing tokens: tokens of ``R \\ P`` whose text, whitespace stripped, is made of ``'"().,`` only
  and holds a ``)`` or a ``,`` (the authors' list: ``',``, ``')``, ``)``, ``()``, ``")``, ``.")``, ...);
  when a reply has none, the token before its last one (the code's ``len - 3`` default).
* ``O = R \\ (P ∪ A)``; ``w = min(|O| / |P|, 9)`` if ``|P| < |O|`` else 1. Key tokens weigh ``w``, every
  other token of ``R`` weighs 1 (``A`` is bookkept but not re-weighted in the released code).

A reply that does not open with a call (the final answer in words) has no key tokens: weight 1 on
``R``. Worked example (tests): 12 supervised tokens, ``|P| = 1``, ``|A| = 2``, so ``|O| = 9``, ``w = 9``,
and the key token carries 9 of the 20 units of weight, a share of 0.45.

**Normalisation.** winnow's trainer minimises ``Σ w·ℓ / Σ w`` over each optimizer step. With one sample
per step (``tokens_per_batch`` below two samples, ``grad_accum = 1``) and one target reply per sample,
this is the authors' loss ``(w Σ_P ℓ + Σ_A ℓ + Σ_O ℓ) / (w|P| + |A| + |O|)`` exactly (their code runs batch
size 1); with several replies in a sample or samples in a step it is their token-weighted pooling rather
than a mean of per-reply losses.

**Error filter (MAE), a sample rule.** A reply is a target only when the turn after it is a ``tool``
output that holds none of the authors' 14 error strings (compared after keeping only letters, digits
and CJK characters, lower-cased; ``"error":`` and ``'error'`` reduce to ``error``, so any output mentioning
an error counts), or when it is the last turn. The authors split each target turn into a sample of its
own with its history; here the sample stays whole and a non-target reply gets weight 0, which is the same
set of targets with the same contexts. Following their code (``mae.py``), a reply followed by a user turn
is not a target either. Reasons: ``key_tokens`` (a call reply is weighted), ``no_call`` (targets, none a
call), dropped ``tool_error`` (every reply is followed by an error) or ``no_target``. The filter alone,
weight 1 on every target token (the paper's MAE without key tokens), is
``python:winnow.stages.policies.tool_call_keys:error_filter``.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right

import numpy as np

MAX_WEIGHT = 9.0  # finetune.sh's max_weight
ERROR_STRINGS = (  # mae.py's error_calling list
    "is not defined", "positional argument", "unexpected keyword", "'related_searches'", "ConnectionError",
    '"error":', "not supported", "Invalid API call", "Response error",
    "Object of type SerpResults is not JSON serializable", "400 Client Error", "'error'",
    "slice indices must be integers or None or have an __index__ method", "connection error",
)  # fmt: skip
_KEEP_CHARS = re.compile(r"[^\u4e00-\u9fa5a-zA-Z0-9]")
_STUB = re.compile(r"\bdef\s+([A-Za-z_]\w*)\s*\(")
_CALL = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")
_CLOSING = set("'\"().,")


def _squash(text: str) -> str:
    return _KEEP_CHARS.sub("", text).lower()


_ERRORS = tuple(_squash(e) for e in ERROR_STRINGS)


def is_tool_error(output: str) -> bool:
    """True when a tool's output holds one of TL-Training's error strings (mae.py's comparison)."""
    squashed = _squash(output)
    return any(e in squashed for e in _ERRORS)


def offered_tools(system: str) -> list[str]:
    """The function names a system turn offers as ``def name(`` stubs, in order."""
    return _STUB.findall(system)


def key_chars(content: str, offered: list[str]) -> list[int]:
    """Character positions (in ``content``) of the key tokens of a reply that opens with a call: the
    called name's first character and, per other offered name sharing a prefix, where the two differ."""
    m = _CALL.match(content)
    if m is None:
        return []
    gold, start = m.group(1), m.start(1)
    out = [start]
    for other in offered:
        if other == gold:
            continue
        common = next((i for i, (a, b) in enumerate(zip(gold, other, strict=False)) if a != b), None)
        common = min(len(gold), len(other)) if common is None else common
        if common > 0:
            out.append(start + common)  # common == len(gold): the character after the name
    return out


def _spans(text: str, messages: list[dict]) -> list[int]:
    """Each message's content start in the render (a forward scan: each after the previous one)."""
    starts, pos = [], 0
    for m in messages:
        at = text.find(m["content"], pos)
        starts.append(at)
        pos = at + len(m["content"]) if at >= 0 else pos
    return starts


def _target(messages: list[dict], k: int) -> tuple[bool, bool]:
    """(is reply ``k`` a target, is it followed by a tool error) under mae.py's rule."""
    if k == len(messages) - 1:
        return True, False
    nxt = messages[k + 1]
    if nxt["role"] != "tool":
        return False, False
    error = is_tool_error(nxt["content"])
    return not error, error


def reply_parts(
    content: str, offered: list[str], text: str, starts: list[int], reply: list[int], at: int
) -> tuple[set[int], list[int], float]:
    """(P, A, w) of the reply tokens ``reply`` (indices, in order) of a reply whose content starts at
    character ``at`` of ``text`` (``starts``: each token's first character); no key tokens: w = 1."""
    ends = [*starts[1:], len(text)]
    keys = {bisect_right(starts, at + c) - 1 for c in key_chars(content, offered)} & set(reply)
    if not keys:
        return keys, [], 1.0
    closing = [
        i
        for i in reply
        if i not in keys
        and (t := text[starts[i] : ends[i]].strip())
        and set(t) <= _CLOSING
        and set(t) & {")", ","}
    ]
    if not closing and len(reply) >= 2 and reply[-2] not in keys:
        closing = [reply[-2]]
    others = len(reply) - len(keys) - len(closing)
    return keys, closing, min(others / len(keys), MAX_WEIGHT) if len(keys) < others else 1.0


def sample_weights(
    text: str, offsets, loss_mask, messages: list[dict], replies: list[dict] | None = None
) -> tuple[np.ndarray, str]:
    """One sample's token weights and reason (the module docstring's rule). ``replies``, when given, gets
    one record per assistant turn: ``error`` (followed by a tool error), ``target``, ``R``, ``P``, ``A``, ``w``
    (what benchmarks/tool_call_keys.py reports)."""
    starts, mask = [int(x) for x in offsets], np.asarray(loss_mask) > 0
    weights = np.zeros(len(starts), np.float32)
    msg_at = _spans(text, messages)
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    offered, ends = offered_tools(system), [*starts[1:], len(text)]
    n_calls = n_targets = n_errors = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or msg_at[k] < 0:
            continue
        target, error = _target(messages, k)
        n_errors += error
        limit = next((a for a in msg_at[k + 1 :] if a >= 0), len(text))
        reply = [i for i in np.flatnonzero(mask).tolist() if ends[i] > msg_at[k] and starts[i] < limit]
        keys, closing, w = reply_parts(m["content"], offered, text, starts, reply, msg_at[k])
        if replies is not None:
            replies.append(
                {"error": error, "target": target, "R": len(reply), "P": len(keys), "A": len(closing), "w": w}
            )
        if not target:
            continue
        for i in reply:
            weights[i] = w if i in keys else 1.0
        n_targets += bool(reply)
        n_calls += bool(reply) and bool(key_chars(m["content"], offered))
    if n_calls:
        return weights, "key_tokens"
    if n_targets:
        return weights, "no_call"
    return weights, "tool_error" if n_errors else "no_target"


def _decide(shard, key_weights: bool) -> dict:
    cols = shard.samples.select(["text", "offsets", "loss_mask", "messages"]).to_pydict()
    weights, reasons = [], []
    for text, offsets, mask, msgs in zip(*cols.values(), strict=True):
        w, why = sample_weights(text, offsets, mask, json.loads(msgs))
        weights.append(w if key_weights else (w > 0).astype(np.float32))
        reasons.append(why if key_weights or why not in ("key_tokens", "no_call") else "target")
    keep = [r in ("key_tokens", "no_call", "target") for r in reasons]
    return {"keep": keep, "reason": reasons, "token_weight": weights}


def policy(shard) -> dict:
    """The user-policy entry point (:mod:`winnow.stages.user_policy`): key-token weights and the error
    filter, every sample of one shard."""
    return _decide(shard, key_weights=True)


def error_filter(shard) -> dict:
    """The error filter alone (the paper's MAE without PKT): weight 1 on every target reply's tokens, 0 on
    the failed turns; reasons ``target``, ``tool_error``, ``no_target``
    (``python:winnow.stages.policies.tool_call_keys:error_filter``)."""
    return _decide(shard, key_weights=False)
