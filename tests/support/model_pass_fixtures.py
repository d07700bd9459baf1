"""Tiny models, tokenizers and samples tables for the model-pass tests (built in well under a second).

Weights use a large init range (0.8 instead of 0.02) so predictions are far from uniform: with the
default init every log-prob is about -ln V and an off-by-one shift would still pass an exactness test.
Models are saved with ``save_pretrained`` (safetensors) beside their tokenizer, exactly as a user's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from winnow.core.store import RunDir

VOCAB = 384


def make_tokenizer(vocab: int = VOCAB, word: str = "w"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"{word}{i}": i for i in range(vocab - 2)}
    words["<pad>"], words["<eos>"] = vocab - 2, vocab - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_config(arch: str = "llama", vocab: int = VOCAB, **over):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    base = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.8,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        bos_token_id=None,
    )
    if arch == "qwen2":  # biases on q/k/v, a sliding window on the last layer small enough to bite
        base |= dict(use_sliding_window=True, sliding_window=7, max_window_layers=1)
    if arch == "qwen3":
        base |= dict(head_dim=16)  # q_norm/k_norm per head
    base |= over
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    return cls(**base)


def make_model_dir(
    root: Path, arch: str = "llama", seed: int = 0, vocab: int = VOCAB, word: str = "w", **over
) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, vocab, **over))
    out = Path(root) / f"{arch}-{seed}"
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(vocab, word).save_pretrained(out)
    return out


def random_samples(n: int, seed: int = 0, lo: int = 3, hi: int = 90, vocab: int = VOCAB):
    """Mixed lengths; each sample has a prompt then a response (loss_mask 1), some a second turn."""
    rng = np.random.default_rng(seed)
    seqs, masks = [], []
    for i in range(n):
        L = int(rng.integers(lo, hi))
        ids = rng.integers(0, vocab - 2, size=L).astype(np.int32)
        mask = np.zeros(L, np.uint8)
        p = int(rng.integers(1, max(2, L // 2)))
        mask[p:] = 1
        if i % 3 == 0 and L > 8:  # a second user turn inside the response
            a = p + (L - p) // 2
            mask[a : a + 2] = 0
        seqs.append(ids)
        masks.append(mask)
    return seqs, masks


def write_samples(run_dir: Path, seqs, masks, model_dir: Path, shards: int = 1) -> RunDir:
    """A samples table as ingest writes it (the columns a model pass reads), fingerprinting the tokenizer
    that ``AutoTokenizer`` loads from ``model_dir`` as ingest does (transformers picks the tokenizer class
    from the model type, so the same files can tokenize differently under another architecture)."""
    from winnow.core.models import load_tokenizer, tokenizer_fingerprint

    fp = tokenizer_fingerprint(load_tokenizer(model_dir))
    run = RunDir(run_dir, create=True)
    bounds = np.linspace(0, len(seqs), shards + 1).astype(int)
    for part in range(shards):
        a, b = bounds[part], bounds[part + 1]
        tbl = pa.table(
            {
                "sample_id": [f"s{i:04d}" for i in range(a, b)],
                "input_ids": pa.array([x.tolist() for x in seqs[a:b]], type=pa.list_(pa.int32())),
                "loss_mask": pa.array([m.tolist() for m in masks[a:b]], type=pa.list_(pa.uint8())),
                "n_tokens": pa.array([len(x) for x in seqs[a:b]], type=pa.int32()),
                "n_loss_tokens": pa.array([int(m.sum()) for m in masks[a:b]], type=pa.int32()),
            }
        ).replace_schema_metadata({"winnow.tokenizer_fingerprint": fp})
        run.table("samples").write(part, tbl, fingerprint="t")
    return run


def reference(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpacked, unchunked Hugging Face fp32 forward of one sample: log p(x_i|x_<i) and entropy at i>=1
    (float64 from fp32 logits)."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False).logits[0]
    logp = logits.double().log_softmax(-1)  # (L, V)
    x = torch.as_tensor(ids, dtype=torch.long)
    lp = logp[:-1].gather(-1, x[1:, None]).squeeze(-1)
    ent = -(logp[:-1].exp() * logp[:-1]).sum(-1)
    return lp.numpy(), ent.numpy()
