"""Probe: how long must a tiny model train before its own token losses expose wrong answers?

Trains the builtin architecture (or ``--hidden``/``--layers``) from scratch on clean math rows of a
separate draw of the demo generator (seed 555; winnow's trainer with the builtin builder's settings:
whole samples, loss on every token, one thread), saving a checkpoint every ``--every`` steps, and then
scores 1,500 held-out rows (seed 777; the clean and wrong-answer ones) with each checkpoint:

* ``final_sum_clean``: summed loss (nats) of the digits after ``####`` on clean answers (is the last
  result copied?);
* ``res_digit_clean``: mean loss per digit of equation results on clean answers (arithmetic);
* AUROC, wrong kind against clean: ``wrong_final`` by the summed ``####``-digit loss,
  ``wrong_step_max`` by the largest assistant-token loss, ``wrong_step_mean`` by the mean.

This is what sized the base model of ``benchmarks/quality_models.py`` (table in its docstring; measured
with the builder's own loop on 8 x 256-token windows before the builder moved to the trainer).
Run: ``python benchmarks/probe_training_length.py [--steps 4000] [--every 500]``; prints one line per
checkpoint and writes ``benchmarks/out/probe_training_length_h<hidden>.json``.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np


def auroc(pos, neg) -> float:
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(wins / (len(pos) * len(neg)))


def sample_features(model, tok, text: str) -> tuple[float, float, float]:
    """(summed loss of the #### digits, max and mean loss over assistant tokens) of one chat."""
    import torch

    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    nll = -logp.gather(1, ids[0, 1:, None])[:, 0].numpy()  # nll[i - 1] is the loss of token i
    head = "<|im_start|>assistant\n"
    start, final = text.index(head) + len(head), text.index("####")
    final_sum, assistant = 0.0, []
    for i, (a, b) in enumerate(enc["offset_mapping"][1:], start=1):
        if a < start:
            continue
        assistant.append(nll[i - 1])
        if a >= final and text[a:b].strip().isdigit():
            final_sum += nll[i - 1]
    return final_sum, float(max(assistant)), float(np.mean(assistant))


def result_digit_losses(model, tok, text: str) -> list[float]:
    """Loss of every digit token of an equation result (after '= ') before the #### line."""
    import torch

    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    nll = -logp.gather(1, ids[0, 1:, None])[:, 0].numpy()
    body = text[: text.index("####")]
    chars = {c for m in re.finditer(r"= (\d+)", body) for c in range(m.start(1), m.end(1))}
    return [
        float(nll[i - 1])
        for i, (a, b) in enumerate(enc["offset_mapping"][1:], start=1)
        if text[a:b].strip().isdigit() and b - 1 in chars
    ]


def _checkpoint_model(init_dir: Path, ckpt: Path):
    """The model of one trainer checkpoint (weights saved under the loss module's ``model.`` prefix)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    state = {k.removeprefix("model."): v for k, v in load_file(ckpt / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head may be absent: it is the embedding
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model ({missing}, {unexpected})")
    return model.eval()


def _score(model, tok, texts: list[str], kinds: list[str]) -> dict[str, float]:
    feats = [sample_features(model, tok, t) for t in texts]
    digits = [
        d for t, k in zip(texts, kinds, strict=True) if k == "none" for d in result_digit_losses(model, tok, t)
    ]
    by_kind: dict[str, list[tuple[float, float, float]]] = {}
    for f, k in zip(feats, kinds, strict=True):
        by_kind.setdefault(k, []).append(f)

    def col(kind: str, j: int) -> list[float]:
        return [f[j] for f in by_kind[kind]]

    return {
        "final_sum_clean": round(float(np.mean(col("none", 0))), 4),
        "res_digit_clean": round(float(np.mean(digits)), 4),
        "wrong_final": round(auroc(col("wrong_final_answer", 0), col("none", 0)), 3),
        "wrong_step_max": round(auroc(col("wrong_step", 1), col("none", 1)), 3),
        "wrong_step_mean": round(auroc(col("wrong_step", 2), col("none", 2)), 3),
    }


def main() -> None:
    import dataclasses
    import json
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from winnow.core.store import atomic_write_json
    from winnow.pipeline.builtin import tiny_model as tm
    from winnow.pipeline.builtin.demo_data import generate_demo
    from winnow.pipeline.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--tokens-per-batch", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    arch = tm.Architecture(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(4, args.hidden // 64),
        num_kv_heads=max(2, args.hidden // 128),
        intermediate_size=int(args.hidden * 2.75),
    )
    recipe = tm.TinyModelRecipe(
        name="probe",
        architecture=arch,
        vocab_size=2048,
        tokenizer_seed=101,
        tokenizer_samples=4000,
        data_seed=555,
        data_samples=40000,
        corruptions=("none", "near_duplicate"),
        steps=args.steps,
        tokens_per_batch=args.tokens_per_batch,
        lr=args.lr,
        warmup_steps=50,
    )
    held_out = [
        r for r in generate_demo(1500, 777) if r["corruption"] in ("none", "wrong_final_answer", "wrong_step")
    ]
    texts = [tm.render_chat(r["messages"]) for r in held_out]
    kinds = [r["corruption"] for r in held_out]
    with tempfile.TemporaryDirectory() as work:
        init, data, out = Path(work) / "init", Path(work) / "train.parquet", Path(work) / "out"
        tm._init_scratch(recipe, init)
        tm._write_training_data(recipe, init, data)
        p = dataclasses.replace(
            tm._train_params(recipe, init, data, out),
            save_every=args.every,
            keep_checkpoints=args.steps // args.every + 1,
        )
        t0 = time.time()
        train(p)
        seconds = round(time.time() - t0, 1)
        tok = AutoTokenizer.from_pretrained(init)
        losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r}
        curve = []
        for ckpt in sorted((out / "checkpoints").glob("step-*")):
            step = int(ckpt.name.split("-")[1])
            window = [losses[s] for s in range(max(1, step - 49), step + 1)]
            point = {"step": step, "train_seconds_total": seconds, "train_loss": round(float(np.mean(window)), 4)}
            point |= _score(_checkpoint_model(init, ckpt), tok, texts, kinds)
            curve.append(point)
            print(" ".join(f"{k}={v}" for k, v in point.items()), flush=True)
    out_path = Path(__file__).parent / "out" / f"probe_training_length_h{args.hidden}.json"
    atomic_write_json(out_path, {"args": vars(args), "curve": curve})


if __name__ == "__main__":
    main()
