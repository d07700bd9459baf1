"""The data card's training section: every `winnow train` of the run, compared like with like (issue 28).

A held-out loss is only comparable on the same held-out samples, so each training's row names its split
(``eval_where: <condition>`` or ``eval_fraction: <share>``, as the recipe or ``--set`` chose it), and the
"return on curation" chart puts on one axis only the trainings of one named split: the split most of the
run's trainings share (the others are listed under it). Its x axis is the share of the run's supervised
tokens the training's selection weights, the number the selection's own section prints (``sum(n_weighted) /
sum(n_supervised)`` over ``selection/<name>``; 1 for ``--selection all`` without a ``selection/all``
table); its y axis the eval_loss after training, with the model before training as a dashed line where
every training on the split started from the same one. Trainings with an online policy select again per
mini-batch, so their offline share is not what they trained on: they are left off the chart, named.

``training.png`` draws one panel per training (its weighted train loss and its eval_loss points), so
curves of different runs and splits never share axes or a legend.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from winnow.core.markdown import md_table
from winnow.core.views import view_name


def held_out_split(config: dict[str, Any]) -> str:
    """The held-out split a training's eval_loss is over, as its parameters name it."""
    if config.get("eval_where"):
        return f"eval_where: {config['eval_where']}"
    return f"eval_fraction: {config.get('eval_fraction', 0.05)}"


def kept_share(card: Any, selection: str) -> float | None:
    """Share of the run's supervised tokens the selection weights (``None``: no such selection view)."""
    view = view_name(f"selection/{selection}")
    if not card.has(view):
        return 1.0 if selection == "all" else None
    weighted, supervised = card.q(f"select sum(n_weighted)::double, sum(n_supervised)::double from {view}")[0]
    return weighted / supervised if supervised else None


def _rows(card: Any) -> list[dict[str, Any]]:
    out = []
    for key, e in sorted(card.man.get("steps", {}).items()):
        if e.get("step") != "train":
            continue
        config = e.get("config") or {}
        selection = config.get("selection") or "all"
        out.append(
            {
                "key": key,
                "entry": e,
                "split": held_out_split(config),
                "selection": selection,
                "share": kept_share(card, selection),
                "online": config.get("online") not in (None, "none"),
                "metrics": card.run.root / str(e.get("out", "")) / "metrics.jsonl",
            }
        )
    return out


def section(card: Any) -> None:
    """Append the training table, ``training.png`` and the return-on-curation chart to the card."""
    rows = _rows(card)
    if not rows:
        return
    header = ["run", "steps", "eval_loss before", "eval_loss after", "held-out split", "selection"]
    header += ["kept token share", "model"]
    table = [
        [r["key"], r["entry"].get("steps"), r["entry"].get("eval_loss_before"), r["entry"].get("eval_loss")]
        + [r["split"], r["selection"], "online" if r["online"] else r["share"], r["entry"].get("out")]
        for r in rows
    ]
    card.md += ["## Training", "", md_table(header, table), ""]
    card.md += ["eval_loss is over every supervised token of the held-out split named in its row.", ""]
    card.md += card.plot(_curves(rows), "training.png", "Training and held-out loss per step, one panel each")
    _return_on_curation(card, rows)


def _curves(rows: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    cols = min(3, len(rows))
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.0 * n_rows), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.remove()
    for ax, r in zip(axes.flat, rows, strict=False):
        path = r["metrics"]
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        train = [(x["step"], x["loss"]) for x in lines if "loss" in x]
        evals = [(x["step"], x["eval_loss"]) for x in lines if x.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train, strict=True), lw=1, label="train (weighted)")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval (all supervised)")
        ax.set_title(f"{r['key']}\n{r['split']}", fontsize=8)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("loss (nats/token)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _return_on_curation(card: Any, rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    split, _ = Counter(r["split"] for r in rows).most_common(1)[0]
    on = [r for r in rows if r["split"] == split and not r["online"] and r["share"] is not None]
    on = [r for r in on if r["entry"].get("eval_loss") is not None]
    off = [r["key"] for r in rows if r not in on]
    card.md += ["### Return on curation", "", f"Held-out split: `{split}`.", ""]
    if not on:
        card.md += ["No training on this split has a selection share and an eval_loss to plot.", ""]
        return
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for r in on:
        ax.plot(r["share"], r["entry"]["eval_loss"], "o", color="C0")
        ax.annotate(r["selection"], (r["share"], r["entry"]["eval_loss"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    before = {r["entry"].get("eval_loss_before") for r in on}
    if len(before) == 1 and None not in before:
        ax.axhline(before.pop(), ls="--", lw=1, color="grey", label="before training")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlim(0.0, 1.05)  # the whole range: how much was dropped is the point
    ax.set_xlabel("share of supervised tokens kept")
    ax.set_ylabel("eval_loss after training")
    ax.set_title(split, fontsize=8)
    table = [[r["key"], r["selection"], r["share"], r["entry"]["eval_loss"]] for r in on]
    card.md += [md_table(["run", "selection", "kept token share", "eval_loss after"], table), ""]
    if off:
        card.md += [
            f"Not on the chart (another split, an online policy, or no eval_loss): {', '.join(off)}.",
            "",
        ]
    card.md += card.plot(fig, "return_on_curation.png", f"eval_loss against kept token share on {split}")
