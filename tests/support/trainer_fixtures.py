"""Tiny random Llama models and weighted samples for the trainer tests (built in the test, no cache)."""

from __future__ import annotations

import numpy as np
import torch


def tiny_llama(vocab: int = 300, tied: bool = False, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger than the init's 0.02 so logits and gradients are not all tiny
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def weighted_samples(n: int, vocab: int = 300, seed: int = 0, lo: int = 3, hi: int = 40):
    """Random ids and fractional weights with zeros (prompt-like zero prefixes, zero tails, zero rows)."""
    rng = np.random.default_rng(seed)
    ids, ws = [], []
    for k in range(n):
        L = int(rng.integers(lo, hi))
        x = rng.integers(3, vocab, L)
        w = rng.uniform(0.0, 2.0, L).astype(np.float32)
        w[rng.uniform(size=L) < 0.3] = 0.0
        w[: int(rng.integers(0, L))] = 0.0  # a prompt
        if k % 3 == 0:
            w[L // 2 :] = 0.0  # a zero tail to trim
        if k % 7 == 5:
            w[:] = 0.0  # nothing to train on
        ids.append(x)
        ws.append(w)
    return ids, ws


def model_dir(path, tied: bool = True, seed: int = 0):
    """A saved tiny Llama with the chatml test tokenizer (vocabulary 802): what --model accepts."""
    from tokenizers_fixtures import make_tokenizer

    tok = make_tokenizer("chatml")
    model = tiny_llama(vocab=len(tok), tied=tied, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)  # a milder start than tiny_llama's: training should visibly lower the loss
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def export_parquet(path, n: int = 60, vocab: int = 802, seed: int = 0):
    """An export-like parquet: sample_id, input_ids, token_weight, loss_mask."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, ws = weighted_samples(n, vocab=vocab, seed=seed, lo=6, hi=60)
    rng = np.random.default_rng(seed + 1)
    for x in ids:  # learnable: arithmetic runs over a few hundred ids
        x[:] = 3 + (rng.integers(0, 200) + rng.integers(1, 4) * np.arange(len(x))) % 300
    ids[0][-1] = vocab - 1  # the largest id occurs
    rows = {
        "sample_id": [f"s{k:04d}" for k in range(n)],
        "input_ids": [x.tolist() for x in ids],
        "token_weight": [w.tolist() for w in ws],
        "loss_mask": [(np.arange(len(x)) >= len(x) // 3).astype(np.uint8).tolist() for x in ids],
    }
    pq.write_table(pa.table(rows), path)
    return path


def synthetic_run(root, model_path, n_shards: int = 2, per_shard: int = 20, seed: int = 0):
    """A run whose samples/ carry the test tokenizer's fingerprint (no ingest: ~0.1 s)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from winnow.core.render import tokenizer_fingerprint
    from winnow.core.store import RunDir

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(model_path)))
    run = RunDir(root, create=True)
    ids, ws = weighted_samples(n_shards * per_shard, vocab=802, seed=seed, lo=6, hi=50)
    for part in range(n_shards):
        rows = range(part * per_shard, (part + 1) * per_shard)
        mask = [(ws[i] > 0).astype(np.uint8).tolist() for i in rows]
        n = [len(ids[i]) for i in rows]
        t = pa.table(
            {
                "sample_id": pa.array([f"p{part}-{i:03d}" for i in rows]),
                "source": pa.array(["synthetic"] * per_shard),
                "row": pa.array(list(rows), type=pa.int64()),
                "messages": pa.array(["[]"] * per_shard),
                "text": pa.array([""] * per_shard),
                "input_ids": pa.array([ids[i].tolist() for i in rows], type=pa.list_(pa.int32())),
                "offsets": pa.array([[0] * k for k in n], type=pa.list_(pa.int32())),
                "loss_mask": pa.array(mask, type=pa.list_(pa.uint8())),
                "n_tokens": pa.array(n, type=pa.int32()),
                "n_loss_tokens": pa.array([sum(m) for m in mask], type=pa.int32()),
                "meta_clean": pa.array([i % 4 != 0 for i in rows]),
            }
        )
        t = t.replace_schema_metadata({b"winnow.tokenizer_fingerprint": fp.encode()})
        run.table("samples").write(part, t, fingerprint="synthetic", inputs={})
    return run


def train_cli(model, data, out, sets, kill_after: int = 0):
    """`winnow train --data DATA --model MODEL --out OUT --set ...` through the console script; with
    ``kill_after`` the run is killed after that many steps (WINNOW_FAULT_KILL_AFTER_STEPS)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "winnow")
    args = [exe, "train", "--data", str(data), "--model", str(model), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ, WINNOW_PROGRESS="0")
    if kill_after:
        env["WINNOW_FAULT_KILL_AFTER_STEPS"] = str(kill_after)
    return subprocess.run(args, env=env, capture_output=True, text=True)


def metrics_without_timings(out) -> list[dict]:
    """``OUT/metrics.jsonl`` rows without the wall-clock fields, which differ between two equal runs."""
    import json
    from pathlib import Path

    drop = ("tokens_per_s", "weighted_tokens_per_s", "step_s", "peak_rss_mb")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]
