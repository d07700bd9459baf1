"""Probe: how long must a tiny model train before its own token losses expose wrong answers?

Trains the builtin architecture (or ``--hidden``/``--layers``) from scratch on clean math rows of a
separate draw of the demo generator (seed 555; packed 256-token windows, loss on every token, one
thread), and every ``--every`` steps scores 1,500 held-out rows (seed 777; the clean and wrong-answer
ones) with the model itself:

* ``final_sum_clean``: summed loss (nats) of the digits after ``####`` on clean answers (is the last
  result copied?);
* ``res_digit_clean``: mean loss per digit of equation results on clean answers (arithmetic);
* AUROC, wrong kind against clean: ``wrong_final`` by the summed ``####``-digit loss,
  ``wrong_step_max`` by the largest assistant-token loss, ``wrong_step_mean`` by the mean.

This is what sized the base model of ``benchmarks/quality_models.py`` (table in its docstring).
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


def main() -> None:
    import torch
    from transformers import LlamaForCausalLM

    from winnow.pipeline.builtin import tiny_model as tm
    from winnow.pipeline.builtin.demo_data import generate_demo
    from winnow.pipeline.store import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
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
        batch_size=args.batch_size,
        seq_len=256,
        lr=args.lr,
        warmup_steps=50,
    )
    torch.manual_seed(0)
    tok = tm.train_tokenizer((tm.render_chat(r["messages"]) for r in generate_demo(4000, 101)), 2048)
    model = LlamaForCausalLM(tm.llama_config(arch, tok))
    batches = tm._packed_batches(tok, tm._draw(recipe), recipe, torch.Generator().manual_seed(0))
    held_out = [
        r for r in generate_demo(1500, 777) if r["corruption"] in ("none", "wrong_final_answer", "wrong_step")
    ]
    texts = [tm.render_chat(r["messages"]) for r in held_out]
    kinds = [r["corruption"] for r in held_out]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    t0, losses, curve = time.time(), [], []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = tm._lr_at(step, recipe)
        loss = model(**next(batches), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % args.every and step + 1 != args.steps:
            continue
        model.eval()
        feats = [sample_features(model, tok, t) for t in texts]
        digits = [
            d
            for t, k in zip(texts, kinds, strict=True)
            if k == "none"
            for d in result_digit_losses(model, tok, t)
        ]
        model.train()
        by_kind: dict[str, list[tuple[float, float, float]]] = {}
        for f, k in zip(feats, kinds, strict=True):
            by_kind.setdefault(k, []).append(f)

        def col(kind: str, j: int, by_kind=by_kind) -> list[float]:
            return [f[j] for f in by_kind[kind]]

        point = {
            "step": step + 1,
            "seconds": round(time.time() - t0, 1),
            "train_loss": round(float(np.mean(losses[-50:])), 4),
            "final_sum_clean": round(float(np.mean(col("none", 0))), 4),
            "res_digit_clean": round(float(np.mean(digits)), 4),
            "wrong_final": round(auroc(col("wrong_final_answer", 0), col("none", 0)), 3),
            "wrong_step_max": round(auroc(col("wrong_step", 1), col("none", 1)), 3),
            "wrong_step_mean": round(auroc(col("wrong_step", 2), col("none", 2)), 3),
        }
        curve.append(point)
        print(" ".join(f"{k}={v}" for k, v in point.items()), flush=True)
    out = Path(__file__).parent / "out" / f"probe_training_length_h{args.hidden}.json"
    atomic_write_json(out, {"args": vars(args), "curve": curve})


if __name__ == "__main__":
    main()
