"""`winnow show RUN SAMPLE_ID`: one sample as its tokens, each coloured by the weight a selection gives it
or by a stage's token score, dropped tokens struck through; in the terminal (rich) and as a
self-contained HTML page.

A token's text is its span of the rendered chat, ``text[offsets[i]:offsets[i + 1]]`` (ingest tokenizes the
render once and keeps each token's character start), so the spans partition the text: the page shows every
character once, template and role headers included, and needs no tokenizer. Prompt and template tokens
(``loss_mask = 0``) are grey: nothing trains on them. A supervised token is *dropped* when the selection
gives it weight 0 (or, with ``--score`` alone, when the stage's ``token_keep`` is false).

Everything is read from the run's tables: the sample's shard is found by scanning the ``sample_id``
column only, then the same shard of the selection and score tables is read and matched by ``sample_id``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from winnow.pipeline.store import RunDir, UserError, atomic_write_bytes

SCORE_COLUMNS = ("token_score", "token_p_ce", "token_criticality", "rel")  # first present is shown


@dataclass(kw_only=True)
class SampleView:
    """What `show` draws: one sample's token spans and the per-token values chosen to colour them."""

    sample_id: str
    pieces: list[str]
    token_ids: list[int]
    loss_mask: list[int]
    weight: list[float] | None = None  # the selection's token_weight
    score: list[float | None] | None = None  # a stage's per-token score
    keep: list[bool | None] | None = None  # the stage's token_keep
    title: list[str] = field(default_factory=list)  # lines about the sample (keep, reason, policy)
    score_name: str = ""

    def dropped(self, i: int) -> bool:
        if not self.loss_mask[i]:
            return False
        if self.weight is not None:
            return self.weight[i] == 0
        return self.keep is not None and self.keep[i] is False


def _find_row(run: RunDir, table: str, part: int, sample_id: str, columns: list[str] | None = None) -> dict:
    t = run.table(table)
    if t.record(part) is None:
        raise UserError(f"{table} has no committed shard {part} in {run.root}: run the step that writes it")
    ids = t.read_part(part, ["sample_id"])["sample_id"]
    hits = pc.index(ids, sample_id).as_py()
    if hits < 0:
        raise UserError(f"sample {sample_id!r} is not in {table} (shard {part}) of {run.root}")
    return t.read_part(part, columns).slice(hits, 1).to_pylist()[0]


def _locate(run: RunDir, sample_id: str) -> int:
    samples = run.table("samples")
    if not samples.exists():
        raise UserError(f"{run.root} has no samples table: run `winnow ingest` first")
    for rec in samples.records():
        ids = samples.read_part(rec.part, ["sample_id"])["sample_id"]
        if pc.index(ids, sample_id).as_py() >= 0:
            return rec.part
    raise UserError(f"sample {sample_id!r} is not in {run.root}/samples (see `winnow inspect` for ids)")


def _pieces(text: str, offsets: list[int]) -> list[str]:
    ends = [*offsets[1:], len(text)]
    return [text[a:b] for a, b in zip(offsets, ends, strict=True)]


def _score_column(run: RunDir, stage: str) -> tuple[str, str]:
    table, _, column = f"scores/{stage}".partition(":")
    schema = run.table(table).schema()
    if schema is None:
        raise UserError(f"{run.root} has no {table} table: run `winnow score RUN {stage.split(':')[0]}`")
    if column:
        if column not in schema.names:
            raise UserError(f"{table} has no column {column!r}; it has {', '.join(schema.names)}")
        return table, column
    for c in SCORE_COLUMNS:
        if c in schema.names:
            return table, c
    raise UserError(f"{table} has no per-token score ({', '.join(SCORE_COLUMNS)}); name one as STAGE:COLUMN")


def load_view(
    run: RunDir, sample_id: str, selection: str | None = None, score: str | None = None
) -> SampleView:
    part = _locate(run, sample_id)
    s = _find_row(run, "samples", part, sample_id, ["sample_id", "text", "input_ids", "offsets", "loss_mask"])
    view = SampleView(
        sample_id=sample_id,
        pieces=_pieces(s["text"], s["offsets"]),
        token_ids=s["input_ids"],
        loss_mask=s["loss_mask"],
    )
    if selection:
        if not run.table(f"selection/{selection}").exists():
            raise UserError(
                f"{run.root} has no selection {selection!r}: run `winnow select RUN ... --name {selection}`"
            )
        sel = _find_row(run, f"selection/{selection}", part, sample_id)
        view.weight = sel["token_weight"]
        view.title.append(
            f"selection {selection}: keep={sel['keep']} reason={sel['reason']} policy={sel['policy']}"
        )
    if score:
        table, column = _score_column(run, score)
        row = _find_row(run, table, part, sample_id)
        view.score, view.score_name = row[column], f"{table}.{column}"
        view.keep = row.get("token_keep")
        view.title.append(f"score {view.score_name}" + (f": keep={row['keep']}" if "keep" in row else ""))
    return view


def _shade(view: SampleView, i: int, top: float) -> float:
    """0..1: how strongly token i is coloured (its weight, else its score, over the sample's maximum)."""
    values = view.weight if view.weight is not None else view.score
    if values is None or not view.loss_mask[i] or values[i] is None or not top:
        return 0.0
    v = float(values[i])
    return max(0.0, min(1.0, v / top)) if math.isfinite(v) else 0.0


def _top(view: SampleView) -> float:
    values = view.weight if view.weight is not None else view.score
    finite = [
        abs(float(v)) for v, m in zip(values or [], view.loss_mask, strict=False) if m and v is not None
    ]
    finite = [v for v in finite if math.isfinite(v)]
    return max(finite, default=0.0)


def render_terminal(view: SampleView, console: Any) -> None:
    from rich.text import Text

    top = _top(view)
    out = Text()
    for i, piece in enumerate(view.pieces):
        if not view.loss_mask[i]:
            style = "grey50"
        elif view.dropped(i):
            style = "strike red"
        else:
            g = int(60 + 150 * _shade(view, i, top))
            style = f"black on rgb({255 - g // 2},255,{255 - g})"
        out.append(piece, style=style)
    console.print(f"[bold]{view.sample_id}[/bold]  " + "  ".join(view.title), highlight=False)
    console.print(out)
    console.print(_legend_text(view), highlight=False)


def _legend_text(view: SampleView) -> str:
    what = "weight" if view.weight is not None else (view.score_name or "loss mask")
    n_sup = sum(1 for m in view.loss_mask if m)
    n_drop = sum(1 for i in range(len(view.pieces)) if view.dropped(i))
    return f"grey: not supervised; shade: {what}; struck through: dropped ({n_drop} of {n_sup} supervised tokens)"


def _attr(v: Any) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _span(view: SampleView, i: int, top: float) -> str:
    attrs = {
        "data-pos": i,
        "data-token-id": view.token_ids[i],
        "data-loss-mask": view.loss_mask[i],
        "data-weight": _attr(view.weight[i]) if view.weight is not None else None,
        "data-score": _attr(view.score[i]) if view.score is not None else None,
        "data-keep": _attr(view.keep[i]) if view.keep is not None else None,
    }
    cls = "tok prompt" if not view.loss_mask[i] else ("tok dropped" if view.dropped(i) else "tok")
    style = "" if not view.loss_mask[i] or view.dropped(i) else f' style="--w:{_shade(view, i, top):.3f}"'
    rendered = " ".join(f'{k}="{html.escape(str(v))}"' for k, v in attrs.items() if v is not None)
    return f'<span class="{cls}" {rendered}{style}>{html.escape(view.pieces[i])}</span>'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; border: 1px solid #ccc;
        padding: 1rem; border-radius: 6px; }
.tok { background: rgba(34, 160, 70, calc(0.12 + 0.7 * var(--w, 0))); border-radius: 2px;
       box-shadow: inset -1px 0 0 rgba(255, 255, 255, 0.9); }  /* a hairline between adjacent tokens */
.tok.prompt { background: none; color: #888; }
.tok.dropped { background: rgba(220, 50, 50, 0.12); color: #b22; text-decoration: line-through; }
.legend span { padding: 0 0.4rem; margin-right: 0.6rem; }
"""


def render_html(view: SampleView) -> str:
    top = _top(view)
    body = "".join(_span(view, i, top) for i in range(len(view.pieces)))
    title = html.escape(f"winnow show: {view.sample_id}")
    lines = "".join(f"<p>{html.escape(t)}</p>" for t in view.title)
    legend = (
        '<p class="legend"><span class="tok prompt">not supervised</span><span class="tok" style="--w:1">'
        'weight/score (darker: higher)</span><span class="tok dropped">dropped</span></p>'
        f"<p>{html.escape(_legend_text(view))}</p>"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(view.sample_id)}</h1>{lines}{legend}"
        f'<div class="text">{body}</div></body></html>\n'
    )


def check_html_path(run_dir: str, out: str | None) -> None:
    """`show --html` writes one page; never into a run, where it would sit beside committed tables."""
    if out is None:
        return
    root, target = Path(run_dir).resolve(), Path(out).resolve()
    if target == root or root in target.parents:
        raise UserError(f"--html {out} is inside the run {run_dir}: write the page outside the run")
    if target.is_dir():
        raise UserError(f"--html {out} is a directory: give a file name such as {Path(out) / 'sample.html'}")


def write_html(view: SampleView, path: str | Path) -> None:
    atomic_write_bytes(Path(path), render_html(view).encode("utf-8"))
