"""Tokens token-level selection never drops: ``winnow select --always-keep`` and ``train always_keep=``.

Why: the curation benchmark from the quality base (benchmarks/RESULTS.md) found offline ssToken keeping
1.9% of the ``<|im_end|>`` and 0.6% of the ``####`` tokens (current and history model both predict them
confidently, so their REL is ~0), and the fine-tuned model stopped writing ``#### N``: exact match 25% -> 3%
(online ssToken 2%). A floor declared by the user puts them back wherever they are supervised, in every
sample the selection trains on; the policy still decides everything else.

One helper turns the user's texts into token ids for both callers (``select`` with the tokenizer that made
the samples, the trainer with its model's, which ``winnow train`` checked is the same):

* a text that *is* a token of the tokenizer's added vocabulary (``<|im_end|>``, ``<think>``) maps to that
  one id, whatever the tokenizer would do to it inside running text (``split_special_tokens``, a prefix
  space of SentencePiece);
* a text shaped like a special token (``<...>`` without spaces) that the tokenizer does not have is an
  error: a misspelt ``<|eot_id|>`` would otherwise floor the ids of ``<``, ``|`` and ``>`` everywhere;
* any other text maps to every id it tokenizes to without special tokens (``####`` -> one id with the
  builtin tokenizer; a text of several tokens floors each of them, wherever it occurs). A context can change
  how a text tokenizes (``" ####"`` -> ``Ġ`` + ``####`` there): check with ``winnow inspect`` (``tokens``
  view) which ids the answers hold.

Imports nothing heavy (the trainer's GPU machine has no polars/duckdb).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from winnow.core.errors import UserError

if TYPE_CHECKING:
    from winnow.core.store import RunDir

_SPECIAL_SHAPE = re.compile(r"^<[^<>\s]+>$")
METADATA_KEY = b"winnow.always_keep"  # selection tables: {"texts": [...], "ids": [...]} (JSON)


def split_texts(value: str) -> list[str]:
    """``"<|im_end|>,####"`` -> the texts, stripped; empty items are kept so that they are reported."""
    return [t.strip() for t in value.split(",")]


def always_keep_ids(tokenizer: Any, texts: list[str], where: str) -> list[int]:
    """The sorted token ids the ``texts`` stand for (see the module docstring); UserError naming ``where``
    (the flag or parameter) and the text for a text that maps to nothing."""
    added = tokenizer.get_added_vocab()  # text -> id of every added and special token
    ids: set[int] = set()
    for text in texts:
        if text in added:
            ids.add(int(added[text]))
            continue
        if _SPECIAL_SHAPE.match(text):
            known = ", ".join(sorted(added)) or "none"
            raise UserError(
                f"{where}: {text!r} looks like a special token but the tokenizer has no such token (its added "
                f"tokens: {known}); fix the spelling, or leave it out"
            )
        got = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not got:
            raise UserError(
                f"{where}: text {text!r} tokenizes to nothing; give non-empty texts separated by ',' "
                '(e.g. "<|im_end|>,####")'
            )
        ids.update(int(i) for i in got)
    return sorted(ids)


def run_tokenizer(run: RunDir, where: str) -> Any:
    """The tokenizer ingest used for ``run``'s samples (the model recorded in the samples schema), checked
    against the samples' tokenizer fingerprint."""
    from winnow.core.models import (
        load_tokenizer,
        resolve_model,
        samples_tokenizer_fingerprint,
        tokenizer_fingerprint,
    )

    schema = run.table("samples").schema()
    model = ((schema.metadata or {}).get(b"winnow.model", b"") if schema is not None else b"").decode()
    if not model:
        raise UserError(
            f"{where} needs the tokenizer that made the samples, but {run.root}'s samples record no model "
            "(schema metadata winnow.model); re-run `winnow ingest` with --model"
        )
    tokenizer = load_tokenizer(resolve_model(model))
    want = samples_tokenizer_fingerprint(run)
    if want is not None and tokenizer_fingerprint(tokenizer) != want:
        raise UserError(
            f"{where}: the tokenizer of {model} no longer matches the one the samples were made with "
            f"(fingerprint {want}); ingest again with the model's current tokenizer"
        )
    return tokenizer
