"""The model card ``README.md`` written beside the weights in ``--out``."""

from __future__ import annotations

import json
from typing import Any


def model_card(info: dict[str, Any]) -> str:
    src = info["source"]
    if "data" in src:
        data_line = f"export `{src['data']}` (sha256 {src['data_sha256']})"
    elif "run" in src:
        data_line = f"run `{src['run']}`, selection `{src['selection']}` (digest `{src['selection_digest']}`)"
    else:  # a caller of the trainer's leaf with rows of its own
        data_line = f"{src.get('samples', 'some')} samples given to the trainer directly"
    evals = info.get("evals", {})
    first = evals.get(0)
    last = evals.get(max(evals)) if evals else None
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        "---",
        "library_name: transformers",
        "tags: [winnow, token-weighted-sft]",
        "---",
        "",
        f"# {info['name']}",
        "",
        f"Fine-tuned by `winnow train` from `{info['base_model']}` ({info['base_path']}, weights "
        f"fingerprint `{info['base_fingerprint']}`).",
        "",
        "## Data",
        "",
        f"- source: {data_line}",
        f"- samples: {src['samples']}, kept: {src['kept']}, trained on: {src['train_samples']} "
        f"(skipped: {src['train_skipped'] or 'none'})",
        f"- weighted target tokens: {src['weighted_tokens']}, weight sum {src['weight_sum']:.1f}",
        f"- held-out split ({src['eval_split']}): {src['held_out']} samples, {src['eval_samples']} scored",
        "",
        "## Result",
        "",
        f"- steps: {info['steps']}, eval_loss (mean over every supervised held-out token, weight 1): "
        f"{fmt(first)} before training, {fmt(last)} after",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(info["config"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)
