"""What the builtin tiny models learned, on a held-out draw of the demo generator (nats per token).

For ``tiny``, ``tiny-reference`` and ``tiny-warm``: the mean NLL of the supervised (assistant) tokens of
clean rows, rows with junk spans and off-topic rows. For the cDPO pair: negative minus positive NLL on
the answer digits after ``####``, on clean rows (should be > 0) and on wrong-final-answer rows (< 0).
These are the numbers the ``tiny_model`` module docstring quotes.

    python benchmarks/tiny_model_quality.py                      # the builtin models (built if needed)
    python benchmarks/tiny_model_quality.py --model tiny=DIR ... # other directories for some roles

One intra-op thread (see the tiny_model docstring). The draw (seed 9191) is trained on by no recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELD_OUT_SEED = 9191
KINDS = {"clean": ("none",), "junk": ("junk_span",), "off_topic": ("off_topic",), "wrong": ("wrong_final_answer",)}
ROLES = ("tiny", "tiny-reference", "tiny-warm", "tiny-positive", "tiny-negative")


def per_row_nll(model, tok, rows: list[dict], batch: int = 32) -> list[tuple]:
    """Per row: (NLL of each target 1..T-1, supervised mask, ``####``-answer mask), from one batched
    forward with right padding and an attention mask."""
    import torch

    from winnow.core.render import render_sample

    items = []
    for r in rows:
        rendered = render_sample(tok, r["messages"])
        text = rendered.text
        start, end = text.rfind("####") + 4, text.rindex("<|im_end|>")
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        answer = [int(start >= 4 and a >= start and b <= end) for a, b in offsets]
        items.append((rendered.input_ids, rendered.loss_mask, answer))
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        width = max(len(ids) for ids, _, _ in chunk)
        x = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(x)
        for row, (ids, _, _) in enumerate(chunk):
            x[row, : len(ids)] = torch.tensor(ids)
            attn[row, : len(ids)] = 1
        with torch.no_grad():
            logp = model(input_ids=x, attention_mask=attn, use_cache=False).logits.double().log_softmax(-1)
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
        for row, (ids, mask, answer) in enumerate(chunk):
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            out.append((nll[row, : len(ids) - 1], keep, torch.tensor(answer[1:], dtype=torch.bool) & keep))
    return out


def mean_nll(per: list[tuple], answer_only: bool) -> float:
    masks = [a if answer_only else k for _, k, a in per]
    n = sum(int(m.sum()) for m in masks)
    return sum(float(v[m].sum()) for (v, _, _), m in zip(per, masks, strict=True)) / max(n, 1)


def measure(dirs: dict[str, Path], n_rows: int = 3000, per_kind: int = 120) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winnow.core.render import RenderError, render_batch
    from winnow.pipeline.builtin.demo_data import generate_demo

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(dirs["tiny"])
    rows = generate_demo(n_rows, HELD_OUT_SEED)
    ok = [r for r, x in zip(rows, render_batch(tok, [r["messages"] for r in rows]), strict=True)
          if not isinstance(x, RenderError)]  # fmt: skip
    subsets = {k: [r for r in ok if r["corruption"] in v][:per_kind] for k, v in KINDS.items()}
    res: dict[str, float] = {f"n_{k}": len(v) for k, v in subsets.items()}
    for role in ROLES:
        model = AutoModelForCausalLM.from_pretrained(dirs[role], dtype=torch.float32).eval()
        subs = ("clean", "junk", "off_topic") if role in ROLES[:3] else ("clean", "wrong")
        for sub in subs:
            per = per_row_nll(model, tok, subsets[sub])
            res[f"{role}/{sub}"] = mean_nll(per, answer_only=False)
            if role in ROLES[3:]:
                res[f"{role}/{sub}/answer"] = mean_nll(per, answer_only=True)
    for sub in ("clean", "wrong"):
        res[f"neg_minus_pos/{sub}/answer"] = (
            res[f"tiny-negative/{sub}/answer"] - res[f"tiny-positive/{sub}/answer"]
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="ROLE=DIR (default: the builtin model)")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    given = dict(s.split("=", 1) for s in args.model)
    dirs = {}
    for role in ROLES:
        if role in given:
            dirs[role] = Path(given[role])
        else:
            from winnow.pipeline.builtin.tiny_model import builtin_model_path

            dirs[role] = builtin_model_path(role)
    res = measure(dirs)
    print(f"held-out draw seed {HELD_OUT_SEED}: " + ", ".join(f"{k[2:]} {int(v)}" for k, v in res.items()
                                                               if k.startswith("n_")))
    print(f"{'model':16s} {'clean':>7s} {'junk':>7s} {'off-topic':>9s}")
    for role in ROLES[:3]:
        print(f"{role:16s} {res[role + '/clean']:7.3f} {res[role + '/junk']:7.3f} {res[role + '/off_topic']:9.3f}")
    print(
        f"cDPO, negative - positive on '####' digits: clean {res['neg_minus_pos/clean/answer']:+.3f}, "
        f"wrong final answer {res['neg_minus_pos/wrong/answer']:+.3f}"
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
