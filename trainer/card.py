"""The model card ``README.md`` written beside the weights in ``--out`` (issue 28 item 3).

Built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``, so the Hub reads its metadata:
``base_model`` (the model spec the user gave), ``library_name`` (``peft`` for a LoRA or prompt-tuning
adapter, ``transformers`` for full weights), ``datasets`` (the export's file name, or the run and
selection). The card is published with the weights, so no absolute path of the training machine appears
in it: a path becomes its last component, in the text and in the configuration block.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def public(value: Any) -> Any:
    """``value`` with every absolute path (string) replaced by its last component, recursively."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name or value
    return value


def _data(src: dict[str, Any]) -> tuple[str, list[str]]:
    """The card's data line and its ``datasets`` metadata."""
    if "data" in src:
        name = public(str(src["data"]))
        return f"export `{name}` (sha256 {src['data_sha256']})", [name]
    if "run" in src:
        run = public(str(src["run"]))
        line = f"run `{run}`, selection `{src['selection']}` (digest `{src['selection_digest']}`)"
        return line, [f"{run}/selection_{src['selection']}"]
    # a caller of the trainer's leaf with rows of its own
    return f"{src.get('samples', 'some')} samples given to the trainer directly", []


def model_card(info: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    src = info["source"]
    data_line, datasets = _data(src)
    base = public(str(info["base_model"]))
    meta = ModelCardData(
        base_model=base,
        library_name="peft" if info.get("adapter") else "transformers",
        datasets=datasets or None,
        tags=["winnow", "token-weighted-sft"],
    )
    evals = info.get("evals", {})
    first = evals.get(0)
    last = evals.get(max(evals)) if evals else None
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    body = [
        f"# {info['name']}",
        "",
        f"Fine-tuned by `winnow train` from `{base}` (weights fingerprint `{info['base_fingerprint']}`).",
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
        json.dumps(public(info["config"]), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return str(ModelCard("---\n" + meta.to_yaml() + "\n---\n\n" + "\n".join(body)))
