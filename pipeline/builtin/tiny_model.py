"""winnow's own tiny Llama-style causal LM and byte-level BPE tokenizer, trained on CPU and cached.

The quickstart and the tests must run with no network, so winnow trains its own model on draws of the demo
generator (:func:`winnow.pipeline.builtin.demo_data.generate_demo`) and saves it with ``save_pretrained``
(safetensors) exactly as a user's model would be saved; every consumer loads it with
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained(path)``, so the builtin model goes through the
same code paths as a real one. ``winnow.core.models.resolve_model("builtin:tiny")`` gives its
directory.

Design decisions (numbers measured on this 2-core VM while other jobs ran; single runs, noisy):

* **Tokenizer.** Byte-level BPE (no unknown tokens: every byte string encodes), digits split one per
  token (an optional leading space attaches to the first digit), so arithmetic and a changed final
  number are visible token by token. Special tokens ``<|endoftext|>`` (eos and pad), ``<|im_start|>``,
  ``<|im_end|>``; a ChatML template like Qwen's (no BOS, no default system prompt) whose assistant turns
  are wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask`` marks the assistant content
  plus its ``<|im_end|>``, the project's supervised-token rule. The special tokens are cut out of the
  training text so no merges are spent on their spelling. Vocabulary **2048**, not 4096: the demo's
  text saturates at 3406 tokens (min_frequency 2) and 2048 costs only +2% tokens per sample (82 vs 80.5),
  while the LM head and its cross-entropy are ~45% of a training step at 4096 (226 vs 129 ms per
  4x256 step at hidden 128).
* **Model.** ``LlamaForCausalLM``, hidden 128, 4 layers, 4 query heads over 2 key/value heads
  (grouped-query attention on purpose: attention code downstream must handle ``num_key_value_heads <
  num_attention_heads``), SwiGLU intermediate 352 (2.75x), RoPE, 1024 positions, 1.0M parameters.
  Embeddings are **tied**: an untied head would add 0.26M parameters (+26%) and its gradient to the
  one-minute budget, and tied weights are what many small real models ship (Qwen2.5-0.5B, Llama-3.2-1B,
  SmolLM), so save/load paths get exercised on a shared tensor. Hidden 128 beat 192 within a fixed CPU
  minute (measured with the builder's previous loop on 256-token windows): 400 steps at 128 reached
  1.32 nats/token on held-out chats, 300 steps at 192 only 2.09 (and took longer); at this budget the
  number of updates matters most (4x256 tokens per step beat 8x256 with half the steps: 1.50 vs 2.18
  nats at vocab 4096).
* **One thread.** Training runs with ``torch.set_num_threads(1)`` (restored afterwards): on the busy
  2-core machine two intra-op threads ran 10-15x *slower* than one (204-411 vs 3,500-5,700 tokens/s),
  and a fixed thread count keeps a recipe's weights independent of OMP_NUM_THREADS (torchrun sets 1).
* **Training: winnow's own trainer.** Every model is built by :func:`winnow.trainer.step.train`, the
  loop users train with (one training loop in the project). The builder writes the recipe's draw as an
  export parquet (``input_ids``, ``token_weight``, ``loss_mask``); a from-scratch recipe first trains the
  tokenizer and saves it beside a seeded ``LlamaForCausalLM(config)`` (``save_pretrained``), and the
  trainer starts from that directory; a fine-tune starts from its base's cache directory. Trainer
  settings: CPU, fp32 (bf16 autocast is ~27x slower on this CPU), one thread, length-bucketed padded
  rows of whole samples, AdamW with warmup + cosine decay to 0.1 lr, ``max_steps`` = the recipe's
  steps, no held-out split (quality is measured on other draws, below) and no intermediate
  checkpoints (the final one is deleted: the cache keeps weights, tokenizer, ``metrics.jsonl`` and the
  trainer's model card). Seeds fix the init and the batch order, so a recipe gives the same weights
  each time on a given machine.
  The base ``tiny`` learns every token of each rendered chat of the full demo mix (corrupted samples
  included, like real pretraining text) plus a closing ``<|endoftext|>``, all at weight 1; fine-tunes
  weigh the assistant tokens as ingest marks them (:mod:`winnow.core.render`; rows it rejects are
  left out). 400 steps of 1,024 tokens (~12 samples, 388k weighted tokens): training loss 7.21 -> 0.94
  (last 10 steps), **1.17 nats/token** on 300 held-out chats (seed 9090, every token) against 1.37 for
  the previous builder's loop, which cut 256-token windows across documents (the scored samples always
  start at position 0, as the trainer's rows do). Variants: 200 steps of 512 tokens (~6 samples).
  Build seconds measured 2026-11-30 on this 2-core VM at load average 11-14 (other agents' jobs), so
  3-5x an idle machine: ``tiny`` 499 s (the old loop's build of the same recipe logged 429 s at a
  similar load, 60 s on a quieter machine), fine-tunes 157-234 s (old loop: 71-119 s loaded, 15-17 s
  quieter).
* **What the variants learned** (``python benchmarks/tiny_model_quality.py``: held-out draw seed 9191,
  120 rows per kind, assistant tokens, nats/token; ``tiny`` / reference / warm): clean 1.09 / 1.01 /
  1.04, junk spans 1.70 / 1.94 / 1.61, off-topic 4.99 / 5.71 / 4.90 (old loop: clean 1.19 / 1.04 /
  1.06, junk 1.79 / 2.03 / 1.64, off-topic 5.24 / 6.07 / 5.20) — the reference fits clean answers
  better and junk worse (Rho-1's excess loss has a sign); with a stronger base the fine-tunes gain less
  on clean rows (reference - tiny -0.08, warm - tiny -0.06; old -0.15, -0.12). On the digits after
  ``####``, negative minus positive is +0.06 nats on clean rows and -0.07 on wrong-final-answer rows
  (old +0.05 / -0.10): the cDPO pair disagrees in the right direction.
* **No model scores its own training data.** Every recipe draws with a seed different from the demo's
  ``DEMO_SEED`` (checked in ``__post_init__``).
* **Caching.** A model is described by a frozen :class:`TinyModelRecipe`; its directory is
  ``cache_dir()/models/<name>-<hash>`` where the hash covers every recipe field (a fine-tune's base
  recipe included), :data:`CODE_VERSION` and the demo generator's version. It is built once: under an
  exclusive ``fcntl.flock`` on a lock file beside it (pytest-xdist workers and torchrun ranks queue
  instead of building twice), into a temporary directory that is renamed into place, so no reader ever
  sees a half-written model. A crashed build leaves only a temporary directory, removed by the next
  builder while it holds the lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from winnow.core.store import UserError, atomic_write_json, fsync_dir, fsync_tree

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when a change here alters the weights a recipe produces: every cached model is rebuilt.
# 2: fine-tunes take their supervision from winnow.core.render and skip rows it rejects (11 of
#    tiny-warm's 1,200 rows hold chat-template text in the answer); the other recipes train identically.
# 3: every model is trained by winnow's trainer (winnow.trainer.step.train) on whole samples instead of
#    the builder's own loop on 256-token windows; recipes give tokens_per_batch instead of batch_size/seq_len.
# 4: transformers' warmup + cosine schedule (winnow.trainer.optim, issue 28 item 9): the cosine is one step
#    further along, so every model's weights change.
CODE_VERSION = 4

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)
RECIPE_FILE = "winnow_recipe.json"

# One line, no Jinja whitespace surprises. Must render exactly like `render_chat` (a test checks it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

log = logging.getLogger(__name__)
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


# ----------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Architecture:
    """Shape of a from-scratch model (fine-tunes inherit their base's)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )


@dataclass(frozen=True)
class TinyModelRecipe:
    """Everything that determines a tiny model's weights; its hash names the cache directory.

    A recipe without ``base`` trains a tokenizer and a model from scratch (``architecture``,
    ``vocab_size`` and ``tokenizer_*`` required); a recipe with ``base`` fine-tunes that model and keeps
    its tokenizer (those fields must then be None). ``corruptions``/``is_correct`` filter the draw
    ``generate_demo(data_samples, data_seed)`` (None keeps all rows).
    """

    name: str
    data_seed: int
    data_samples: int
    steps: int  # optimizer steps of winnow's trainer
    lr: float
    tokens_per_batch: int  # the trainer's micro-batch: bucketed rows of whole samples, padding included
    base: TinyModelRecipe | None = None
    architecture: Architecture | None = None
    vocab_size: int | None = None
    tokenizer_seed: int | None = None
    tokenizer_samples: int | None = None
    corruptions: tuple[str, ...] | None = None
    is_correct: bool | None = None
    # math templates left out of the draw (e.g. "math/wages"): a base that has not seen a task the
    # fine-tune then teaches (benchmarks/curation.py); None keeps every template
    exclude_templates: tuple[str, ...] | None = None
    loss_on: Literal["all", "assistant"] = "all"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 1  # intra-op threads while training (see the module docstring)

    def __post_init__(self) -> None:
        from winnow.pipeline.builtin.demo_data import CORRUPTION_KINDS, DEMO_SEED, MATH_TEMPLATES

        where = f"tiny model recipe {self.name!r}"
        scratch = ("architecture", "vocab_size", "tokenizer_seed", "tokenizer_samples")
        if self.base is None:
            missing = [k for k in scratch if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{where}: a from-scratch recipe (base=None) needs {missing}")
        else:
            given = [k for k in scratch if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"{where}: a fine-tune inherits its base's tokenizer and shape; drop {given}"
                )
        for key in ("data_seed", "tokenizer_seed"):
            if getattr(self, key) == DEMO_SEED:
                raise ValueError(
                    f"{where}: {key}={DEMO_SEED} is the demo's own seed; models must never train on the "
                    "samples they score, pick another seed"
                )
        unknown = sorted(set(self.corruptions or ()) - set(CORRUPTION_KINDS))
        templates = sorted(set(self.exclude_templates or ()) - set(MATH_TEMPLATES))
        if templates:
            raise ValueError(f"{where}: exclude_templates {templates} are not demo templates {MATH_TEMPLATES}")
        if unknown:
            raise ValueError(f"{where}: corruptions {unknown} are not demo kinds {list(CORRUPTION_KINDS)}")
        if self.loss_on not in ("all", "assistant"):
            raise ValueError(f"{where}: loss_on={self.loss_on!r} is not 'all' or 'assistant'")
        for key in ("data_samples", "steps", "tokens_per_batch", "num_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"{where}: lr must be > 0, got {self.lr}")

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over every field (the base recipe's included), CODE_VERSION and the
        demo generator's version (the training data is part of the recipe)."""
        from winnow.pipeline.builtin.demo_data import GENERATOR_VERSION

        payload = {
            "code_version": CODE_VERSION,
            "generator_version": GENERATOR_VERSION,
            "recipe": _hashed_fields(dataclasses.asdict(self)),
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def dir_name(self) -> str:
        return f"{self.name}-{self.fingerprint()}"


# fields added at CODE_VERSION 3: left out of the hash while unset, so built models kept their names
_HASHED_ONLY_WHEN_SET = ("exclude_templates",)


def _hashed_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in fields.items() if not (k in _HASHED_ONLY_WHEN_SET and v is None)}
    if isinstance(out.get("base"), dict):
        out["base"] = _hashed_fields(out["base"])
    return out


_TINY = TinyModelRecipe(
    name="tiny",
    architecture=Architecture(),
    vocab_size=2048,
    tokenizer_seed=101,
    tokenizer_samples=4000,
    data_seed=102,
    data_samples=5000,  # ~420k tokens: about one pass over fresh text in 400 steps of 1,024 tokens
    steps=400,
    tokens_per_batch=1024,
    lr=3e-3,
)

_FINETUNE = dict(steps=200, tokens_per_batch=512, lr=1e-3, warmup_steps=10, loss_on="assistant")
# The cDPO pair trains on one draw, split by correctness: same problems, opposite answers. 6000 rows hold
# 720 wrong-answer samples (12%), enough for 200 steps of ~6 samples (512 tokens) at under two passes.
_CONTRAST = dict(data_seed=104, data_samples=6000, **_FINETUNE)

BUILTIN_MODELS: dict[str, TinyModelRecipe] = {
    "tiny": _TINY,
    "tiny-reference": TinyModelRecipe(
        name="tiny-reference",
        base=_TINY,
        data_seed=103,
        data_samples=2000,
        corruptions=("none",),
        **_FINETUNE,
    ),
    "tiny-positive": TinyModelRecipe(
        name="tiny-positive", base=_TINY, corruptions=("none",), is_correct=True, **_CONTRAST
    ),
    "tiny-negative": TinyModelRecipe(
        name="tiny-negative",
        base=_TINY,
        corruptions=("wrong_final_answer", "wrong_step"),
        is_correct=False,
        **_CONTRAST,
    ),
    "tiny-warm": TinyModelRecipe(
        name="tiny-warm",
        base=_TINY,
        data_seed=105,
        data_samples=2000,
        **_FINETUNE,
    ),
}


# ------------------------------------------------------------------------------ chat rendering


def render_with_spans(
    messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` like :data:`CHAT_TEMPLATE`; also return the character spans (start, end) of
    each assistant turn's content plus its closing ``<|im_end|>`` (the supervised characters)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += [head, body, "\n"]
        pos += len(head) + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return render_with_spans(messages, add_generation_prompt)[0]


# ---------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (rendered chats) and wrap it for ``transformers``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's offsets cover its leading space, so `offsets` are plain char starts.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def pieces() -> Iterator[str]:
        for text in texts:
            yield from (p for p in _SPECIAL_RE.split(text) if p)

    backend.train_from_iterator(pieces(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------ model


def llama_config(arch: Architecture, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    from transformers import LlamaConfig

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=None,  # like Qwen's chat models: no BOS is ever prepended
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def mean_token_nll(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], batch_size: int = 16
) -> float:
    """Mean negative log-likelihood (nats) per predicted token of ``texts``, each scored on its own."""
    import torch

    pad = tokenizer.pad_token_id
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
            x, attn = _pad(ids, pad)
            logits = model(input_ids=x, attention_mask=attn, use_cache=False).logits.float()  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none"
            )  # (B, T-1)
            keep = attn[:, 1:].bool()
            total += nll[keep].sum().item()
            count += int(keep.sum())
    return total / count


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        x[row, : len(s)] = torch.tensor(s)
        attn[row, : len(s)] = 1
    return x, attn


# --------------------------------------------------------------------------------- training


def _draw(recipe: TinyModelRecipe) -> list[dict[str, Any]]:
    from winnow.pipeline.builtin.demo_data import generate_demo

    rows = generate_demo(recipe.data_samples, recipe.data_seed)
    if recipe.corruptions is not None:
        rows = [r for r in rows if r["corruption"] in recipe.corruptions]
    if recipe.is_correct is not None:
        rows = [r for r in rows if bool(r["is_correct"]) == recipe.is_correct]
    if recipe.exclude_templates is not None:
        rows = [r for r in rows if r["template"] not in recipe.exclude_templates]
    if not rows:
        raise ValueError(f"tiny model recipe {recipe.name!r}: no rows of the draw pass its filters")
    return rows


def _init_scratch(recipe: TinyModelRecipe, out: Path) -> None:
    """Tokenizer and a seeded, untrained model saved into ``out``: the trainer starts from there."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from winnow.pipeline.builtin.demo_data import generate_demo

    assert recipe.architecture is not None and recipe.vocab_size is not None  # __post_init__ checked
    tok_rows = generate_demo(recipe.tokenizer_samples or 0, recipe.tokenizer_seed or 0)
    tokenizer = train_tokenizer((render_chat(r["messages"]) for r in tok_rows), recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(llama_config(recipe.architecture, tokenizer))
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    # Stop generation at the end of an assistant turn as well as at end of text.
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_training_data(recipe: TinyModelRecipe, model_dir: Path, path: Path) -> int:
    """The recipe's draw as a parquet in the export format (``input_ids``, ``token_weight``,
    ``loss_mask``); returns the number of rows written.

    ``loss_on="all"``: each rendered chat followed by ``<|endoftext|>``, every token weighing 1 (a base
    model learns the whole text, corrupted rows included). ``"assistant"``: the supervision ingest marks
    (:func:`winnow.core.render.render_batch`); rows it rejects (chat-template text typed into an
    answer) are left out, as a user's training data would be."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from winnow.core.render import RenderError, render_batch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = _draw(recipe)
    if recipe.loss_on == "all":
        eos = tokenizer.convert_tokens_to_ids(EOS)
        texts = [render_chat(r["messages"]) for r in rows]
        ids = [x + [eos] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        masks = [[1] * len(x) for x in ids]
    else:
        rendered = [x for x in render_batch(tokenizer, [r["messages"] for r in rows])
                    if not isinstance(x, RenderError)]  # fmt: skip
        ids = [x.input_ids for x in rendered]
        masks = [x.loss_mask for x in rendered]
    table = pa.table(
        {
            "sample_id": [f"{recipe.name}-{i}" for i in range(len(ids))],
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "token_weight": pa.array(masks, type=pa.list_(pa.float32())),
            "loss_mask": pa.array(masks, type=pa.list_(pa.int8())),
        }
    )
    pq.write_table(table, path)
    return len(ids)


def _train_params(recipe: TinyModelRecipe, model_dir: Path, data: Path, out: Path):
    from winnow.trainer.config import TrainParams

    return TrainParams(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        max_steps=recipe.steps,
        epochs=10_000,  # max_steps ends the run; the cosine schedule spans max_steps
        lr=recipe.lr,
        min_lr_ratio=recipe.min_lr_ratio,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.grad_clip,
        tokens_per_batch=recipe.tokens_per_batch,
        max_seq_len=min(recipe.tokens_per_batch, 1024),
        layout="padded",
        eval_fraction=0.0,  # every row trains; quality is measured on other draws (module docstring)
        save_every=0,
        keep_checkpoints=1,
        seed=recipe.seed,
        device="cpu",  # the same weights whatever accelerator the machine has
        dtype="float32",
        threads=recipe.num_threads,
        log_every=1,
        progress=False,
    )


@contextmanager
def _single_process() -> Iterator[None]:
    """Train in this process alone, also under torchrun: other ranks wait on the build lock, so a
    process group spanning them would never form."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise UserError(
            "a builtin tiny model is missing from the cache and cannot be built inside a running process "
            "group; build it once in a single process first (python -c \"from winnow.pipeline.builtin."
            "tiny_model import builtin_model_path as b; b('tiny')\" for each builtin model you use)"
        )
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def train_recipe(recipe: TinyModelRecipe, out: Path, root: Path | None = None) -> dict[str, Any]:
    """Train ``recipe`` with :func:`winnow.trainer.step.train` into the model directory ``out`` (a
    fine-tune's base comes from the cache under ``root``); returns the training statistics."""
    import torch

    from winnow.pipeline.train import dataset
    from winnow.trainer.step import train

    t0 = time.perf_counter()
    base_dir = build_model(recipe.base, root) if recipe.base is not None else None
    work = out.parent / f"{out.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    threads = torch.get_num_threads()
    try:
        if base_dir is None:
            base_dir = work / "init"
            _init_scratch(recipe, base_dir)
        n_rows = _write_training_data(recipe, base_dir, work / "train.parquet")
        t_setup = time.perf_counter() - t0
        with _single_process():
            p = _train_params(recipe, base_dir, work / "train.parquet", out)
            result = train(p, base_dir, dataset(p, None), out, "train")  # the leaf: a directory and rows in
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    # the final weights are in `out`; the resumable state is of no use to a cached model
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    # the trainer's model card names files of the deleted work folder (the data; a scratch model's init)
    card = (out / "README.md").read_text().replace(str(work / "init"), "a seeded random initialisation")
    (out / "README.md").write_text(card.replace(str(work), f"the {recipe.name} recipe's draw"))
    stats = _stats(out / "metrics.jsonl")
    return stats | {
        "train_rows": n_rows,
        "train_samples": result["counts"]["train_samples"],
        "train_skipped": result.get("train_skipped", {}),
        "setup_seconds": round(t_setup, 2),
        "train_seconds": round(time.perf_counter() - t0 - t_setup, 2),
        "torch_threads": recipe.num_threads,
    }


def _stats(metrics: Path) -> dict[str, Any]:
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    losses = [r["loss"] for r in recs if "loss" in r]
    head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)) :]
    return {
        "train_tokens": sum(r["weighted_tokens"] for r in recs if "loss" in r),
        "loss_first10": sum(head) / len(head),
        "loss_last10": sum(tail) / len(tail),
        "loss_curve": [round(v, 4) for v in losses[:: max(1, len(losses) // 25)]],
    }


def _write_recipe_file(recipe: TinyModelRecipe, out: Path, stats: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    stats["n_params"] = sum(p.numel() for p in model.parameters())  # a tied head counts once
    info = {
        "name": recipe.name,
        "fingerprint": recipe.fingerprint(),
        "code_version": CODE_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "stats": stats,
    }
    atomic_write_json(out / RECIPE_FILE, info)


# ---------------------------------------------------------------------------------- caching


def models_root(root: Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    from winnow.pipeline.builtin.demo_data import cache_dir

    return Path(cache_dir()) / "models"


def build_model(recipe: TinyModelRecipe, root: Path | None = None) -> Path:
    """Directory of ``recipe``'s trained model under ``root`` (default ``cache_dir()/models``); built
    once under a file lock, into a temporary directory renamed into place."""
    base = models_root(root)
    final = base / recipe.dir_name()
    if (final / RECIPE_FILE).is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{recipe.dir_name()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / RECIPE_FILE).is_file():  # another process built it while we waited
            return final
        for stale in base.glob(f".tmp-{recipe.dir_name()}-*"):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = base / f".tmp-{recipe.dir_name()}-{os.getpid()}"
        log.warning("building tiny model %s once into %s (%d steps on CPU)", recipe.name, final, recipe.steps)
        stats = train_recipe(recipe, tmp, root)
        stats["build_seconds"] = round(stats["setup_seconds"] + stats["train_seconds"], 2)
        _write_recipe_file(recipe, tmp, stats)
        fsync_tree(tmp)
        if final.exists():  # incomplete (no recipe file): not written by this code, replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(base)
    return final


def builtin_model_path(name: str) -> Path:
    """Directory of the builtin model ``name`` (see :data:`BUILTIN_MODELS`), building it if needed."""
    if name not in BUILTIN_MODELS:
        raise UserError(f"unknown builtin model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    return build_model(BUILTIN_MODELS[name])
