"""Small in-process tokenizers with real-world chat-template styles, for render/ingest tests.

A ByteLevel BPE (vocab 800) is trained in a fraction of a second on a few hundred generated sentences
plus chat-shaped text, then wrapped in ``PreTrainedTokenizerFast`` with a hand-written Jinja template:

- ``chatml``: ChatML/Qwen2-like ``<|im_start|>role\\ncontent<|im_end|>\\n``; a default system prompt is
  injected when the conversation has none; no BOS. ``think=True`` also injects an empty reasoning block
  ``<think>\\n\\n</think>\\n\\n`` before the last assistant answer (Qwen3 style).
- ``llama3``: ``<|begin_of_text|>`` rendered by the template, ``<|start_header_id|>role<|end_header_id|>\\n\\n``
  + trimmed content + ``<|eot_id|>``; like the real one, the tokenizer itself *also* adds BOS when asked
  to add special tokens (the double-BOS trap).
- ``None``: no chat template. ``bos=True`` is Llama-2-like (``<s>`` added by the post-processor, ``</s>``
  EOS); ``bos=False`` is GPT-2-like (``<|endoftext|>`` is BOS and EOS but never added).

``pretok`` picks how text is split before BPE: ``"gpt2"`` (the GPT-2 regex: a space merges with the word
after it, so ``"Assistant: " + content`` straddles) or ``"merge"`` (no regex: merges cross spaces and
newlines, so ``"assistant\\n" + content`` and ``content + "\\n\\n"`` straddle too). ``trim_offsets=True``
uses a ByteLevel post-processor that trims whitespace out of the reported offsets (as RoBERTa's does),
which the renderer must undo.
"""

from __future__ import annotations

import functools
import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = [
    "<|endoftext|>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
NON_SPECIAL_ADDED = ["<think>", "</think>"]

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3 style: the last assistant answer gets an empty reasoning block injected before it.
CHATML_THINK_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an answer question model token train data sample user assistant system is was be to of and in "
    "that it for on with as at by from this we you they have has how many much what why when total each "
    "per cost price sold bought apples books hours minutes dollars friends clips times half twice more "
    "less than after before first then finally so therefore because step number sum product equals gives"
).split()
_EXTRA = ["café", "naïve", "日本語", "数据", "Ünïcödé", "emoji🙂", "ß", "Ω", "x²", "—", "…"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic sentences (some with unicode and numbers) plus chat-shaped lines for merges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_EXTRA))
        if rng.random() < 0.4:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        s = " ".join(words).capitalize() + rng.choice([".", "?", "!", ".", ":"])
        if i % 3 == 0:  # chat-shaped text so that header/content merges exist in the "merge" pretokenizer
            role = rng.choice(["user", "assistant", "system"])
            s = rng.choice([f"{role}\n{s}\n", f"{role.capitalize()}: {s}\n\n", f"\n\n{s}"])
        out.append(s)
    # paragraphs: a newline before a capitalised word is frequent, so "\n" + first letters merge
    # (lines open with a few fixed words and end without punctuation, so "\nT" beats ".\n").
    openers = ["The", "Then", "This", "Therefore", "So"]
    paras = [
        "".join(
            rng.choice(["\n", "\n\n"]) + rng.choice(openers) + " " + " ".join(t.split()[1:-1])
            for t in out[i : i + 4]
        )
        for i in range(0, n, 4)
    ]
    return out + paras


@functools.cache
def _base(pretok: str, trim_offsets: bool, vocab_size: int) -> str:
    """Train the BPE once per configuration; returned as JSON so each caller gets a fresh object."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=(pretok == "gpt2"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens(NON_SPECIAL_ADDED)
    return tok.to_str()


def make_tokenizer(
    template: str | None = "chatml",
    *,
    pretok: str = "merge",
    bos: bool = True,
    think: bool = False,
    trim_offsets: bool = False,
    vocab_size: int = 800,
):
    """A ``PreTrainedTokenizerFast`` with the given template style (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    if pretok not in ("gpt2", "merge"):
        raise ValueError(f"pretok={pretok!r}: use gpt2 or merge")
    tok = Tokenizer.from_str(_base(pretok, trim_offsets, vocab_size))
    kw: dict = {}
    if template == "chatml":
        kw = dict(
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=CHATML_THINK_TEMPLATE if think else CHATML_TEMPLATE,
        )
    elif template == "llama3":
        kw = dict(
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|endoftext|>",
            chat_template=LLAMA3_TEMPLATE,
        )
        tok.post_processor = _prepend_bos(tok, "<|begin_of_text|>", trim_offsets)
    elif template is None and bos:
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token=None, pad_token="<|endoftext|>")
        tok.post_processor = _prepend_bos(tok, "<s>", trim_offsets)
    elif template is None:
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    else:
        raise ValueError(f"template={template!r}: use chatml, llama3 or None")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def _prepend_bos(tok: Tokenizer, bos: str, trim_offsets: bool):
    bos_id = tok.token_to_id(bos)
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=trim_offsets),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            ),
        ]
    )


def with_swapped_vocab(tokenizer, a: str, b: str):
    """A copy of ``tokenizer`` whose vocabulary ids of tokens ``a`` and ``b`` are exchanged."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=tokenizer.chat_template,
    )


def _byte_of_char() -> dict[str, int]:
    """Inverse of the ByteLevel alphabet: printable bytes stand for themselves, the rest are shifted to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_OF_CHAR = _byte_of_char()


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The UTF-8 bytes each token stands for, from the vocabulary alone (no offsets involved)."""
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        out.append(added[i].encode() if i in added else bytes(_BYTE_OF_CHAR[c] for c in piece))
    return out


def token_byte_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each token in the UTF-8 bytes of the text the ids decode to."""
    spans, pos = [], 0
    for b in token_bytes(tokenizer, ids):
        spans.append((pos, pos + len(b)))
        pos += len(b)
    return spans
