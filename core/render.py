"""Render a conversation once with the model's chat template and mark its supervised tokens exactly.

What a sample becomes (ARCHITECTURE.md "Supervised tokens", position convention):

- ``text``: the conversation rendered once, ``tokenizer.apply_chat_template(messages, tokenize=False)``.
  The template writes its own BOS, so the render is tokenized with ``add_special_tokens=False`` (no second
  BOS). We never diff renders of conversation prefixes: some templates rewrite earlier turns (Qwen3 drops
  old reasoning), and ``return_assistant_tokens_mask`` is all zeros without ``{% generation %}`` markers.
- ``input_ids`` / ``offsets``: the render tokenized once; ``offsets[i]`` is the character start of token
  ``i`` in ``text``. Offsets come from the Rust tokenizer with its post-processor switched off: with
  ``add_special_tokens=False`` a post-processor adds nothing, but ByteLevel/RoBERTa post-processors with
  ``trim_offsets`` shrink offsets around spaces (a lone space token gets an empty span), which would leave
  content characters covered by no token. A one-time check per tokenizer compares those ids with
  ``tokenizer(text, add_special_tokens=False)``; if they ever differ, the transformers call is used.
- ``loss_mask[i] = 1`` when token ``i``'s character span overlaps the content of an assistant turn (a token
  that straddles the boundary, e.g. ``"\\nThe"`` after ``"assistant"``, counts: ``n_straddle`` counts
  them), plus the token that closes each assistant turn: the first special token (EOS or an added special
  token such as ``<|im_end|>``, ``<|eot_id|>``, ``</s>``) after the content, with only whitespace between.
  Role headers, the newline after the end-of-turn token and injected empty reasoning blocks are template
  text and stay 0. ``loss_on="last_turn"`` supervises only the last assistant turn. ``loss_mask[0] = 0``.

Finding the content: each message's (stripped) content is searched in the render after the end of the
previous message's match (a forward scan), so an answer is never found inside its question. A bare
``str.find`` picks the first occurrence, which for a short answer such as ``"a"`` is inside template text
(``"<|im_st*a*rt|>"``, ``"*a*ssistant"``). So, once per tokenizer and template, a probe conversation with
sentinel contents is rendered to learn the text each role's content follows (from the last control token
before it: ``"<|im_start|>assistant\\n"``, ``"<|end_header_id|>\\n\\n"``, ``"</think>\\n\\n"``); the scan
first looks for *lead-in + content*, and only then for the content alone at a position that does not
overlap a special token. An assistant content that cannot be found (the template rewrote it) raises
``RenderError("template_dropped_content")``, which ingest turns into a reject row; with ``last_turn`` only
the last answer has to be found. Content that contains a special-token string (``"<|im_end|>"`` typed in
a message) would be tokenized as a control token: ``RenderError("special_token_in_content")``.

Tokenizers without a chat template get this plain format (turns joined by a blank line)::

    [BOS]System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}{EOS}\\n\\nUser: ...

BOS is prepended when the tokenizer has one and adds it to ordinary input (Llama-2 style, not GPT-2
style); every assistant answer ends with the EOS text (supervised) when the tokenizer has an EOS token.
A conversation that is a single assistant message (a plain ``text`` record) is rendered without the
``"Assistant: "`` header, ``[BOS]{content}{EOS}``, so every token but index 0 is supervised. Content
spans are known exactly here (no scan needed).

Whitespace tokens between an answer and its end-of-turn token (Llama-2's ``" </s>"``) stay unsupervised:
the model is trained on the answer and on the token that ends it, not on template spacing.

Cost, GSM8K train (7,473 conversations) in 2,000-conversation batches on the 2-core VM: with the
``builtin:tiny`` tokenizer (vocab 2,048, ~242 tokens/sample) ~2,050 samples/s end to end (load ~1). Rust
``encode_batch`` dominates; everything else is ~155 us/sample of CPU for ~346-token samples (test fixture,
vocab 800): ``apply_chat_template`` ~25 us, ids/offsets to Python lists ~65 us, locating and masking ~65 us.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from winnow.core.errors import RejectError

LOSS_ON = ("all_turns", "last_turn")
# Bump when rendering or masking rules change (the plain format included): ingest puts it in its fingerprint.
# 2: a content candidate that starts or ends inside an added token is refused (see _cuts_control)
RENDER_VERSION = "render/2"


@dataclass
class Rendered:
    """One rendered sample; every list has one entry per token (``len(input_ids)``)."""

    text: str
    input_ids: list[int]
    offsets: list[int]  # char start of each token in text
    loss_mask: list[int]
    n_straddle: int  # supervised tokens that also cover template characters next to the content


RenderError = RejectError  # a sample that cannot be rendered exactly: the reason code of its reject row


# ---- per-tokenizer facts, computed once ---------------------------------------------------------


@dataclass
class _TokInfo:
    key: tuple
    backend: Any  # a tokenizers.Tokenizer without post-processor, or None: use the transformers call
    special_ids: frozenset[int]
    special_strings: tuple[str, ...]  # contents of special tokens, longest first
    control_strings: tuple[str, ...]  # every added token (special or not), longest first
    template: str | dict | None
    bos_text: str | None  # plain format: prepended when the tokenizer adds BOS to ordinary input
    eos_text: str | None
    lead_ins: dict[str, tuple[str, ...]]  # role -> text the content follows (template renders)


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE_SHAPES = (
    ("system", "user", "assistant", "user", "assistant"),
    ("user", "assistant", "user", "assistant"),
    ("assistant",),
)


def _info_key(tokenizer) -> tuple:
    # Anything a user may change on a live tokenizer that alters rendering invalidates the cache.
    tpl = tokenizer.chat_template
    return (
        json.dumps(tpl, sort_keys=True) if isinstance(tpl, dict) else tpl,
        tokenizer.bos_token,
        tokenizer.eos_token,
        len(tokenizer),
    )


def _tok_info(tokenizer) -> _TokInfo:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TypeError(
            f"{type(tokenizer).__name__}: rendering needs a fast tokenizer (tokenizer.json) for "
            "character offsets; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    key = _info_key(tokenizer)
    try:
        info = _INFO.get(tokenizer)
    except TypeError:  # not weak-referenceable: recompute each call
        info = None
    if info is not None and info.key == key:
        return info

    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    special_ids = {i for i, t in added.items() if t.special} | set(tokenizer.all_special_ids)
    special_strings = {added[i].content for i in special_ids if i in added}
    special_strings |= {s for s in (tokenizer.bos_token, tokenizer.eos_token) if s}
    control = {t.content for t in added.values()} | special_strings
    bos_text = None
    if tokenizer.bos_token is not None and tokenizer.bos_token_id is not None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            bos_text = tokenizer.bos_token
    info = _TokInfo(
        key=key,
        backend=None,
        special_ids=frozenset(special_ids),
        special_strings=tuple(sorted(special_strings, key=len, reverse=True)),
        control_strings=tuple(sorted(control, key=len, reverse=True)),
        template=tokenizer.chat_template,
        bos_text=bos_text,
        eos_text=tokenizer.eos_token,
        lead_ins={},
    )
    info.lead_ins = _probe_lead_ins(tokenizer, info) if info.template is not None else {}
    info.backend = _raw_backend(tokenizer, info)
    try:
        _INFO[tokenizer] = info
    except TypeError:
        pass
    return info


def _raw_backend(tokenizer, info: _TokInfo):
    """A copy of the Rust tokenizer without post-processor, truncation or padding, if it agrees on ids."""
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.post_processor = None
        backend.no_truncation()
        backend.no_padding()
    except Exception:  # noqa: BLE001 - an exotic backend that cannot be copied: use the transformers call
        return None
    sample = []
    for shape in _PROBE_SHAPES:
        msgs = [(r, f"Probe text {k}: 12 apples, café.", "") for k, r in enumerate(shape)]
        if info.template is None:
            sample.append(_render_plain(info, msgs)[0])
        else:
            text = _render_text(tokenizer, info, [{"role": r, "content": c} for r, c, _ in msgs])
            if isinstance(text, str):
                sample.append(text)
    ours = [e.ids for e in backend.encode_batch(sample, add_special_tokens=False)]
    theirs = tokenizer(sample, add_special_tokens=False)["input_ids"] if sample else []
    return backend if ours == theirs else None


def _probe_lead_ins(tokenizer, info: _TokInfo) -> dict[str, tuple[str, ...]]:
    """Per role, the template text between the last control token before a content and the content."""
    lead: dict[str, set[str]] = {}
    for shape in _PROBE_SHAPES:
        sentinels = [f"Wnnw{k}Prb{r[:3]}Zq" for k, r in enumerate(shape)]
        try:
            text = tokenizer.apply_chat_template(
                [{"role": r, "content": s} for r, s in zip(shape, sentinels, strict=True)], tokenize=False
            )
        except Exception:  # noqa: BLE001 - a template may refuse a shape (e.g. assistant first); skip it
            continue
        end = 0
        for role, s in zip(shape, sentinels, strict=True):
            p = text.find(s, end)
            if p < 0:
                continue
            glue = text[end:p]
            cut = max((glue.rfind(c) for c in info.control_strings), default=-1)
            tail = glue[cut:] if cut >= 0 else glue[-32:]
            if tail:
                lead.setdefault(role, set()).add(tail)
            end = p + len(s)
    return {r: tuple(sorted(v, key=len, reverse=True)) for r, v in lead.items()}


# ---- rendering ----------------------------------------------------------------------------------


def _check_messages(messages: Any) -> list[tuple[str, str, str]]:
    """(role, stripped content, leading whitespace the stripping removed) per message."""
    if not isinstance(messages, list) or not messages:
        raise RenderError("bad_message", "messages must be a non-empty list of {role, content}")
    out = []
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise RenderError("bad_message", f"message {j} needs a string role and a string content")
        raw = m["content"]
        content = raw.strip()
        out.append((m["role"], content, raw[: len(raw) - len(raw.lstrip())] if content else ""))
    if not any(r == "assistant" for r, _, _ in out):
        raise RenderError("no_assistant_turn", "no assistant message: nothing to train on")
    if any(r == "assistant" and not c for r, c, _ in out):
        raise RenderError("empty_response", "an assistant message is empty after stripping whitespace")
    return out


def _render_text(tokenizer, info: _TokInfo, messages: list[dict]) -> str | RenderError:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - any template failure is this sample's reject, not a crash
        return RenderError("template_error", f"chat template failed: {type(e).__name__}: {e}"[:500])
    if not isinstance(text, str):
        return RenderError("template_error", f"chat template returned {type(text).__name__}, not text")
    return text


def _render_plain(
    info: _TokInfo, msgs: list[tuple[str, str, str]]
) -> tuple[str, list[tuple[int, int] | None]]:
    """The documented no-template format; content spans are known exactly."""
    parts: list[str] = [info.bos_text] if info.bos_text else []
    pos = len(parts[0]) if parts else 0
    spans: list[tuple[int, int] | None] = []
    single = len(msgs) == 1
    for k, (role, content, _) in enumerate(msgs):
        header = "" if single else f"{role.capitalize()}: "
        start = pos + len(header)
        spans.append((start, start + len(content)))
        piece = header + content
        if role == "assistant" and info.eos_text:
            piece += info.eos_text
        if k < len(msgs) - 1:
            piece += "\n\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def _cuts_control(text: str, info: _TokInfo, start: int, end: int) -> bool:
    """Whether a candidate content span [start, end) begins or ends strictly inside an added token's text.

    Added tokens are split off before BPE, so a real content boundary never falls inside one; a candidate
    that does is template text. Without this check the answer ``"<"`` under a template that injects
    ``"<think>\\n\\n</think>\\n\\n"`` after ``"<|im_start|>assistant\\n"`` is found at the ``"<"`` of
    ``"<think>"`` (that lead-in matches first) and the template's ``<think>`` is supervised instead.
    """
    for cs in info.control_strings:
        n = len(cs)
        # an occurrence wholly inside [b - n + 1, b + n - 1) starts before b and ends after it
        if n > 1 and any(text.find(cs, max(0, b - n + 1), b + n - 1) >= 0 for b in (start, end)):
            return True
    return False


def _locate(
    text: str,
    info: _TokInfo,
    msgs: list[tuple[str, str, str]],
    required: list[bool],
    ids: list[int],
    starts: list[int],
    ends: list[int],
) -> list[tuple[int, int] | None]:
    """Forward scan for each message's content; ``None`` where a non-required content is not found."""
    sp_starts: list[int] | None = None  # special-token char spans, built only if the fallback needs them
    sp_ends: list[int] = []
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for k, (role, content, ws) in enumerate(msgs):
        if not content:
            spans.append(None)
            continue
        best = -1
        for lead in info.lead_ins.get(role, ()):
            # A template may keep the leading whitespace of unstripped input or trim it: try both.
            for pre in (lead, lead + ws) if ws else (lead,):
                p = text.find(pre + content, cursor)
                while p >= 0 and _cuts_control(text, info, p + len(pre), p + len(pre) + len(content)):
                    p = text.find(pre + content, p + 1)
                if p >= 0 and (best < 0 or p + len(pre) < best):
                    best = p + len(pre)
        if best < 0:  # fallback: first occurrence that lies outside every special token
            if sp_starts is None:
                sp = [i for i, t in enumerate(ids) if t in info.special_ids]
                sp_starts = [starts[i] for i in sp]
                sp_ends = list(accumulate((ends[i] for i in sp), max))
            p = text.find(content, cursor)
            while p >= 0:
                j = bisect_right(sp_starts, p + len(content) - 1)  # specials starting inside or before
                if (j == 0 or sp_ends[j - 1] <= p) and not _cuts_control(text, info, p, p + len(content)):
                    best = p
                    break
                p = text.find(content, p + 1)
        if best < 0:
            hit = next((s for s in info.special_strings if s in content), None)
            if hit is not None:
                raise RenderError(
                    "special_token_in_content", f"message {k} ({role}) contains the special token {hit!r}"
                )
            if required[k]:
                raise RenderError(
                    "template_dropped_content",
                    f"message {k} ({role}, {len(content)} chars) does not occur in the render after "
                    f"char {cursor}: the chat template rewrote it",
                )
            spans.append(None)
            continue
        spans.append((best, best + len(content)))
        cursor = best + len(content)
    return spans


def _mask(
    text: str,
    ids: list[int],
    starts: list[int],
    ends: list[int],
    info: _TokInfo,
    msgs: list[tuple[str, str, str]],
    spans: list[tuple[int, int] | None],
    supervise: list[bool],
) -> Rendered:
    n = len(ids)
    special = info.special_ids
    mask = [0] * n
    n_straddle = 0
    for k, span in enumerate(spans):
        if span is None:
            continue
        cs, ce = span
        i0 = bisect_right(ends, cs)  # first token ending after the content starts
        i1 = bisect_left(starts, ce) - 1  # last token starting before the content ends
        if i0 > i1:
            raise RenderError("unaligned_offsets", f"message {k}: no token covers chars {cs}..{ce}")
        if not special.isdisjoint(ids[i0 : i1 + 1]):
            bad = next(i for i in ids[i0 : i1 + 1] if i in special)
            raise RenderError(
                "special_token_in_content",
                f"message {k} ({msgs[k][0]}) contains special token id {bad} in its content",
            )
        if not supervise[k]:
            continue
        mask[i0 : i1 + 1] = [1] * (i1 + 1 - i0)
        n_straddle += (starts[i0] < cs) + (ends[i1] > ce and (i1 != i0 or starts[i0] >= cs))
        # The end-of-turn token: the first special token after the content, only whitespace between.
        j = i1 + 1
        while j < n:
            if ids[j] in special:
                if starts[j] >= ce and not text[ce : starts[j]].strip():
                    mask[j] = 1
                break
            if text[starts[j] : ends[j]].strip():
                break
            j += 1
    mask[0] = 0  # index 0 has no predecessor (position convention)
    return Rendered(
        text=text,
        input_ids=ids,
        offsets=starts,
        loss_mask=mask,
        n_straddle=n_straddle,
    )


def render_batch(
    tokenizer, batch: list[list[dict]], loss_on: str = "all_turns"
) -> list[Rendered | RenderError]:
    """Render and mark a batch of conversations; a sample that cannot be rendered comes back as its error.

    One ``encode_batch`` call tokenizes every render of the batch (the Rust tokenizer parallelises it).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}: use one of {list(LOSS_ON)}")
    info = _tok_info(tokenizer)
    out: list[Rendered | RenderError | None] = [None] * len(batch)
    todo: list[tuple[int, str, list[tuple[str, str, str]], list[tuple[int, int] | None] | None]] = []
    for b, messages in enumerate(batch):
        try:
            msgs = _check_messages(messages)
        except RenderError as e:
            out[b] = e
            continue
        if info.template is None:
            text, spans = _render_plain(info, msgs)
            todo.append((b, text, msgs, spans))
        else:
            text = _render_text(tokenizer, info, messages)
            if isinstance(text, RenderError):
                out[b] = text
            else:
                todo.append((b, text, msgs, None))
    texts = [t[1] for t in todo]
    if info.backend is not None:
        encs = info.backend.encode_batch(texts, add_special_tokens=False) if texts else []
        tokenized = [(e.ids, e.offsets) for e in encs]
    elif texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        tokenized = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    else:
        tokenized = []
    for (b, text, msgs, spans), (ids, offs) in zip(todo, tokenized, strict=True):
        asst = [k for k, (r, _, _) in enumerate(msgs) if r == "assistant"]
        supervise = [
            r == "assistant" and (loss_on == "all_turns" or k == asst[-1]) for k, (r, _, _) in enumerate(msgs)
        ]
        starts = [o[0] for o in offs]
        ends = [o[1] for o in offs]
        if starts != sorted(starts) or ends != sorted(ends):
            # bisect needs non-decreasing offsets; running maxima for a tokenizer whose offsets step back
            starts, ends = list(accumulate(starts, max)), list(accumulate(ends, max))
        try:
            if spans is None:
                spans = _locate(text, info, msgs, supervise, ids, starts, ends)
            out[b] = _mask(text, ids, starts, ends, info, msgs, spans, supervise)
        except RenderError as e:
            out[b] = e
    return out  # type: ignore[return-value]


def render_sample(tokenizer, messages: list[dict], loss_on: str = "all_turns") -> Rendered:
    """Render and mark one conversation; raises ``RenderError`` (with ``.reason``) when it cannot."""
    r = render_batch(tokenizer, [messages], loss_on=loss_on)[0]
    if isinstance(r, RenderError):
        raise r
    return r


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256[:16] over vocabulary, merges, added/special tokens, pre/post-processing and chat template.

    The whole ``tokenizer.json`` is hashed in canonical form except its truncation/padding settings
    (transformers changes those on the live object when called with ``truncation=``/``padding=``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # a slow tokenizer: the vocabulary and added tokens are what we can see
        spec = {
            "vocab": tokenizer.get_vocab(),
            "added": {str(i): [t.content, t.special] for i, t in tokenizer.added_tokens_decoder.items()},
        }
    payload = {
        "tokenizer": spec,
        "chat_template": tokenizer.chat_template,
        "special": {
            k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        },
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
